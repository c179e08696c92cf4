from django.db import migrations, models
from django.db.models import F


def backfill(apps, schema_editor):
    """Runs claimed before the run clock existed keep the clock they had: their claim."""
    Prediction = apps.get_model("predictions", "Prediction")
    Prediction.objects.filter(started_at__isnull=False).update(run_started_at=F("started_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("predictions", "0006_prediction_ref"),
    ]

    operations = [
        migrations.AddField(
            model_name="prediction",
            name="run_started_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="prediction",
            name="alive_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
