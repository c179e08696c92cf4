"""A refund's signed bytes and nonce are its outbox row's (0015 copied them there)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("payments", "0015_refund_transactions_in_the_outbox"),
    ]

    operations = [
        migrations.RemoveField(model_name="refund", name="raw_tx"),
        migrations.RemoveField(model_name="refund", name="nonce"),
    ]
