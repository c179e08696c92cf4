"""Reconcile the ledger with the chain for a period: every token Transfer to our pay-to beside
the ledger's paid payments (matched, on chain only, in the ledger only), with totals per status.

Exits non-zero while an unmatched line has no note (annotate it in the admin's reconciliation
page, or with --note KEY REASON).
"""

from __future__ import annotations

import csv
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.core.management.base import BaseCommand, CommandError

from payments.chain.node import ChainUnavailable
from payments.finance import reconciliation
from payments.finance.reconciliation import Period


def _zone(value: str) -> ZoneInfo:
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise CommandError(f"unknown time zone: {value!r}") from None


def _when(value: str, zone: ZoneInfo) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(f"not a date: {value!r} ({exc})") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=zone)


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--since", required=True, help="start (YYYY-MM-DD or ISO 8601), in --tz")
        parser.add_argument("--until", help="end, exclusive (default: the day after --since)")
        parser.add_argument("--tz", default="UTC", help="time zone of dates without one (e.g. Europe/Paris)")
        parser.add_argument("--network", default="", help="CAIP-2, e.g. eip155:8453")
        parser.add_argument("--format", choices=["text", "csv"], default="text")
        parser.add_argument("--note", nargs=2, metavar=("KEY", "REASON"), help="annotate a line, then report")

    def handle(self, *args: Any, **opts: Any) -> None:
        zone = _zone(opts["tz"])
        since = _when(opts["since"], zone)
        until = (
            _when(opts["until"], zone)
            if opts["until"]
            else datetime.combine(since.date() + timedelta(days=1), time.min, tzinfo=since.tzinfo)
        )
        try:
            period = Period(since, until)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if opts["note"]:
            try:
                reconciliation.annotate(opts["note"][0], opts["note"][1], author=None)
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        try:
            result = reconciliation.report(period, network=opts["network"])
        except ChainUnavailable as exc:
            raise CommandError(f"the chain did not answer: {exc}") from None
        if opts["format"] == "csv":
            self._csv(result)
        else:
            self._text(result)
        if result.unexplained:
            raise CommandError(f"{len(result.unexplained)} unmatched lines without a note")

    def _text(self, result: reconciliation.Report) -> None:
        out = self.stdout
        out.write(f"period {result.period.since.isoformat()} to {result.period.until.isoformat()}")
        for scan in result.scans:
            out.write(
                f"  {scan.network} {scan.asset} {scan.kind}s, {scan.address}: blocks {scan.first_block}-{scan.last_block}"
            )
        for t in result.totals():
            out.write(f"  {t.kind:<8} {t.status:<12} {t.network} {t.symbol}: {t.count} lines, {t.amount}")
        for line in result.lines:
            if not line.needs_attention:
                continue
            out.write(
                f"  {line.kind} {line.status}: {line.amount_decimal} {line.symbol}, {line.payer} in {line.tx_hash or '-'}"
                f" (block {line.block_number}) [{line.key}]"
            )
            for note in line.notes:
                out.write(f"      note by {note.author}: {note.reason}")

    def _csv(self, result: reconciliation.Report) -> None:
        writer = csv.writer(self.stdout)
        writer.writerow(
            [
                "kind",
                "status",
                "time",
                "network",
                "asset",
                "pay_to",
                "payer",
                "amount",
                "transaction",
                "log_index",
                "block_number",
                "payment_id",
                "notes",
            ]
        )
        for line in result.lines:
            writer.writerow(
                [
                    line.kind,
                    line.status,
                    line.time.isoformat() if line.time else "",
                    line.network,
                    line.asset,
                    line.pay_to,
                    line.payer,
                    line.amount_decimal,
                    line.tx_hash,
                    "" if line.log_index is None else line.log_index,
                    "" if line.block_number is None else line.block_number,
                    line.payment_id or "",
                    " | ".join(f"{n.author}: {n.reason}" for n in line.notes),
                ]
            )
