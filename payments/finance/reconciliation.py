"""Reconciliation to the chain: every token Transfer to our pay-to addresses in a period, beside
the ledger's paid payments, in finance's terms.

A line is *matched* when a Transfer and a paid payment agree on transaction, payer and amount
(one batch transaction carries many Transfers: they are paired one to one, in log order against
settlement order); a Transfer no payment accounts for is *on chain only* (someone paid pay-to
directly, or the ledger missed a payment); a payment the ledger counts as paid with no such
Transfer is *ledger only*.

The chain is read in bounded block ranges (providers cap ``eth_getLogs`` spans); blocks with
the option's confirmations are read once and kept (:class:`ScannedRange`, :class:`ChainTransfer`),
newer ones are read afresh each time (a reorg may still change them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import Q, TextChoices
from eth_account import Account
from eth_utils import to_checksum_address

from payments.chain.abi import TRANSFER_TOPIC
from payments.chain.node import ChainUnavailable, RpcError, rpc, rpc_batch
from payments.models import (
    PAID_STATUSES,
    ChainTransfer,
    Payment,
    ReconciliationNote,
    Refund,
    RefundStatus,
    ScannedRange,
    TransferDirection,
)
from payments.options import ConfiguredOption, configured


class LineKind(TextChoices):
    PAYMENT = "payment", "Payment (to our pay-to)"
    REFUND = "refund", "Refund (from our refund wallet)"


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
        if self.status == LineStatus.LEDGER_ONLY:
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


# --- the chain ---------------------------------------------------------------------------------


def _word(address: str) -> str:
    return "0x" + address[2:].lower().rjust(64, "0")


def _address(topic: str) -> str:
    return to_checksum_address("0x" + topic[-40:])


class _Blocks:
    """Block timestamps of one chain, each read once per report."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: dict[int, int] = {}

    def head(self) -> int:
        return int(rpc(self.url, "eth_blockNumber", []), 16)

    def time(self, number: int) -> int:
        if number not in self.times:
            self.load([number])
        return self.times[number]

    def load(self, numbers: Iterable[int]) -> None:
        missing = sorted({n for n in numbers if n not in self.times})
        for i in range(0, len(missing), 100):
            part = missing[i : i + 100]
            blocks = rpc_batch(self.url, [("eth_getBlockByNumber", [hex(n), False]) for n in part])
            for n, block in zip(part, blocks, strict=True):
                if not block:
                    raise ChainUnavailable(f"block {n} is unknown to the node")
                self.times[n] = int(block["timestamp"], 16)

    def first_at_or_after(self, when: datetime, head: int) -> int:
        """The lowest block stamped at or after ``when`` (``head + 1`` if none is yet)."""
        target = int(when.timestamp())
        low, high = 0, head + 1
        while low < high:
            mid = (low + high) // 2
            if self.time(mid) >= target:
                high = mid
            else:
                low = mid + 1
        return low


def _covered(
    conf: ConfiguredOption, address: str, direction: str, first: int, last: int
) -> list[tuple[int, int]]:
    """The stored ranges overlapping [first, last], in order."""
    return list(
        ScannedRange.objects.filter(
            network=conf.option.network,
            asset=conf.option.asset,
            address=address,
            direction=direction,
            from_block__lte=last,
            to_block__gte=first,
        )
        .order_by("from_block")
        .values_list("from_block", "to_block")
    )


def gaps(covered: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The parts of [first, last] no range of ``covered`` (sorted by start) holds."""
    out, cursor = [], first
    for start, end in covered:
        if start > cursor:
            out.append((cursor, min(start - 1, last)))
        cursor = max(cursor, end + 1)
        if cursor > last:
            break
    if cursor <= last:
        out.append((cursor, last))
    return out


def _read_logs(
    conf: ConfiguredOption, address: str, direction: str, first: int, last: int, blocks: _Blocks
) -> list[ChainTransfer]:
    """Transfer logs to (or from) ``address`` in [first, last], read ``X402_LOG_SPAN_BLOCKS`` at
    a time; unsaved rows."""
    topics = (
        [TRANSFER_TOPIC, None, _word(address)]
        if direction == TransferDirection.TO
        else [TRANSFER_TOPIC, _word(address)]
    )
    span = max(1, settings.X402_LOG_SPAN_BLOCKS)
    logs: list[dict[str, Any]] = []
    for start in range(first, last + 1, span):
        end = min(last, start + span - 1)
        try:
            logs += rpc(
                conf.rpc_url,
                "eth_getLogs",
                [
                    {
                        "address": conf.option.asset,
                        "fromBlock": hex(start),
                        "toBlock": hex(end),
                        "topics": topics,
                    }
                ],
            )
        except RpcError as exc:
            raise ChainUnavailable(f"eth_getLogs {start}-{end}: {exc}") from exc
    blocks.load(int(entry["blockNumber"], 16) for entry in logs if not entry.get("removed"))
    return [
        ChainTransfer(
            network=conf.option.network,
            asset=conf.option.asset,
            tx_hash=entry["transactionHash"].lower(),
            log_index=int(entry["logIndex"], 16),
            block_number=int(entry["blockNumber"], 16),
            block_time=datetime.fromtimestamp(blocks.time(int(entry["blockNumber"], 16)), UTC),
            sender=_address(entry["topics"][1]),
            recipient=_address(entry["topics"][2]),
            amount=int(entry["data"], 16),
        )
        for entry in logs
        if not entry.get("removed")
    ]


def transfers(
    conf: ConfiguredOption, address: str, direction: str, first: int, last: int, *, head: int, blocks: _Blocks
) -> list[ChainTransfer]:
    """Every Transfer to (or from) ``address`` of the option's token in blocks [first, last]:
    final blocks from the store (read and stored first where never read), the newest blocks
    read live."""
    if last < first:
        return []
    final = min(last, head - max(conf.option.confirmations, 1) + 1)
    for start, end in gaps(_covered(conf, address, direction, first, final), first, final):
        found = _read_logs(conf, address, direction, start, end, blocks)
        with transaction.atomic():
            ChainTransfer.objects.bulk_create(found, ignore_conflicts=True)
            ScannedRange.objects.create(
                network=conf.option.network,
                asset=conf.option.asset,
                address=address,
                direction=direction,
                from_block=start,
                to_block=end,
            )
    side = Q(recipient=address) if direction == TransferDirection.TO else Q(sender=address)
    stored = list(
        ChainTransfer.objects.filter(
            side,
            network=conf.option.network,
            asset=conf.option.asset,
            block_number__gte=first,
            block_number__lte=final,
        ).order_by("block_number", "log_index")
    )
    live = _read_logs(conf, address, direction, max(first, final + 1), last, blocks) if last > final else []
    return stored + live


# --- the ledger beside it ------------------------------------------------------------------------


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
    #: The customer's address (payer of a payment, recipient of a refund).
    counterparty: str
    amount: int
    block_number: int | None
    time: datetime | None
    payment_id: UUID
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
        customer = t.sender if kind == LineKind.PAYMENT else t.recipient
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
    current = {to_checksum_address(Account.from_key(settings.X402_REFUND_KEY).address)} if settings.X402_REFUND_KEY else set()
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
        blocks = _Blocks(conf.rpc_url)
        head = blocks.head()
        first = blocks.first_at_or_after(period.since, head)
        last = blocks.first_at_or_after(period.until, head) - 1
        found = transfers(conf, option.pay_to, TransferDirection.TO, first, last, head=head, blocks=blocks)
        paid = [
            Entry(p.settle_tx_hash or "", p.payer, int(p.amount), p.block_number, p.settled_at, p.pk)
            for p in _paid_in(conf, period, first, last)
        ]
        lines += match(conf, LineKind.PAYMENT, option.pay_to, found, paid)
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
