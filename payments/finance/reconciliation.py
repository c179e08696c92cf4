"""Reconciliation to the chain: every token Transfer to our pay-to addresses in a period, beside
the ledger's paid payments (and our channel settles, for what the channels' contract sent), in
finance's terms.

A line is *matched* when a Transfer and a paid payment agree on transaction, payer and amount
(one batch transaction carries many Transfers: they are paired one to one, in log order against
settlement order); a Transfer no payment accounts for is *on chain only* (someone paid pay-to
directly, or the ledger missed a payment); a payment the ledger counts as paid with no such
Transfer is *ledger only*.

The chain's Transfers are read by :mod:`payments.finance.chain_transfers`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db.models import Q, TextChoices
from eth_account import Account
from eth_utils import to_checksum_address

from payments.channels.models import ChannelTx, ChannelTxStatus
from payments.finance.chain_transfers import Blocks, transfers
from payments.models import (
    PAID_STATUSES,
    ChainTransfer,
    Payment,
    ReconciliationNote,
    Refund,
    RefundStatus,
    SettlementTx,
    TransferDirection,
)
from payments.options import ConfiguredOption, configured
from payments.x402.batch_settlement import BATCH_SETTLEMENT_ADDRESS
from x402site.conf import x402


class LineKind(TextChoices):
    PAYMENT = "payment", "Payment (to our pay-to)"
    REFUND = "refund", "Refund (from our refund wallet)"
    CHANNEL_SETTLE = "channel_settle", "Channel settle (claimed channel funds to our pay-to)"


class LineStatus(TextChoices):
    MATCHED = "matched", "Matched"
    CHAIN_ONLY = "chain_only", "On chain, not in the ledger"
    LEDGER_ONLY = "ledger_only", "Paid in the ledger, not on chain"


#: Lines that need finance's attention.
UNMATCHED = frozenset({LineStatus.CHAIN_ONLY, LineStatus.LEDGER_ONLY})


@dataclass(frozen=True, slots=True)
class Period:
    """[since, until), both aware datetimes."""

    since: datetime
    until: datetime

    def __post_init__(self) -> None:
        if self.since.tzinfo is None or self.until.tzinfo is None:
            raise ValueError("a period needs aware datetimes")
        if self.until <= self.since:
            raise ValueError("a period ends after it starts")


@dataclass(frozen=True, slots=True)
class Note:
    author: str
    reason: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Line:
    status: LineStatus
    network: str
    asset: str
    symbol: str
    decimals: int
    #: Our address: the pay-to (a payment), the refund wallet (a refund).
    pay_to: str
    #: The customer: who paid (a payment), who was paid back (a refund).
    payer: str
    amount: int
    tx_hash: str
    block_number: int | None
    #: The block's time for a chain line, the ledger's settlement time for a ledger-only line.
    time: datetime | None
    log_index: int | None = None
    payment_id: UUID | None = None
    kind: str = LineKind.PAYMENT
    refund_id: int | None = None
    notes: tuple[Note, ...] = ()

    @property
    def amount_decimal(self) -> Decimal:
        return Decimal(self.amount).scaleb(-self.decimals)

    @property
    def needs_attention(self) -> bool:
        return self.status in UNMATCHED

    @property
    def key(self) -> str:
        """What a note names: ``payment:<id>``, ``refund:<id>`` or ``log:<network>:<tx>:<index>``."""
        if self.status == LineStatus.LEDGER_ONLY and self.kind != LineKind.CHANNEL_SETTLE:
            return f"refund:{self.refund_id}" if self.kind == LineKind.REFUND else f"payment:{self.payment_id}"
        return f"log:{self.network}:{self.tx_hash}:{self.log_index}"


@dataclass(frozen=True, slots=True)
class Total:
    kind: str
    status: str
    network: str
    symbol: str
    asset: str
    count: int
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Scan:
    """Which blocks of one of our addresses the report read: Transfers to a pay-to (payments),
    or from a refund wallet (refunds)."""

    network: str
    asset: str
    address: str
    kind: str
    first_block: int
    last_block: int
    head: int


@dataclass(frozen=True)
class Report:
    period: Period
    lines: tuple[Line, ...]
    scans: tuple[Scan, ...]

    def totals(self) -> list[Total]:
        acc: dict[tuple[str, str, str, str, str], list[Any]] = {}
        for line in self.lines:
            key = (line.kind, line.status, line.network, line.symbol, line.asset)
            entry = acc.setdefault(key, [0, Decimal(0)])
            entry[0] += 1
            entry[1] += line.amount_decimal
        return [Total(k, s, n, sym, a, c, amt) for (k, s, n, sym, a), (c, amt) in sorted(acc.items())]

    def count(self, status: str, kind: str = LineKind.PAYMENT) -> int:
        return sum(1 for line in self.lines if line.status == status and line.kind == kind)

    def amount(self, status: str, kind: str = LineKind.PAYMENT) -> Decimal:
        return sum(
            (line.amount_decimal for line in self.lines if line.status == status and line.kind == kind), Decimal(0)
        )

    @property
    def unexplained(self) -> list[Line]:
        """Unmatched lines nobody has annotated yet."""
        return [line for line in self.lines if line.needs_attention and not line.notes]


def _paid_in(conf: ConfiguredOption, period: Period, first: int, last: int) -> list[Payment]:
    """The ledger's paid payments to the option's pay-to in the period: ``Payment.objects.ours()``,
    the dashboard's revenue (facilitator-API payments to our pay-to included, those to other
    merchants never), mined in its blocks, or (no block recorded) settled in it."""
    option = conf.option
    return list(
        Payment.objects.ours()
        .filter(
            Q(block_number__gte=first, block_number__lte=last)
            | Q(block_number=None, settled_at__gte=period.since, settled_at__lt=period.until),
            network=option.network,
            asset=option.asset,
            pay_to=option.pay_to,
            status__in=PAID_STATUSES,
        )
        .order_by("settle_tx_hash", "settlement_index", "created_at")
    )


def _notes(lines: list[Line]) -> list[Line]:
    """``lines`` with their notes attached."""
    ledger_only = [line for line in lines if line.status == LineStatus.LEDGER_ONLY]
    payment_ids = [line.payment_id for line in ledger_only if line.kind == LineKind.PAYMENT]
    refund_ids = [line.refund_id for line in ledger_only if line.kind == LineKind.REFUND]
    hashes = [line.tx_hash for line in lines if line.status == LineStatus.CHAIN_ONLY]
    if not payment_ids and not refund_ids and not hashes:
        return lines
    by_key: dict[str, list[Note]] = defaultdict(list)
    for n in ReconciliationNote.objects.filter(
        Q(payment_id__in=payment_ids) | Q(refund_id__in=refund_ids) | Q(tx_hash__in=hashes)
    ).select_related("author"):
        if n.payment_id:
            key = f"payment:{n.payment_id}"
        elif n.refund_id:
            key = f"refund:{n.refund_id}"
        else:
            key = f"log:{n.network}:{n.tx_hash}:{n.log_index}"
        by_key[key].append(Note(str(n.author or "command"), n.reason, n.created_at))
    return [replace(line, notes=tuple(by_key[line.key])) if by_key.get(line.key) else line for line in lines]


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger record that should have moved tokens: a paid payment, a sent refund."""

    tx_hash: str
    #: The customer's address (payer of a payment, recipient of a refund); the channels'
    #: contract for a channel settle.
    counterparty: str
    amount: int
    block_number: int | None
    time: datetime | None
    payment_id: UUID | None
    refund_id: int | None = None


def match(conf: ConfiguredOption, kind: str, ours: str, found: list[ChainTransfer], entries: list[Entry]) -> list[Line]:
    """Pair Transfers with ledger entries on (transaction, customer, amount), one to one (a
    batch's Transfers in log order against its payments in settlement order)."""
    option = conf.option
    waiting: dict[tuple[str, str, int], list[Entry]] = defaultdict(list)
    for e in entries:
        waiting[(e.tx_hash.lower(), e.counterparty.lower(), e.amount)].append(e)

    def line(status: LineStatus, **kw: Any) -> Line:
        return Line(
            status=status,
            kind=kind,
            network=option.network,
            asset=option.asset,
            symbol=option.symbol,
            decimals=option.decimals,
            pay_to=ours,
            **kw,
        )

    lines = []
    for t in found:
        customer = t.recipient if kind == LineKind.REFUND else t.sender
        candidates = waiting.get((t.tx_hash.lower(), customer.lower(), int(t.amount)))
        e = candidates.pop(0) if candidates else None
        lines.append(
            line(
                LineStatus.MATCHED if e else LineStatus.CHAIN_ONLY,
                payer=customer,
                amount=int(t.amount),
                tx_hash=t.tx_hash,
                block_number=t.block_number,
                time=t.block_time,
                log_index=t.log_index,
                payment_id=e.payment_id if e else None,
                refund_id=e.refund_id if e else None,
            )
        )
    for rest in waiting.values():
        for e in rest:
            lines.append(
                line(
                    LineStatus.LEDGER_ONLY,
                    payer=e.counterparty,
                    amount=e.amount,
                    tx_hash=e.tx_hash,
                    block_number=e.block_number,
                    time=e.time,
                    payment_id=e.payment_id,
                    refund_id=e.refund_id,
                )
            )
    return lines


def channel_settles_exist(conf: ConfiguredOption) -> bool:
    return SettlementTx.objects.filter(network=conf.option.network, kind=SettlementTx.Kind.CHANNEL_SETTLE).exists()


def _channel_settles_in(conf: ConfiguredOption, period: Period, first: int, last: int) -> list[Entry]:
    """Our mined channel settles to the option's pay-to in the period's blocks: each moved what
    its row says from the channels' contract to pay-to."""
    rows = ChannelTx.objects.filter(
        tx__network=conf.option.network,
        tx__kind=SettlementTx.Kind.CHANNEL_SETTLE,
        tx__block_number__gte=first,
        tx__block_number__lte=last,
        status=ChannelTxStatus.MINED,
    ).select_related("tx")
    return [
        Entry(r.tx.tx_hash, BATCH_SETTLEMENT_ADDRESS, int(r.amount), r.tx.block_number, r.finished_at, None)
        for r in rows
    ]


def _refunds_in(conf: ConfiguredOption, sender: str, period: Period, first: int, last: int) -> list[Entry]:
    """The refunds our wallet ``sender`` sent in the period (mined in its blocks, or not yet
    mined and sent in it)."""
    option = conf.option
    rows = Refund.objects.filter(
        Q(block_number__gte=first, block_number__lte=last)
        | Q(block_number=None, sent_at__gte=period.since, sent_at__lt=period.until),
        network=option.network,
        asset=option.asset,
        sender=sender,
        status__in=[RefundStatus.SENT, RefundStatus.CONFIRMED, RefundStatus.REVIEW],
    ).order_by("sent_at")
    return [
        Entry(r.tx_hash, r.recipient, int(r.amount), r.block_number, r.sent_at, r.payment_id, r.pk) for r in rows
    ]


def _refund_wallets(conf: ConfiguredOption) -> list[str]:
    """Our refund wallet, and any that sent refunds of this option before."""
    current = {to_checksum_address(Account.from_key(x402.refunds.key).address)} if x402.refunds.key else set()
    earlier = Refund.objects.filter(network=conf.option.network, asset=conf.option.asset).exclude(sender="")
    return sorted(current | set(earlier.values_list("sender", flat=True).distinct()))


def report(period: Period, *, network: str = "") -> Report:
    """The reconciliation of every configured option (or those of ``network``) for ``period``."""
    lines: list[Line] = []
    scans = []
    for conf in configured():
        option = conf.option
        if network and option.network != network:
            continue
        blocks = Blocks(conf.rpc_url)
        head = blocks.head()
        first = blocks.first_at_or_after(period.since, head)
        last = blocks.first_at_or_after(period.until, head) - 1
        found = transfers(conf, option.pay_to, TransferDirection.TO, first, last, head=head, blocks=blocks)
        paid = [
            Entry(p.settle_tx_hash or "", p.payer, int(p.amount), p.block_number, p.settled_at, p.pk)
            for p in _paid_in(conf, period, first, last)
        ]
        # What the channels' contract sent to pay-to is a channel settle's, not a payment's.
        contract = BATCH_SETTLEMENT_ADDRESS.lower()
        from_channels = [t for t in found if t.sender.lower() == contract]
        found = [t for t in found if t.sender.lower() != contract]
        lines += match(conf, LineKind.PAYMENT, option.pay_to, found, paid)
        if from_channels or channel_settles_exist(conf):
            settles = _channel_settles_in(conf, period, first, last)
            lines += match(conf, LineKind.CHANNEL_SETTLE, option.pay_to, from_channels, settles)
        scans.append(Scan(option.network, option.asset, option.pay_to, LineKind.PAYMENT, first, last, head))
        for wallet in _refund_wallets(conf):
            sent = transfers(conf, wallet, TransferDirection.FROM, first, last, head=head, blocks=blocks)
            lines += match(conf, LineKind.REFUND, wallet, sent, _refunds_in(conf, wallet, period, first, last))
            scans.append(Scan(option.network, option.asset, wallet, LineKind.REFUND, first, last, head))
    lines.sort(key=lambda line: (line.time or period.until, line.tx_hash, line.log_index or 0))
    return Report(period, tuple(_notes(lines)), tuple(scans))


def annotate(key: str, reason: str, *, author: Any) -> ReconciliationNote:
    """Record finance's note on a line named by :attr:`Line.key`; ValueError for a malformed key."""
    reason = reason.strip()
    if not reason:
        raise ValueError("a note needs a reason")
    author = author if getattr(author, "is_authenticated", False) else None
    kind, _, rest = key.partition(":")
    if kind == "refund":
        refund = Refund.objects.filter(pk=int(rest)).first() if rest.isdigit() else None
        if refund is None:
            raise ValueError(f"no such refund: {rest!r}")
        return ReconciliationNote.objects.create(refund=refund, author=author, reason=reason)
    if kind == "payment":
        try:
            payment = Payment.objects.get(pk=UUID(rest))
        except (ValueError, Payment.DoesNotExist):
            raise ValueError(f"no such payment: {rest!r}") from None
        return ReconciliationNote.objects.create(payment=payment, author=author, reason=reason)
    if kind == "log":
        net, tx_hash, index = (rest.rsplit(":", 2) + ["", ""])[:3]
        if not (net and len(tx_hash) == 66 and tx_hash.startswith("0x") and index.isdigit()):
            raise ValueError(f"not a log key: {key!r}")
        return ReconciliationNote.objects.create(
            network=net, tx_hash=tx_hash.lower(), log_index=int(index), author=author, reason=reason
        )
    raise ValueError(f"not a line key: {key!r}")
