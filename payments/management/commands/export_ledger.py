"""Export the ledger (the same data and summary as the admin's background exports).

Without --output: data.csv to standard output (no totals in it) and the summary to standard
error. With --output FILE.zip (CSV) or FILE.xlsx (XLSX): the file, summary included.
"""

from __future__ import annotations

import csv
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from django.core.management.base import BaseCommand, CommandError

from payments.finance import export_jobs, exports, ledger_lines, periods, xlsx
from payments.finance.reports import DateBasis, LedgerFilter
from payments.models import ExportJob, PaymentStatus


def _date(value: str) -> datetime | str:
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(f"not a date: {value!r} ({exc})") from None


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--since", type=_date, help="at or after (YYYY-MM-DD or ISO 8601; in --tz unless it says)")
        parser.add_argument("--until", type=_date, help="before")
        parser.add_argument("--basis", choices=DateBasis.values, default=DateBasis.CREATED, help="which date is in the period")
        parser.add_argument("--tz", default="UTC", help="time zone of the dates and of the times written")
        parser.add_argument("--status", action="append", choices=PaymentStatus.values, default=[])
        parser.add_argument("--model", default="", help="owner/name")
        parser.add_argument("--network", default="", help="CAIP-2, e.g. eip155:8453")
        parser.add_argument("--format", choices=ExportJob.Format.values, default=ExportJob.Format.CSV)
        parser.add_argument("--output", help="the file to write (.zip for CSV, .xlsx); default: data.csv to standard output")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            zone = periods.zone(opts["tz"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None

        def aware(value: datetime | None) -> datetime | None:
            return value if value is None or value.tzinfo else value.replace(tzinfo=ZoneInfo(zone.key))

        flt = LedgerFilter(
            since=aware(opts["since"]),
            until=aware(opts["until"]),
            statuses=tuple(opts["status"]),
            model=opts["model"],
            network=opts["network"],
            basis=opts["basis"],
            tz=zone.key,
        )
        output = Path(opts["output"]) if opts["output"] else None
        if opts["format"] == ExportJob.Format.XLSX:
            if output is None:
                raise CommandError("--output is required for xlsx")
            result = xlsx.write_xlsx(flt, output)
        elif output is not None:
            result = exports.write_zip(flt, output)
        else:
            result = exports.copy_csv(flt, sys.stdout.buffer)
            sys.stdout.flush()
            summary = csv.writer(self.stderr)
            summary.writerow(ledger_lines.SUMMARY_COLUMNS)
            summary.writerows([exports.csv_cell(v) for v in line.values()] for line in result.summary)
        checksum = exports.sha256_of(output) if output else result.data_sha256
        export_jobs.record_command(flt, opts["format"], result, checksum)
        self.stderr.write(f"exported {result.rows} payments")
