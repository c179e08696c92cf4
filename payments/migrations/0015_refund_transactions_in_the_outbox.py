"""Refunds' transactions move to the outbox (SettlementTx, kind "refund"): each refund that has
signed bytes gets its outbox row (nonce, raw bytes, fees and gas limit read back from the
bytes, every signing of its current attempt as replaced hashes, its block), and points to it;
the refund's own raw_tx and nonce columns go (0016, a transaction of its own: PostgreSQL does
not alter a table with pending deferred constraint checks)."""

import rlp
from django.db import migrations, models
from django.db.models.deletion import PROTECT


def _fields(raw: str) -> dict:
    """nonce, fees and gas of signed EIP-1559 bytes (the relayer's decode, frozen here)."""
    fields = rlp.decode(bytes.fromhex(raw[4:]))  # skip "0x" and the type byte 0x02
    nonce, priority, max_fee, gas = (int.from_bytes(b, "big") for b in fields[1:5])
    return {"nonce": nonce, "max_priority_fee_per_gas": priority, "max_fee_per_gas": max_fee, "gas_limit": gas}


def _hashes(refund) -> list[str]:
    """The refund's current attempt's signings, the current one first (refunds.hashes as it was)."""
    events = refund.events.all()
    since = events.filter(to_status="owed").order_by("-pk").values_list("pk", flat=True).first() or 0
    earlier = [
        e.detail["tx"]
        for e in events.filter(to_status="sent", pk__gt=since).order_by("-pk")
        if e.detail.get("tx") and e.detail.get("nonce") == refund.nonce
    ]
    return list(dict.fromkeys([refund.tx_hash, *earlier]))


def to_outbox(apps, schema_editor):
    Refund = apps.get_model("payments", "Refund")
    SettlementTx = apps.get_model("payments", "SettlementTx")
    for refund in Refund.objects.exclude(raw_tx="").exclude(tx_hash="").order_by("pk"):
        fields = _fields(refund.raw_tx)
        current, *replaced = _hashes(refund)
        refund.tx = SettlementTx.objects.create(
            network=refund.network,
            relayer=refund.sender,
            kind="refund",
            to=refund.asset,
            items=1,
            tx_hash=current,
            raw_tx=refund.raw_tx,
            replaced_hashes=replaced,
            created_at=refund.sent_at or refund.created_at,
            signed_at=refund.sent_at or refund.created_at,
            block_number=refund.block_number,
            **fields,
        )
        refund.save(update_fields=["tx"])


def from_outbox(apps, schema_editor):
    Refund = apps.get_model("payments", "Refund")
    for refund in Refund.objects.exclude(tx=None).select_related("tx"):
        refund.raw_tx, refund.nonce = refund.tx.raw_tx, refund.tx.nonce
        refund.save(update_fields=["raw_tx", "nonce"])
    Refund.objects.update(tx=None)
    apps.get_model("payments", "SettlementTx").objects.filter(kind="refund").delete()
    if schema_editor.connection.vendor == "postgresql":
        # The refund table is altered next (its tx column goes) in this transaction.
        schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")


class Migration(migrations.Migration):
    dependencies = [
        ("payments", "0014_lane_unfunded_and_refund_gas_totals"),
    ]

    operations = [
        migrations.AlterField(
            model_name="settlementtx",
            name="kind",
            field=models.CharField(
                choices=[
                    ("single", "One payment (the token's transferWithAuthorization)"),
                    ("batch", "A batch (BatchSettler.settle)"),
                    ("refund", "A refund (the token's transfer from the refund wallet)"),
                ],
                max_length=8,
            ),
        ),
        migrations.AlterField(
            model_name="settlementtx",
            name="items",
            field=models.PositiveIntegerField(
                help_text="Payments carried (the gas is shared among them); 1 for a refund"
            ),
        ),
        migrations.AddField(
            model_name="refund",
            name="tx",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=PROTECT, related_name="refunds", to="payments.settlementtx"
            ),
        ),
        migrations.RunPython(to_outbox, from_outbox),
    ]
