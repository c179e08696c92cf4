"""Ledger queries shared by the exports and the finance dashboard, so their numbers agree.

Amounts are summed in atomic units per asset (never floats) and shown as decimals with the
asset's own decimals.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db.models import Count, F, QuerySet, Sum, TextChoices
from django.db.models.functions import Coalesce, TruncDate

from payments.channels.models import ChannelCharge, ChannelTx, ChannelTxStatus
from payments.models import Payment, PaymentStatus, SettlementTx
from payments.options import configured

S = PaymentStatus
#: Payments whose money is in (settled or confirmed): revenue.
PAID = (S.SETTLED, S.CONFIRMED)
#: Payments still on their way: pending settlement value.
PENDING = (S.VERIFIED, S.SETTLING)


class DateBasis(TextChoices):
    """Which date puts a payment in a period."""

    CREATED = "created", "Created (the payment was accepted)"
    MONEY = "money", "Money arrived (settled, else confirmed)"


#: The date money arrived: mined (settled), else confirmed (a payment may skip SETTLED).
MONEY_AT = Coalesce("settled_at", "confirmed_at")


@dataclass(frozen=True)
class LedgerFilter:
    since: datetime | None = None
    until: datetime | None = None
    statuses: tuple[str, ...] = ()
    model: str = ""  # "owner/name"
    network: str = ""
    basis: str = DateBasis.CREATED
    #: The time zone dates are shown in (the bounds are aware datetimes already).
    tz: str = "UTC"
    #: Only payments whose money is ours (the dashboard); exports keep the whole ledger.
    ours_only: bool = False

    def apply(self, qs: QuerySet[Payment]) -> QuerySet[Payment]:
        if self.basis == DateBasis.MONEY:
            qs = qs.alias(money_at=MONEY_AT)
            if self.since:
                qs = qs.filter(money_at__gte=self.since)
            if self.until:
                qs = qs.filter(money_at__lt=self.until)
        else:
            if self.since:
                qs = qs.filter(created_at__gte=self.since)
            if self.until:
                qs = qs.filter(created_at__lt=self.until)
        if self.statuses:
            qs = qs.filter(status__in=self.statuses)
        if self.model:
            owner, _, name = self.model.partition("/")
            qs = qs.filter(prediction__model__owner=owner, prediction__model__name=name)
        if self.network:
            qs = qs.filter(network=self.network)
        if self.ours_only:
            qs = qs.ours()
        return qs

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "statuses": list(self.statuses),
            "model": self.model,
            "network": self.network,
            "basis": self.basis,
            "tz": self.tz,
            "ours_only": self.ours_only,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerFilter:
        return cls(
            since=datetime.fromisoformat(data["since"]) if data.get("since") else None,
            until=datetime.fromisoformat(data["until"]) if data.get("until") else None,
            statuses=tuple(data.get("statuses") or ()),
            model=data.get("model", ""),
            network=data.get("network", ""),
            basis=data.get("basis", DateBasis.CREATED),
            tz=data.get("tz", "UTC"),
            ours_only=bool(data.get("ours_only", False)),
        )


@dataclass
class Totals:
    """Count and atomic amount per (status, network, asset), with each asset's decimals."""

    rows: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    decimals: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, status: str, network: str, asset: str, amount: int, decimals: int, count: int = 1) -> None:
        entry = self.rows.setdefault((status, network, asset), [0, 0])
        entry[0] += count
        entry[1] += amount
        self.decimals[(network, asset)] = decimals

    def by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (status, _, _), (count, _) in self.rows.items():
            out[status] = out.get(status, 0) + count
        return out

    def amount(self, statuses: tuple[str, ...]) -> dict[tuple[str, str], Decimal]:
        """Decimal amount per (network, asset) over the given statuses."""
        out: dict[tuple[str, str], Decimal] = {}
        for (status, network, asset), (_, atomic) in self.rows.items():
            if status in statuses:
                key = (network, asset)
                out[key] = out.get(key, Decimal(0)) + Decimal(atomic).scaleb(-self.decimals[key])
        return out

    def lines(self) -> list[tuple[str, str, str, int, Decimal]]:
        return [
            (status, network, asset, count, Decimal(atomic).scaleb(-self.decimals[(network, asset)]))
            for (status, network, asset), (count, atomic) in sorted(self.rows.items())
        ]


def totals(flt: LedgerFilter) -> Totals:
    """The same totals as an export's, by one aggregate query."""
    result = Totals()
    grouped = (
        flt.apply(Payment.objects.all())
        .values("status", "network", "asset", "decimals")
        .annotate(count=Count("id"), amount=Sum("amount"))
    )
    for row in grouped:
        result.add(
            row["status"], row["network"], row["asset"], int(row["amount"]), row["decimals"], row["count"]
        )
    return result


def revenue_by_day(flt: LedgerFilter) -> list[tuple[Any, Decimal]]:
    """Paid revenue (settled + confirmed) per day of the filter's basis and time zone, in
    USD(C), all stablecoin assets together."""
    rows = (
        flt.apply(Payment.objects.filter(status__in=PAID))
        .annotate(day=TruncDate(MONEY_AT if flt.basis == DateBasis.MONEY else "created_at", tzinfo=ZoneInfo(flt.tz)))
        .values("day", "decimals")
        .annotate(amount=Sum("amount"))
        .order_by("day")
    )
    out: dict[Any, Decimal] = {}
    for row in rows:
        out[row["day"]] = out.get(row["day"], Decimal(0)) + Decimal(row["amount"]).scaleb(-row["decimals"])
    return sorted(out.items())


def revenue_by_model(flt: LedgerFilter) -> list[tuple[str, Decimal, int]]:
    rows = (
        flt.apply(Payment.objects.filter(status__in=PAID))
        .values("prediction__model__owner", "prediction__model__name", "decimals")
        .annotate(amount=Sum("amount"), count=Count("id"))
    )
    out: dict[str, list[Any]] = {}
    for row in rows:
        owner = row["prediction__model__owner"]
        name = f"{owner}/{row['prediction__model__name']}" if owner else "(facilitator API)"
        entry = out.setdefault(name, [Decimal(0), 0])
        entry[0] += Decimal(row["amount"]).scaleb(-row["decimals"])
        entry[1] += row["count"]
    return sorted(((k, v[0], v[1]) for k, v in out.items()), key=lambda r: -r[1])


def needing_attention(flt: LedgerFilter, limit: int = 50) -> QuerySet[Payment]:
    return flt.apply(Payment.objects.filter(status__in=(S.FAILED, S.EXPIRED))).order_by("-created_at")[:limit]


def refunded(flt: LedgerFilter) -> Decimal:
    """Refunds confirmed (money sent back) in the filter's period: by confirmation for the money
    basis, else by creation; all stablecoin assets together."""
    from payments.models import Refund, RefundStatus

    qs = Refund.objects.filter(status=RefundStatus.CONFIRMED)
    date = "confirmed_at" if flt.basis == DateBasis.MONEY else "created_at"
    if flt.since:
        qs = qs.filter(**{f"{date}__gte": flt.since})
    if flt.until:
        qs = qs.filter(**{f"{date}__lt": flt.until})
    if flt.network:
        qs = qs.filter(network=flt.network)
    total = Decimal(0)
    for row in qs.values("decimals").annotate(amount=Sum("amount")):
        total += Decimal(row["amount"]).scaleb(-row["decimals"])
    return total


def moved_for_others(flt: LedgerFilter) -> Decimal:
    """Paid facilitator-API money that went to other merchants in the period (not revenue)."""
    rows = (
        replace(flt, ours_only=False)
        .apply(Payment.objects.for_others().filter(status__in=PAID))
        .values("decimals")
        .annotate(amount=Sum("amount"))
    )
    return sum((Decimal(row["amount"]).scaleb(-row["decimals"]) for row in rows), Decimal(0))


def usage_priced(flt: LedgerFilter, limit: int = 50) -> QuerySet[Payment]:
    """Pay-per-second (upto) payments, newest first: the maximum each permitted and the charge."""
    return flt.apply(Payment.objects.exclude(maximum=None)).order_by("-created_at")[:limit]


@dataclass(frozen=True, slots=True)
class ChannelFigures:
    """Payment channels (``batch-settlement``) of one token, in its units: what requests were
    charged (earned), the part the chain's claimed totals cover (claimed), and what settles
    moved to pay-to (settled); the payers' deposits relayed and refunds returned, for context."""

    network: str
    asset: str
    earned: Decimal
    claimed: Decimal
    settled: Decimal
    deposited: Decimal
    refunded: Decimal


def channel_figures(flt: LedgerFilter) -> list[ChannelFigures]:
    """Channel charges created in the filter's period (earned, claimed), and channel
    transactions mined in it (settled, deposited, refunded), per configured token."""
    out = []
    for conf in configured():
        option = conf.option
        if flt.network and option.network != flt.network:
            continue
        charges = ChannelCharge.objects.filter(channel__network=option.network, channel__asset=option.asset)
        txs = ChannelTx.objects.filter(tx__network=option.network, status=ChannelTxStatus.MINED)
        if flt.since:
            charges, txs = charges.filter(created_at__gte=flt.since), txs.filter(finished_at__gte=flt.since)
        if flt.until:
            charges, txs = charges.filter(created_at__lt=flt.until), txs.filter(finished_at__lt=flt.until)
        if flt.model:
            owner, _, name = flt.model.partition("/")
            charges = charges.filter(prediction__model__owner=owner, prediction__model__name=name)
        earned = charges.aggregate(t=Sum("amount"))["t"] or 0
        claimed = charges.filter(cumulative__lte=F("channel__total_claimed")).aggregate(t=Sum("amount"))["t"] or 0
        moved = dict(txs.values_list("tx__kind").annotate(t=Sum("amount")).order_by())
        if not (earned or moved):
            continue

        def units(atomic: Any, decimals: int = option.decimals) -> Decimal:
            return Decimal(atomic or 0).scaleb(-decimals)

        out.append(
            ChannelFigures(
                option.network,
                option.asset,
                units(earned),
                units(claimed),
                units(moved.get(SettlementTx.Kind.CHANNEL_SETTLE)),
                units(moved.get(SettlementTx.Kind.CHANNEL_DEPOSIT)),
                units(moved.get(SettlementTx.Kind.CHANNEL_REFUND)),
            )
        )
    return out
