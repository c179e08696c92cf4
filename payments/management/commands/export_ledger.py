"""Export the ledger to CSV or XLSX (the same columns and totals as the admin's export)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from payments.exports import Export
from payments.models import Payment, PaymentStatus
from payments.reports import LedgerFilter


def _date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(f"not a date: {value!r} ({exc})") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--since", type=_date, help="created at or after (YYYY-MM-DD or ISO 8601, UTC)")
        parser.add_argument("--until", type=_date, help="created before")
        parser.add_argument("--status", action="append", choices=PaymentStatus.values, default=[])
        parser.add_argument("--model", default="", help="owner/name")
        parser.add_argument("--network", default="", help="CAIP-2, e.g. eip155:8453")
        parser.add_argument("--format", choices=["csv", "xlsx"], default="csv")
        parser.add_argument("--output", help="file to write (CSV defaults to standard output)")

    def handle(self, *args: Any, **opts: Any) -> None:
        flt = LedgerFilter(
            since=opts["since"],
            until=opts["until"],
            statuses=tuple(opts["status"]),
            model=opts["model"],
            network=opts["network"],
        )
        export = Export(
            flt.apply(Payment.objects.all()),
            fmt=opts["format"],
            user=None,
            source="command",
            filters=flt.as_dict(),
        )
        if opts["format"] == "xlsx":
            if not opts["output"]:
                raise CommandError("--output is required for xlsx")
            export.xlsx(Path(opts["output"]))
        else:
            out = open(opts["output"], "w", encoding="utf-8", newline="") if opts["output"] else sys.stdout
            try:
                for chunk in export.csv():
                    out.write(chunk)
            finally:
                if out is not sys.stdout:
                    out.close()
        self.stderr.write(f"exported {export.count} payments")
