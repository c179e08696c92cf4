"""Ledger exports for finance, as CSV: a zip of ``data.csv`` (PostgreSQL ``COPY ... TO
STDOUT`` straight into the archive: flat memory at any size), ``summary.csv`` (totals per kind,
status and asset), ``rates.csv`` (the gas rates used and where they came from) and
``export.json`` (filters, rows, checksums). The lines and their summary are
:mod:`payments.finance.ledger_lines`; the XLSX export of the same query is
:mod:`payments.finance.xlsx`. What both writers share (:class:`Result`, progress) is here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from payments.finance.ledger_lines import (
    NAMES,
    SUMMARY_COLUMNS,
    Rate,
    SummaryLine,
    data_queries,
    rates,
    read_summary,
    snapshot,
)
from payments.finance.reports import LedgerFilter

#: Bytes of COPY output written at once.
WRITE_BLOCK = 1 << 18
#: Seconds between two progress reports.
PROGRESS_EVERY = 0.5

#: Told (rows written, rows in all) as an export goes.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Result:
    """What an export wrote (CSV or XLSX)."""

    rows: int
    summary: list[SummaryLine]
    rates: dict[str, Rate]
    #: sha256 of the data (data.csv; the Data sheet's rows for XLSX are the same query's).
    data_sha256: str


def ticker(progress: Progress | None, total: int) -> Callable[[int], None]:
    """``progress`` told at most every :data:`PROGRESS_EVERY` seconds."""
    last = [0.0]

    def tick(done: int) -> None:
        now = time.monotonic()
        if progress is not None and now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            progress(done, total)

    return tick


def _flush(buffer: bytearray, out: IO[bytes], digest: Any) -> int:
    """Write and hash ``buffer``, empty it; the lines it held."""
    out.write(buffer)
    digest.update(buffer)
    lines = buffer.count(b"\n")
    buffer.clear()
    return lines


def copy_csv(flt: LedgerFilter, out: IO[bytes], progress: Progress | None = None) -> Result:
    """The data as CSV (header first) into ``out``, by ``COPY ... TO STDOUT``; the summary beside."""
    usd_rates = rates()
    parts = data_queries(flt, usd_rates, words=True)
    digest = hashlib.sha256()
    with snapshot(flt.tz) as cursor:
        # First: its counts are the progress's total.
        summary = read_summary(cursor, flt, usd_rates)
        tick = ticker(progress, sum(line.rows for line in summary))
        lines = 0
        buffer = bytearray()
        for i, (sql, params) in enumerate(parts):
            header = ", HEADER" if i == 0 else ""
            with cursor.copy(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv{header})", params) as copy:
                for chunk in copy:  # libpq hands COPY out a row at a time: written in blocks
                    buffer += chunk
                    if len(buffer) >= WRITE_BLOCK:
                        lines += _flush(buffer, out, digest)
                        tick(lines - 1)
        lines += _flush(buffer, out, digest)
        tick(lines - 1)
    return Result(rows=lines - 1, summary=summary, rates=usd_rates, data_sha256=digest.hexdigest())


def csv_cell(value: Any) -> Any:
    """A value as data.csv writes it: nothing for NULL, booleans as ``true``/``false``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _csv_text(header: list[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return buffer.getvalue().encode()


def _about(flt: LedgerFilter, result: Result, fmt: str) -> dict[str, Any]:
    return {
        "format": fmt,
        "filters": flt.as_dict(),
        "rows": result.rows,
        "data_sha256": result.data_sha256,
        "columns": NAMES,
        "notes": [
            "Times are in the export's time zone (filters.tz); money_at is when the payment was mined (settled), else confirmed.",
            "amount is in the token's units (USDC: USD); gas_native in the chain's native token; gas_usd at the rates in rates.csv.",
            "net_amount = the amount if paid (settled or confirmed) and ours, else 0, minus gas_usd; empty where no rate is set.",
            "ours = false: a payment our facilitator API settled for another merchant; its amount is theirs, its gas our cost.",
        ],
        "rates": {n: {**asdict(r), "usd_per_token": str(r.usd_per_token), "set_at": r.set_at.isoformat()} for n, r in result.rates.items()},
    }


RATE_COLUMNS = ["network", "symbol", "usd_per_token", "source", "set_by", "set_at"]


def write_zip(flt: LedgerFilter, path: Path, progress: Progress | None = None) -> Result:
    """The CSV export: a zip of data.csv, summary.csv, rates.csv and export.json."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("data.csv", "w", force_zip64=True) as data:
            result = copy_csv(flt, data, progress)
        archive.writestr("summary.csv", _csv_text(SUMMARY_COLUMNS, [s.values() for s in result.summary]))
        archive.writestr(
            "rates.csv",
            _csv_text(RATE_COLUMNS, [[getattr(r, c) for c in RATE_COLUMNS] for r in result.rates.values()]),
        )
        archive.writestr("export.json", json.dumps(_about(flt, result, "csv"), indent=2, default=str))
    return result


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
