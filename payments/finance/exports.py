"""Ledger exports for finance: one data file of ledger lines (a line per payment, and one per
refund with its amount negative) and a separate summary, never totals inside the data.

- CSV: a zip of ``data.csv`` (PostgreSQL ``COPY ... TO STDOUT`` straight into the archive: flat
  memory at any size), ``summary.csv`` (totals per kind, status and asset), ``rates.csv`` (the
  gas rates used and where they came from) and ``export.json`` (filters, rows, checksums).
- XLSX: sheets Data and Summary (xlsxwriter's constant-memory mode), from the same query.

Periods are by creation or by the date the money arrived, bounds and shown times in the time
zone finance picks. Revenue is shown net of gas: gas in the chain's native token, converted at
the newest :class:`NativeTokenRate` finance set for the network (no price feed is reachable);
a network with no rate has no net figure rather than a wrong one. Stablecoin amounts count as
USD one for one.

Every export reads one REPEATABLE READ snapshot, so the rows, their count and the summary
agree even while payments settle.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

from django.db import connection, transaction
from django.db.models import (
    BooleanField,
    Case,
    CharField,
    DecimalField,
    Expression,
    F,
    Func,
    QuerySet,
    TextField,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Concat, Replace

from payments.finance.reports import MONEY_AT, DateBasis, LedgerFilter
from payments.models import (
    CHARGED_STATUSES,
    PAID_STATUSES,
    NativeTokenRate,
    Payment,
    Refund,
    RefundStatus,
    for_others_q,
)
from payments.options import configured

#: The data columns and their PostgreSQL types (the XLSX path reads them typed).
COLUMNS: list[tuple[str, str]] = [
    ("kind", "text"),
    ("payment_id", "uuid"),
    ("created_at", "timestamptz"),
    ("money_at", "timestamptz"),
    ("status", "text"),
    ("network", "text"),
    ("asset_symbol", "text"),
    ("asset", "text"),
    ("payer", "text"),
    ("pay_to", "text"),
    ("amount_atomic", "numeric"),
    ("amount", "numeric"),
    # What moved or is moving on chain (settling, settled, confirmed; a refund: once confirmed);
    # 0 for money never charged (released, failed, expired, not settled yet), whose ``amount``
    # is only authorized (an upto permit released keeps its signed maximum there).
    ("charged_atomic", "numeric"),
    ("charged", "numeric"),
    ("gas_native", "numeric"),
    ("gas_usd", "numeric"),
    ("net_amount", "numeric"),
    ("model", "text"),
    ("version", "text"),
    ("hardware_tier", "text"),
    ("prediction_ref", "text"),
    ("prediction_status", "text"),
    ("transaction", "text"),
    ("block_number", "int8"),
    ("confirmations", "int8"),
    ("gas_cost_wei", "numeric"),
    ("verification", "text"),
    # False for money we moved for another merchant (our facilitator API, their pay-to): its
    # amount is theirs, only its gas is ours (net_amount = -gas_usd).
    ("ours", "bool"),
    ("failure_reason", "text"),
    # Pay per second (upto): the scheme, the signed maximum and the run seconds charged for.
    ("scheme", "text"),
    ("maximum_atomic", "numeric"),
    ("maximum", "numeric"),
    ("run_seconds", "numeric"),
]
NAMES = [name for name, _ in COLUMNS]
#: The data columns the summary adds up (the others would only cost joins).
SUMMARY_SOURCE = [
    "kind", "ours", "status", "network", "asset_symbol", "asset", "amount", "gas_native", "gas_usd", "net_amount"
]
SUMMARY_COLUMNS = [
    "kind",
    "ours",
    "status",
    "network",
    "asset_symbol",
    "asset",
    "rows",
    "amount",
    "gas_native",
    "gas_usd",
    "net_amount",
]
KIND_PAYMENT = "payment"
KIND_REFUND = "refund"
#: Decimals of the native token (wei).
NATIVE_DECIMALS = 18
USD_PLACES = 6
#: Bytes of COPY output written at once.
WRITE_BLOCK = 1 << 18
#: Seconds between two progress reports.
PROGRESS_EVERY = 0.5

Progress = Callable[[int, int], None]


class _Scaled(Func):
    """``round(value / 10^places, places)`` in numeric: atomic units as whole units, every digit kept."""

    output_field = DecimalField()

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:  # type: ignore[override]
        value_sql, value_params = compiler.compile(self.source_expressions[0])
        places_sql, places_params = compiler.compile(self.source_expressions[1])
        sql = f"round(({value_sql})::numeric / power(10::numeric, {places_sql}), {places_sql})"
        return sql, [*value_params, *places_params, *places_params]


class _Usd(Func):
    """Wei times a USD rate, in USD rounded to ``USD_PLACES`` (NULL without a rate)."""

    output_field = DecimalField()

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:  # type: ignore[override]
        wei_sql, wei_params = compiler.compile(self.source_expressions[0])
        rate_sql, rate_params = compiler.compile(self.source_expressions[1])
        sql = f"round(({wei_sql})::numeric * ({rate_sql}) / 1e{NATIVE_DECIMALS}, {USD_PLACES})"
        return sql, [*wei_params, *rate_params]


@dataclass(frozen=True, slots=True)
class Rate:
    network: str
    symbol: str
    usd_per_token: Decimal
    source: str
    set_by: str
    set_at: datetime


def rates() -> dict[str, Rate]:
    """The newest rate finance set for each network."""
    out: dict[str, Rate] = {}
    for r in NativeTokenRate.objects.select_related("set_by").order_by("network", "-set_at", "-pk"):
        out.setdefault(
            r.network, Rate(r.network, r.symbol, r.usd_per_token, r.source, str(r.set_by or ""), r.set_at)
        )
    return out


def _by_network(values: dict[str, Any]) -> Expression:
    whens = [When(network=network, then=Value(v)) for network, v in values.items()]
    return Case(*whens, default=Value(None), output_field=DecimalField()) if whens else Value(None, DecimalField())


def _symbol() -> Expression:
    symbols = [
        When(network=c.option.network, asset=c.option.asset, then=Value(c.option.symbol)) for c in configured()
    ]
    return Case(*symbols, default=Value(""), output_field=CharField()) if symbols else Value("")


def _one_line(field: str) -> Expression:
    """A text field on one line, always: COPY's line count is the progress."""
    inner = Replace(F(field), Value("\n"), Value(" "), output_field=TextField())
    return Replace(inner, Value("\r"), Value(" "), output_field=TextField())


def _model(prefix: str) -> Expression:
    return Case(
        When(
            **{f"{prefix}__isnull": False},
            then=Concat(f"{prefix}__model__owner", Value("/"), f"{prefix}__model__name"),
        ),
        default=Value(""),
        output_field=CharField(),
    )


def _values(qs: QuerySet[Any], columns: dict[str, Any], names: list[str]) -> QuerySet[Any, dict[str, Any]]:
    """``qs`` as the columns ``names``, in order, each named x_<column> (an annotation may not
    shadow a model field; the outer query names them). Columns left out cost no join."""
    return qs.annotate(**{f"x_{n}": columns[n] for n in names}).values(*[f"x_{n}" for n in names]).order_by()


def payment_lines(
    flt: LedgerFilter, usd_rates: dict[str, Rate], names: list[str] = NAMES
) -> QuerySet[Payment, dict[str, Any]]:
    """The payment lines of the data file: one row per payment."""
    rate = _by_network({n: r.usd_per_token for n, r in usd_rates.items()})
    theirs = for_others_q()
    ours = Case(When(theirs, then=Value(False)), default=Value(True), output_field=BooleanField())
    # Revenue is the paid amount of our own payments only: another merchant's is theirs.
    paid_amount = Case(
        When(theirs, then=Value(0)),
        When(status__in=PAID_STATUSES, then=F("amount")),
        default=Value(0),
        output_field=DecimalField(),
    )
    charged = Case(
        When(status__in=CHARGED_STATUSES, then=F("amount")), default=Value(0), output_field=DecimalField()
    )
    columns: dict[str, Any] = {
        "kind": Value(KIND_PAYMENT, CharField()),
        "payment_id": F("id"),
        "created_at": F("created_at"),
        "money_at": MONEY_AT,
        "status": F("status"),
        "network": F("network"),
        "asset_symbol": _symbol(),
        "asset": F("asset"),
        "payer": F("payer"),
        "pay_to": F("pay_to"),
        "amount_atomic": F("amount"),
        "amount": _Scaled(F("amount"), F("decimals")),
        "charged_atomic": charged,
        "charged": _Scaled(charged, F("decimals")),
        "gas_native": _Scaled(F("gas_cost_wei"), Value(NATIVE_DECIMALS)),
        "gas_usd": _Usd(F("gas_cost_wei"), rate),
        "net_amount": _Scaled(paid_amount, F("decimals")) - _Usd(Coalesce(F("gas_cost_wei"), Value(0)), rate),
        "model": _model("prediction"),
        "version": F("prediction__version_id"),
        "hardware_tier": F("prediction__model__hardware__slug"),
        "prediction_ref": F("prediction__ref"),
        "prediction_status": F("prediction__status"),
        "transaction": F("settle_tx_hash"),
        "block_number": F("block_number"),
        "confirmations": F("confirmations"),
        "gas_cost_wei": F("gas_cost_wei"),
        "verification": F("verification"),
        "ours": ours,
        "failure_reason": _one_line("failure_reason"),
        "scheme": F("scheme"),
        "maximum_atomic": F("maximum"),
        "maximum": _Scaled(F("maximum"), F("decimals")),
        "run_seconds": F("run_seconds"),
    }
    return _values(flt.apply(Payment.objects.all()), columns, names)


def refund_lines(
    flt: LedgerFilter, usd_rates: dict[str, Rate], names: list[str] = NAMES
) -> QuerySet[Refund, dict[str, Any]]:
    """The refund lines: one row per refund, its amount negative (money out, from the refund
    wallet to the payer); its money date is its confirmation. The filter's statuses are the
    refund's own (confirmed, failed...)."""
    rate = _by_network({n: r.usd_per_token for n, r in usd_rates.items()})
    out = Case(When(status=RefundStatus.CONFIRMED, then=F("amount")), default=Value(0), output_field=DecimalField())
    columns: dict[str, Any] = {
        "kind": Value(KIND_REFUND, CharField()),
        "payment_id": F("payment_id"),
        "created_at": F("created_at"),
        "money_at": F("confirmed_at"),
        "status": F("status"),
        "network": F("network"),
        "asset_symbol": _symbol(),
        "asset": F("asset"),
        "payer": F("recipient"),
        "pay_to": F("sender"),
        "amount_atomic": -F("amount"),
        "amount": -_Scaled(F("amount"), F("decimals")),
        "charged_atomic": -out,
        "charged": -_Scaled(out, F("decimals")),
        "gas_native": _Scaled(F("gas_cost_wei"), Value(NATIVE_DECIMALS)),
        "gas_usd": _Usd(F("gas_cost_wei"), rate),
        "net_amount": -_Scaled(out, F("decimals")) - _Usd(Coalesce(F("gas_cost_wei"), Value(0)), rate),
        "model": _model("payment__prediction"),
        "version": F("payment__prediction__version_id"),
        "hardware_tier": F("payment__prediction__model__hardware__slug"),
        "prediction_ref": F("payment__prediction__ref"),
        "prediction_status": F("payment__prediction__status"),
        "transaction": F("tx_hash"),
        "block_number": F("block_number"),
        "confirmations": F("confirmations"),
        "gas_cost_wei": F("gas_cost_wei"),
        "verification": Value("", CharField()),
        "ours": Value(True, BooleanField()),  # we refund only our own payments, from our wallet
        "failure_reason": _one_line("failure_reason"),
        "scheme": F("payment__scheme"),
        "maximum_atomic": Value(None, DecimalField()),
        "maximum": Value(None, DecimalField()),
        "run_seconds": Value(None, DecimalField()),
    }
    qs = Refund.objects.all()
    if flt.since or flt.until:
        date = "confirmed_at" if flt.basis == DateBasis.MONEY else "created_at"
        if flt.since:
            qs = qs.filter(**{f"{date}__gte": flt.since})
        if flt.until:
            qs = qs.filter(**{f"{date}__lt": flt.until})
    if flt.statuses:
        qs = qs.filter(status__in=flt.statuses)
    if flt.model:
        owner, _, name = flt.model.partition("/")
        qs = qs.filter(payment__prediction__model__owner=owner, payment__prediction__model__name=name)
    if flt.network:
        qs = qs.filter(network=flt.network)
    return _values(qs, columns, names)


Query = tuple[str, tuple[Any, ...]]


def _parts(
    flt: LedgerFilter,
    usd_rates: dict[str, Rate],
    *,
    ordered: bool = True,
    names: list[str] = NAMES,
    words: bool = False,
) -> list[Query]:
    """The data queries, columns named as :data:`NAMES`, each oldest first by the filter's
    date: the payment lines, then the refund lines. Two ordered queries, not one sorted union:
    the payments' order comes from the (created_at, id) index instead of sorting a million
    wide rows. ``words``: booleans as ``true``/``false`` (CSV), not COPY's ``t``/``f``."""
    order = "money_at" if flt.basis == DateBasis.MONEY else "created_at"
    types = dict(COLUMNS)
    outer = ", ".join(
        f'"x_{n}"::text AS "{n}"' if words and types[n] == "bool" else f'"x_{n}" AS "{n}"' for n in names
    )
    parts = []
    for lines in (payment_lines(flt, usd_rates, names), refund_lines(flt, usd_rates, names)):
        sql, params = lines.query.sql_with_params()
        order_by = f' ORDER BY "{order}", "payment_id"' if ordered else ""
        parts.append((f"SELECT {outer} FROM ({sql}) AS lines{order_by}", tuple(params)))
    return parts


def _all(parts: list[Query]) -> Query:
    """Every line of the parts (for the summary)."""
    return " UNION ALL ".join(f"({sql})" for sql, _ in parts), tuple(p for _, params in parts for p in params)


@dataclass(frozen=True, slots=True)
class SummaryLine:
    kind: str
    #: False: money moved for another merchant (its amount not revenue, its gas our cost).
    ours: bool
    status: str
    network: str
    asset_symbol: str
    asset: str
    rows: int
    amount: Decimal
    gas_native: Decimal
    gas_usd: Decimal | None
    net_amount: Decimal | None

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in SUMMARY_COLUMNS]


@dataclass(frozen=True)
class Result:
    rows: int
    summary: list[SummaryLine]
    rates: dict[str, Rate]
    #: sha256 of the data (data.csv; the Data sheet's rows for XLSX are the same query's).
    data_sha256: str


@contextmanager
def _snapshot(tz: str) -> Iterator[Any]:
    """A psycopg cursor in one REPEATABLE READ, read-only transaction whose times print in ``tz``."""
    ZoneInfo(tz)  # ValueError/ZoneInfoNotFoundError before any query
    # Inside a caller's transaction (a test's), its snapshot rules: the level is set only first.
    outer = connection.in_atomic_block
    with transaction.atomic(), connection.cursor() as wrapper:
        cursor = wrapper.cursor
        if not outer:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cursor.execute("SELECT set_config('TimeZone', %s, true)", [tz])
        # JIT compiling these wide expressions costs seconds of CPU for nothing a scan needs.
        cursor.execute("SET LOCAL jit = off")
        yield cursor


def _summary(cursor: Any, sql: str, params: tuple[Any, ...]) -> list[SummaryLine]:
    cursor.execute(
        "SELECT kind, ours, status, network, asset_symbol, asset, count(*), sum(amount),"
        " coalesce(sum(gas_native), 0),"
        " CASE WHEN count(gas_usd) = count(gas_native) THEN coalesce(sum(gas_usd), 0) END,"
        " CASE WHEN count(net_amount) = count(*) THEN sum(net_amount) END"
        f" FROM ({sql}) AS lines GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2 DESC, 4, 6, 3",
        params,
    )
    return [SummaryLine(*row) for row in cursor.fetchall()]


def _ticker(progress: Progress | None, total: int) -> Callable[[int], None]:
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
    parts = _parts(flt, usd_rates, words=True)
    digest = hashlib.sha256()
    with _snapshot(flt.tz) as cursor:
        # First: its counts are the progress's total.
        summary = _summary(cursor, *_all(_parts(flt, usd_rates, ordered=False, names=SUMMARY_SOURCE)))
        tick = _ticker(progress, sum(line.rows for line in summary))
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
    parts = _parts(flt, usd_rates)
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
    with _snapshot(flt.tz) as cursor:
        summary = _summary(cursor, *_all(_parts(flt, usd_rates, ordered=False, names=SUMMARY_SOURCE)))
        tick = _ticker(progress, sum(line.rows for line in summary))
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def paid_total(summary: list[SummaryLine]) -> dict[tuple[str, str], Decimal]:
    """Paid amount of our own payments per (network, asset) of a summary: what the dashboard
    calls revenue."""
    out: dict[tuple[str, str], Decimal] = {}
    for line in summary:
        if line.kind == KIND_PAYMENT and line.ours and line.status in PAID_STATUSES:
            out[(line.network, line.asset)] = out.get((line.network, line.asset), Decimal(0)) + line.amount
    return out



def summarize(flt: LedgerFilter) -> list[SummaryLine]:
    """The export's summary for ``flt`` without writing its data (the dashboard's net)."""
    with _snapshot(flt.tz) as cursor:
        return _summary(cursor, *_all(_parts(flt, rates(), ordered=False, names=SUMMARY_SOURCE)))


def net_total(summary: list[SummaryLine]) -> Decimal | None:
    """Revenue net of refunds and gas, the one definition the dashboard and the exports share:
    the sum of the lines' ``net_amount`` (our paid amounts, minus confirmed refunds, minus every
    transaction's gas in USD at finance's rates, also the gas of payments we settled for other
    merchants). None when some gas has no rate yet."""
    if any(line.net_amount is None for line in summary):
        return None
    return sum((line.net_amount for line in summary if line.net_amount is not None), Decimal(0))
