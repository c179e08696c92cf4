from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("payments", "0013_unpaid_reason_refused_before_run"),
    ]

    operations = [
        migrations.AlterModelOptions(name="relayernonce", options={"verbose_name": "relayer lane"}),
        migrations.AddField(
            model_name="relayernonce",
            name="unfunded_since",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="relayernonce",
            name="unfunded_reason",
            field=models.TextField(blank=True, help_text="The node's refusal that flagged the lane"),
        ),
        migrations.AlterField(
            model_name="refund",
            name="gas_used",
            field=models.PositiveBigIntegerField(blank=True, help_text="Gas of all its attempts", null=True),
        ),
        migrations.AlterField(
            model_name="refund",
            name="gas_cost_wei",
            field=models.DecimalField(
                blank=True,
                decimal_places=0,
                help_text="Wei paid for gas by all its attempts",
                max_digits=78,
                null=True,
            ),
        ),
    ]
