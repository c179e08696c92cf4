"""The ledger CSV export as it was before issue 20, kept only to be measured beside the COPY
export (benchmarks/run.py, section "export"): the ORM reads keyset-paged chunks of payments
(with their prediction, model and tier), Python formats each row, and totals are appended as
rows. Nothing in the application uses it.

    python benchmarks/baseline_export.py OUTPUT.csv NETWORK
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")

COLUMNS = [
    "payment_id", "created_at", "settled_at", "confirmed_at", "status", "network", "asset_symbol", "asset",
    "payer", "pay_to", "amount_atomic", "amount", "model", "version", "hardware_tier", "prediction_id",
    "prediction_status", "transaction", "block_number", "confirmations", "gas_cost_wei", "verification",
    "failure_reason",
]


def ledger(payments: Any, chunk: int = 2000) -> Iterator[Any]:
    """Every payment, oldest first, in keyset-paged chunks (one short query each)."""
    base = payments.select_related("prediction__model__hardware").order_by("created_at", "id")
    last = None
    while True:
        qs = base
        if last is not None:
            qs = qs.filter(created_at__gte=last[0]).exclude(created_at=last[0], id__lte=last[1])
        rows = list(qs[:chunk])
        yield from rows
        if len(rows) < chunk:
            return
        last = (rows[-1].created_at, rows[-1].id)


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value else None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def row(p: Any, symbols: dict[tuple[str, str], str]) -> list[Any]:
    prediction = getattr(p, "prediction", None)
    model = prediction.model if prediction else None
    return [
        str(p.id), _utc(p.created_at), _utc(p.settled_at), _utc(p.confirmed_at), p.status, p.network,
        symbols.get((p.network, p.asset), ""), p.asset, p.payer, p.pay_to, int(p.amount),
        Decimal(p.amount).scaleb(-p.decimals).quantize(Decimal(1).scaleb(-p.decimals)),
        str(model) if model else "", prediction.version_id if prediction else "",
        model.hardware.slug if model and model.hardware else "", prediction.id if prediction else "",
        prediction.status if prediction else "", p.settle_tx_hash or "", p.block_number, p.confirmations,
        int(p.gas_cost_wei) if p.gas_cost_wei is not None else None, p.verification, p.failure_reason,
    ]


def export_csv(payments: Any, out: Any) -> int:
    from payments.options import configured

    symbols = {(c.option.network, c.option.asset): c.option.symbol for c in configured()}
    totals: dict[tuple[str, str, str], list[Any]] = {}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    count = 0
    for p in ledger(payments):
        entry = totals.setdefault((p.status, p.network, p.asset), [0, Decimal(0)])
        entry[0] += 1
        entry[1] += Decimal(p.amount).scaleb(-p.decimals)
        writer.writerow([_text(v) for v in row(p, symbols)])
        count += 1
        if count % 500 == 0:
            out.write(buffer.getvalue())
            buffer.seek(0)
            buffer.truncate()
    writer.writerow([])
    for (status, network, asset), (n, amount) in sorted(totals.items()):
        writer.writerow(["TOTAL", status, network, asset, n, str(amount)])
    out.write(buffer.getvalue())
    return count


if __name__ == "__main__":
    import django

    django.setup()
    from payments.models import Payment

    with open(sys.argv[1], "w", encoding="utf-8", newline="") as handle:
        print(export_csv(Payment.objects.filter(network=sys.argv[2]), handle), file=sys.stderr)
