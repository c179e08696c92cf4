"""The ledger's lines, as the exports read them: one row per payment, one per refund with its
amount negative, one per request charged on a payment channel and one per transaction sent for
channels, in the columns :data:`COLUMNS` names; and their summary (totals per kind, status and
asset, never inside the data).

Periods are by creation or by the date the money arrived, bounds and shown times in the time
zone finance picks. Revenue is shown net of gas: gas in the chain's native token, converted at
the newest :class:`NativeTokenRate` finance set for the network (no price feed is reachable);
a network with no rate has no net figure rather than a wrong one. Stablecoin amounts count as
USD one for one.

Every read is in one REPEATABLE READ snapshot (:func:`snapshot`), so the rows, their count and
the summary agree even while payments settle. The writers: :mod:`payments.finance.exports`
(CSV) and :mod:`payments.finance.xlsx`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db import connection, transaction
from django.db.models import (
    BigIntegerField,
    BooleanField,
    Case,
    CharField,
    DecimalField,
    Expression,
    F,
    Func,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    TextField,
    UUIDField,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Concat, Replace

from payments.channels.models import ChannelCharge, ChannelTx
from payments.finance.reports import MONEY_AT, DateBasis, LedgerFilter
from payments.models import (
    CHARGED_STATUSES,
    PAID_STATUSES,
    NativeTokenRate,
    Payment,
    Refund,
    RefundStatus,
    SettlementTx,
    for_others_q,
)
from payments.options import configured
from payments.x402.batch_settlement import SCHEME_BATCH_SETTLEMENT

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
#: A request charged on a ``batch-settlement`` channel, and a transaction sent for channels.
KIND_CHANNEL_CHARGE = "channel_charge"
KIND_CHANNEL_TX = "channel_tx"
#: A channel charge's status: earned, or also claimed on chain (the channel's claimed total covers it).
CHANNEL_CHARGED = "charged"
CHANNEL_CLAIMED = "claimed"
CHANNEL_TX_KINDS = (
    SettlementTx.Kind.CHANNEL_DEPOSIT,
    SettlementTx.Kind.CHANNEL_CLAIM,
    SettlementTx.Kind.CHANNEL_SETTLE,
    SettlementTx.Kind.CHANNEL_REFUND,
)
#: Decimals of the native token (wei).
NATIVE_DECIMALS = 18
USD_PLACES = 6


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


def _by_network(values: dict[str, Any], network: str = "network") -> Expression:
    whens = [When(**{network: name}, then=Value(v)) for name, v in values.items()]
    return Case(*whens, default=Value(None), output_field=DecimalField()) if whens else Value(None, DecimalField())


def _symbol(network: str = "network", asset: str = "asset") -> Expression:
    symbols = [
        When(**{network: c.option.network, asset: c.option.asset}, then=Value(c.option.symbol)) for c in configured()
    ]
    return Case(*symbols, default=Value(""), output_field=CharField()) if symbols else Value("")


def _option_value(network: str, attribute: str, default: Any, field: Any) -> Expression:
    """A configured option's ``attribute`` by the row's network (channels carry no decimals)."""
    whens = [When(**{network: c.option.network}, then=Value(getattr(c.option, attribute))) for c in configured()]
    return Case(*whens, default=Value(default), output_field=field) if whens else Value(default, field)


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


def _period(qs: QuerySet[Any], flt: LedgerFilter, created: str, money: str) -> QuerySet[Any]:
    date = money if flt.basis == DateBasis.MONEY else created
    if flt.since:
        qs = qs.filter(**{f"{date}__gte": flt.since})
    if flt.until:
        qs = qs.filter(**{f"{date}__lt": flt.until})
    return qs


def channel_charge_lines(
    flt: LedgerFilter, usd_rates: dict[str, Rate], names: list[str] = NAMES
) -> QuerySet[ChannelCharge, dict[str, Any]]:
    """The channel lines: one row per request charged on a ``batch-settlement`` channel, earned
    when charged (status ``charged``) and on chain once the channel's claimed total covers it
    (``claimed``: the revenue net_amount counts, as a payment's once settled). No gas of its own:
    the channel transactions carry it."""
    decimals = _option_value("channel__network", "decimals", 6, IntegerField())
    claimed = Q(cumulative__lte=F("channel__total_claimed"))
    status = Case(
        When(claimed, then=Value(CHANNEL_CLAIMED)), default=Value(CHANNEL_CHARGED), output_field=CharField()
    )
    on_chain = Case(When(claimed, then=F("amount")), default=Value(0), output_field=DecimalField())
    columns: dict[str, Any] = {
        "kind": Value(KIND_CHANNEL_CHARGE, CharField()),
        "payment_id": Value(None, UUIDField()),
        "created_at": F("created_at"),
        "money_at": F("created_at"),
        "status": status,
        "network": F("channel__network"),
        "asset_symbol": _symbol("channel__network", "channel__asset"),
        "asset": F("channel__asset"),
        "payer": F("channel__payer"),
        "pay_to": F("channel__receiver"),
        "amount_atomic": F("amount"),
        "amount": _Scaled(F("amount"), decimals),
        "charged_atomic": F("amount"),
        "charged": _Scaled(F("amount"), decimals),
        "gas_native": Value(0, DecimalField()),
        "gas_usd": Value(0, DecimalField()),
        "net_amount": _Scaled(on_chain, decimals),
        "model": _model("prediction"),
        "version": F("prediction__version_id"),
        "hardware_tier": F("prediction__model__hardware__slug"),
        "prediction_ref": F("prediction__ref"),
        "prediction_status": F("prediction__status"),
        "transaction": Value("", CharField()),
        "block_number": Value(None, BigIntegerField()),
        "confirmations": Value(None, BigIntegerField()),
        "gas_cost_wei": Value(None, DecimalField()),
        "verification": Value("voucher", CharField()),
        "ours": Value(True, BooleanField()),
        "failure_reason": Value("", CharField()),
        "scheme": Value(SCHEME_BATCH_SETTLEMENT, CharField()),
        "maximum_atomic": F("max_claimable"),
        "maximum": _Scaled(F("max_claimable"), decimals),
        "run_seconds": Value(None, DecimalField()),
    }
    qs = _period(ChannelCharge.objects.all(), flt, "created_at", "created_at")
    if flt.statuses:
        qs = qs.alias(x_state=status).filter(x_state__in=flt.statuses)
    if flt.model:
        owner, _, name = flt.model.partition("/")
        qs = qs.filter(prediction__model__owner=owner, prediction__model__name=name)
    if flt.network:
        qs = qs.filter(channel__network=flt.network)
    return _values(qs, columns, names)


def channel_tx_lines(
    flt: LedgerFilter, usd_rates: dict[str, Rate], names: list[str] = NAMES
) -> QuerySet[SettlementTx, dict[str, Any]]:
    """The channel transactions our lanes sent (deposits relayed for payers, claims, settles to
    pay-to, cooperative refunds): their gas is our cost (net_amount = -gas_usd); a settle's
    amount is what it moved to pay-to (``charged`` once mined), a deposit's or refund's the
    payer's money in or out of escrow (not ours), a claim's nothing (it moves nothing to us)."""
    rate = _by_network({n: r.usd_per_token for n, r in usd_rates.items()})
    decimals = _option_value("network", "decimals", 6, IntegerField())
    links = ChannelTx.objects.filter(tx=OuterRef("pk"))
    moved = Subquery(links.values("tx").annotate(t=Sum("amount")).values("t")[:1], output_field=DecimalField())
    amount = Case(When(kind=SettlementTx.Kind.CHANNEL_CLAIM, then=Value(0)), default=Coalesce(moved, Value(0)), output_field=DecimalField())
    state = Subquery(links.values("status")[:1], output_field=CharField())
    mined = Q(kind=SettlementTx.Kind.CHANNEL_SETTLE, block_number__isnull=False)
    charged = Case(When(mined, then=amount), default=Value(0), output_field=DecimalField())
    columns: dict[str, Any] = {
        "kind": Value(KIND_CHANNEL_TX, CharField()),
        "payment_id": Value(None, UUIDField()),
        "created_at": F("created_at"),
        "money_at": F("broadcast_at"),
        "status": Concat(F("kind"), Value(":"), Coalesce(state, Value(""))),
        "network": F("network"),
        "asset_symbol": _option_value("network", "symbol", "", CharField()),
        "asset": _option_value("network", "asset", "", CharField()),
        "payer": Value("", CharField()),
        "pay_to": _option_value("network", "pay_to", "", CharField()),
        "amount_atomic": amount,
        "amount": _Scaled(amount, decimals),
        "charged_atomic": charged,
        "charged": _Scaled(charged, decimals),
        "gas_native": _Scaled(F("gas_cost_wei"), Value(NATIVE_DECIMALS)),
        "gas_usd": _Usd(F("gas_cost_wei"), rate),
        "net_amount": -_Usd(Coalesce(F("gas_cost_wei"), Value(0)), rate),
        "model": Value("", CharField()),
        "version": Value("", CharField()),
        "hardware_tier": Value("", CharField()),
        "prediction_ref": Value("", CharField()),
        "prediction_status": Value("", CharField()),
        "transaction": F("tx_hash"),
        "block_number": F("block_number"),
        "confirmations": Value(None, BigIntegerField()),
        "gas_cost_wei": F("gas_cost_wei"),
        "verification": Value("", CharField()),
        "ours": Value(True, BooleanField()),
        "failure_reason": Value("", CharField()),
        "scheme": Value(SCHEME_BATCH_SETTLEMENT, CharField()),
        "maximum_atomic": Value(None, DecimalField()),
        "maximum": Value(None, DecimalField()),
        "run_seconds": Value(None, DecimalField()),
    }
    qs = _period(SettlementTx.objects.filter(kind__in=CHANNEL_TX_KINDS), flt, "created_at", "broadcast_at")
    if flt.statuses:
        qs = qs.alias(x_state=columns["status"]).filter(x_state__in=flt.statuses)
    if flt.network:
        qs = qs.filter(network=flt.network)
    return _values(qs, columns, names)


Query = tuple[str, tuple[Any, ...]]


def data_queries(
    flt: LedgerFilter,
    usd_rates: dict[str, Rate],
    *,
    ordered: bool = True,
    names: list[str] = NAMES,
    words: bool = False,
) -> list[Query]:
    """The data queries, columns named as :data:`NAMES`, each oldest first by the filter's
    date: the payment lines, the refund lines, then the channels' charges and transactions.
    Ordered queries, not one sorted union:
    the payments' order comes from the (created_at, id) index instead of sorting a million
    wide rows. ``words``: booleans as ``true``/``false`` (CSV), not COPY's ``t``/``f``."""
    order = "money_at" if flt.basis == DateBasis.MONEY else "created_at"
    types = dict(COLUMNS)
    outer = ", ".join(
        f'"x_{n}"::text AS "{n}"' if words and types[n] == "bool" else f'"x_{n}" AS "{n}"' for n in names
    )
    parts = []
    kinds = [payment_lines, refund_lines, channel_charge_lines]
    if not flt.model:  # a channel transaction serves many requests, of any model
        kinds.append(channel_tx_lines)
    for lines in (kind(flt, usd_rates, names) for kind in kinds):
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


@contextmanager
def snapshot(tz: str) -> Iterator[Any]:
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


def read_summary(cursor: Any, flt: LedgerFilter, usd_rates: dict[str, Rate]) -> list[SummaryLine]:
    """The summary of the lines ``flt`` selects, read in ``cursor`` (a :func:`snapshot`'s)."""
    sql, params = _all(data_queries(flt, usd_rates, ordered=False, names=SUMMARY_SOURCE))
    cursor.execute(
        "SELECT kind, ours, status, network, asset_symbol, asset, count(*), sum(amount),"
        " coalesce(sum(gas_native), 0),"
        " CASE WHEN count(gas_usd) = count(gas_native) THEN coalesce(sum(gas_usd), 0) END,"
        " CASE WHEN count(net_amount) = count(*) THEN sum(net_amount) END"
        f" FROM ({sql}) AS lines GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2 DESC, 4, 6, 3",
        params,
    )
    return [SummaryLine(*row) for row in cursor.fetchall()]


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
    with snapshot(flt.tz) as cursor:
        return read_summary(cursor, flt, rates())


def net_total(summary: list[SummaryLine]) -> Decimal | None:
    """Revenue net of refunds and gas, the one definition the dashboard and the exports share:
    the sum of the lines' ``net_amount`` (our paid amounts, minus confirmed refunds, minus every
    transaction's gas in USD at finance's rates, also the gas of payments we settled for other
    merchants). None when some gas has no rate yet."""
    if any(line.net_amount is None for line in summary):
        return None
    return sum((line.net_amount for line in summary if line.net_amount is not None), Decimal(0))
