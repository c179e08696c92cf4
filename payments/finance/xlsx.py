"""The XLSX export of the ledger's lines: sheets Data and Summary (xlsxwriter's
constant-memory mode), from the same query as the CSV export (:mod:`payments.finance.exports`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from payments.finance.exports import RATE_COLUMNS, Progress, Result, ticker
from payments.finance.ledger_lines import (
    COLUMNS,
    NAMES,
    SUMMARY_COLUMNS,
    data_queries,
    rates,
    read_summary,
    snapshot,
)
from payments.finance.reports import LedgerFilter


def _typed_rows(cursor: Any, sql: str, params: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
    with cursor.copy(f"COPY ({sql}) TO STDOUT", params) as copy:  # text format: rows() types it
        copy.set_types([pg_type for _, pg_type in COLUMNS])
        yield from copy.rows()


def write_xlsx(flt: LedgerFilter, path: Path, progress: Progress | None = None) -> Result:
    """The XLSX export: typed cells, frozen header, times in the export's zone (Excel has none),
    sheets Data and Summary (and the rates below the summary)."""
    import xlsxwriter

    usd_rates = rates()
    zone = ZoneInfo(flt.tz)
    parts = data_queries(flt, usd_rates)
    book = xlsxwriter.Workbook(str(path), {"constant_memory": True})
    sheet = book.add_worksheet("Data")
    sheet.freeze_panes(1, 0)
    money = book.add_format({"num_format": "0.000000"})
    native = book.add_format({"num_format": "0.000000000000000000"})
    when = book.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"})
    sheet.write_row(0, 0, [f"{n} ({flt.tz})" if t == "timestamptz" else n for n, t in COLUMNS])
    formats = {"amount": money, "charged": money, "gas_usd": money, "net_amount": money, "gas_native": native}
    digest = hashlib.sha256()
    rows = 0
    with snapshot(flt.tz) as cursor:
        summary = read_summary(cursor, flt, usd_rates)
        tick = ticker(progress, sum(line.rows for line in summary))
        typed = (values for sql, params in parts for values in _typed_rows(cursor, sql, params))
        for rows, values in enumerate(typed, start=1):
            digest.update(repr(values).encode())
            for c, value in enumerate(values):
                if value is None or value == "":
                    continue
                name = NAMES[c]
                if isinstance(value, bool):
                    sheet.write_boolean(rows, c, value)
                elif isinstance(value, datetime):
                    sheet.write_datetime(rows, c, value.astimezone(zone).replace(tzinfo=None), when)
                elif isinstance(value, Decimal | int) and abs(value) < 2**53:
                    sheet.write_number(rows, c, value, formats.get(name))
                else:
                    sheet.write_string(rows, c, str(value))
            tick(rows)
    result = Result(rows=rows, summary=summary, rates=usd_rates, data_sha256=digest.hexdigest())
    _summary_sheet(book, result, money, native)
    book.close()
    return result


def _summary_sheet(book: Any, result: Result, money: Any, native: Any) -> None:
    sheet = book.add_worksheet("Summary")
    sheet.write_row(0, 0, SUMMARY_COLUMNS)
    for r, line in enumerate(result.summary, start=1):
        for c, value in enumerate(line.values()):
            if isinstance(value, bool):
                sheet.write_boolean(r, c, value)
            elif isinstance(value, Decimal):
                sheet.write_number(r, c, value, native if SUMMARY_COLUMNS[c] == "gas_native" else money)
            elif value is not None:
                sheet.write(r, c, value)
    start = len(result.summary) + 3
    sheet.write_row(start, 0, ["gas rates used", *RATE_COLUMNS[1:]])
    for r, rate in enumerate(result.rates.values(), start=start + 1):
        sheet.write_row(r, 0, [rate.network, rate.symbol, str(rate.usd_per_token), rate.source, rate.set_by, rate.set_at.isoformat()])
