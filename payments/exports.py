"""Ledger exports (CSV and XLSX) with the same columns, streamed, with totals and an audit row."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from .models import LedgerExport, Payment
from .options import configured
from .reports import Totals, ledger

COLUMNS = [
    "payment_id",
    "created_at",
    "settled_at",
    "confirmed_at",
    "status",
    "network",
    "asset_symbol",
    "asset",
    "payer",
    "pay_to",
    "amount_atomic",
    "amount",
    # What moved or is moving on chain (settling, settled, confirmed); 0 for a payment never
    # charged (released, failed, expired, or not settled yet), whose ``amount`` is only authorized.
    "charged_atomic",
    "charged",
    "model",
    "version",
    "hardware_tier",
    "prediction_id",
    "prediction_status",
    "transaction",
    "block_number",
    "confirmations",
    "gas_cost_wei",
    "verification",
    "failure_reason",
    # Pay per second (upto): the signed maximum and the run seconds ``amount`` was charged for.
    "scheme",
    "maximum_atomic",
    "maximum",
    "run_seconds",
]


def _symbols() -> dict[tuple[str, str], str]:
    return {(c.option.network, c.option.asset): c.option.symbol for c in configured()}


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value else None


def row(p: Payment, symbols: dict[tuple[str, str], str]) -> list[Any]:
    """One ledger row, typed: datetimes (UTC), Decimal amounts, ints; text elsewhere."""
    prediction = getattr(p, "prediction", None)
    model = prediction.model if prediction else None
    return [
        str(p.id),
        _utc(p.created_at),
        _utc(p.settled_at),
        _utc(p.confirmed_at),
        p.status,
        p.network,
        symbols.get((p.network, p.asset), ""),
        p.asset,
        p.payer,
        p.pay_to,
        int(p.amount),
        _units(p.amount, p.decimals),
        p.charged_atomic,
        _units(p.charged_atomic, p.decimals),
        str(model) if model else "",
        prediction.version_id if prediction else "",
        model.hardware.slug if model and model.hardware else "",
        prediction.id if prediction else "",
        prediction.status if prediction else "",
        p.settle_tx_hash or "",
        p.block_number,
        p.confirmations,
        int(p.gas_cost_wei) if p.gas_cost_wei is not None else None,
        p.verification,
        p.failure_reason,
        p.scheme,
        int(p.maximum) if p.maximum is not None else None,
        _units(p.maximum, p.decimals) if p.maximum is not None else None,
        p.run_seconds,
    ]


def _units(atomic: Any, decimals: int) -> Decimal:
    return Decimal(atomic).scaleb(-decimals).quantize(Decimal(1).scaleb(-decimals))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)  # Decimals keep every digit: no float rounding


class Export:
    """One export run: writes the rows, keeps the totals, records the audit row."""

    def __init__(
        self, payments: QuerySet[Payment], *, fmt: str, user: Any, source: str, filters: dict
    ) -> None:
        self.payments = payments
        self.totals = Totals()
        self.count = 0
        self.audit = LedgerExport.objects.create(
            user=user if getattr(user, "is_authenticated", False) else None,
            source=source,
            format=fmt,
            filters=filters,
        )

    def rows(self) -> Iterator[list[Any]]:
        symbols = _symbols()
        for p in ledger(self.payments):
            self.totals.add(p.status, p.network, p.asset, int(p.amount), p.decimals)
            self.count += 1
            yield row(p, symbols)
        LedgerExport.objects.filter(pk=self.audit.pk).update(rows=self.count, finished_at=timezone.now())

    def csv(self) -> Iterator[str]:
        """CSV text, streamed: header, rows, then a blank line and one totals row per status and asset."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)

        def flush() -> str:
            text = buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            return text

        writer.writerow(COLUMNS)
        for i, values in enumerate(self.rows()):
            writer.writerow([_text(v) for v in values])
            if i % 500 == 0:
                yield flush()
        writer.writerow([])
        writer.writerow(["TOTAL", "status", "network", "asset", "payments", "amount"])
        for status, network, asset, count, amount in self.totals.lines():
            writer.writerow(["TOTAL", status, network, asset, count, str(amount)])
        yield flush()

    def xlsx(self, path: Path) -> None:
        """An XLSX file: typed cells, frozen header, a Summary sheet. xlsxwriter's constant-memory
        mode writes each row as it comes (inline strings), so memory stays flat at any size."""
        import xlsxwriter

        book = xlsxwriter.Workbook(str(path), {"constant_memory": True, "remove_timezone": True})
        sheet = book.add_worksheet("Ledger")
        sheet.freeze_panes(1, 0)
        money = book.add_format({"num_format": "0.000000"})
        when = book.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"})
        sheet.write_row(0, 0, COLUMNS)
        amount_col = COLUMNS.index("amount")
        for r, values in enumerate(self.rows(), start=1):
            for c, value in enumerate(values):
                if value is None or value == "":
                    continue
                if isinstance(value, datetime):
                    sheet.write_datetime(r, c, value.replace(tzinfo=None), when)  # UTC: Excel has no zones
                elif c == amount_col:
                    sheet.write_number(r, c, value, money)
                elif isinstance(value, int):
                    sheet.write_number(r, c, value)
                else:
                    sheet.write_string(r, c, str(value))
        summary = book.add_worksheet("Summary")
        summary.write_row(0, 0, ["status", "network", "asset", "payments", "amount"])
        for r, (status, network, asset, count, amount) in enumerate(self.totals.lines(), start=1):
            summary.write_row(r, 0, [status, network, asset, count])
            summary.write_number(r, 4, amount, money)
        book.close()
