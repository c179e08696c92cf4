"""Batched settlement: many ready payments per transaction, through our BatchSettler contract.

A payment is *ready* when it is VERIFIED and its settlement was asked for
(``settle_requested_at``). A batcher claims up to ``X402_BATCH_MAX`` ready payments of one
option with ``SELECT ... FOR UPDATE SKIP LOCKED`` (several batchers form disjoint batches in
parallel), once the batch is full or its oldest payment has waited ``X402_BATCH_MAX_AGE``
seconds. It simulates the batch with ``eth_call``: an item that would fail (used, expired,
unfunded) is dropped and goes LAPSING, where the chain decides what it became
(``lapsing.resolve_lapsing``). The rest are signed as one transaction on the least loaded
relayer lane, stored with every payment moved to SETTLING in **one** ledger transaction, then
broadcast. Each payment is still judged by its own ``AuthorizationUsed`` and ``Transfer`` logs
in the receipt (``evidence.transfer_matches``), so an item that fails on chain (front-run in
the same block, say) is never booked as paid.

Batches start from the paid request's commit: :func:`kick` (one cache write per batch window on
the hot path) queues a batcher that runs after ``X402_BATCH_MAX_AGE``; the reconciler's sweep
kicks again for anything left behind.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.utils import timezone
from eth_abi import decode, encode
from eth_utils import to_checksum_address

from payments.chain import lapsing, settlement, tracking
from payments.chain import relayer as relayers
from payments.chain.abi import BATCH_SETTLE, BATCH_SETTLE_TYPES
from payments.chain.calls import NOT_YET_VALID_MESSAGE, VALID_AFTER_WAIT_SECONDS, wait_for_valid_after
from payments.chain.node import ChainUnavailable, RpcError, rpc_batch
from payments.metrics import BATCH_SIZE
from payments.models import Payment, PaymentStatus, SettlementTx, UnpaidReason
from payments.options import ConfiguredOption, SettlementMode, for_payment
from payments.schemes import scheme_of
from x402site import dispatch
from x402site.conf import x402

log = logging.getLogger("payments.chain.batching")
S = PaymentStatus

#: Gas each item's transferWithAuthorization may use inside a batch (BatchSettler caps it, so a
#: payer that burns gas cannot starve the other items). About 45,000 is used on the test token.
ITEM_GAS = 120_000
#: The transaction's gas limit covers every item at its cap: an item can never run the whole
#: batch out of gas. Only the gas used is paid.
BASE_GAS = 60_000
ITEM_OVERHEAD_GAS = 10_000


def gas_limit(items: int) -> int:
    return BASE_GAS + items * (ITEM_GAS + ITEM_OVERHEAD_GAS)


def batchable(p: Payment, conf: ConfiguredOption) -> bool:
    """A batch carries EIP-3009 (a scheme that ``batches``: exact) 65-byte ECDSA signatures to the option's pay-to; a
    contract wallet's signature (EIP-1271 bytes), an older pay-to or an upto permit (settled
    through the upto proxy) goes alone."""
    return scheme_of(p.scheme).batches and len(p.signature) == 132 and p.pay_to == conf.option.pay_to


def _item(p: Payment) -> tuple[Any, ...]:
    sig = bytes.fromhex(p.signature[2:])
    v = sig[64] if sig[64] >= 27 else sig[64] + 27
    return (
        to_checksum_address(p.payer),
        int(p.amount),
        p.valid_after,
        p.valid_before,
        bytes.fromhex(p.nonce[2:]),
        v,
        sig[:32],
        sig[32:64],
    )


def calldata(conf: ConfiguredOption, payments: list[Payment]) -> str:
    args = [conf.option.asset, conf.option.pay_to, ITEM_GAS, [_item(p) for p in payments]]
    return "0x" + BATCH_SETTLE.hex() + encode(BATCH_SETTLE_TYPES, args).hex()


def simulate(conf: ConfiguredOption, payments: list[Payment]) -> tuple[dict[str, Any], list[bool]]:
    """The head block and, per item, whether its transfer would succeed in the block it will be
    mined in (``pending``, see calls.simulate; one RPC batch)."""
    call = {"to": conf.batch_settler, "data": calldata(conf, payments), "gas": hex(gas_limit(len(payments)))}
    try:
        block, answer = rpc_batch(
            conf.rpc_url, [("eth_getBlockByNumber", ["latest", False]), ("eth_call", [call, "pending"])]
        )
    except RpcError as exc:
        raise ChainUnavailable(f"batch simulation failed as a whole: {exc}") from exc
    try:
        (ok,) = decode(["bool[]"], bytes.fromhex(answer[2:]))
    except Exception as exc:  # noqa: BLE001 - "0x" from an address without code, or garbage
        raise RuntimeError(f"no BatchSettler answers at {conf.batch_settler} ({answer!r:.80})") from exc
    if len(ok) != len(payments):
        raise RuntimeError(f"BatchSettler at {conf.batch_settler} answered {len(ok)} items for {len(payments)}")
    return block, list(ok)


def _simulate_when_valid(
    conf: ConfiguredOption, items: list[Payment], deadline: float
) -> tuple[dict[str, Any], list[bool], list[str]]:
    """``simulate``, and why each failing item fails; asked again every half second until
    ``deadline`` while the node says an item is not yet valid (its clock, hence its pending
    block's timestamp, may lag ours: as calls.when_valid does for a payment settled alone)."""
    while True:
        block, ok = simulate(conf, items)
        failing = [p for p, good in zip(items, ok, strict=True) if not good]
        reasons = _why(conf, failing) if failing else []
        if not any(NOT_YET_VALID_MESSAGE in why for why in reasons) or time.monotonic() + 0.5 > deadline:
            return block, ok, reasons
        time.sleep(0.5)


def _why(conf: ConfiguredOption, payments: list[Payment]) -> list[str]:
    """Why each dropped item would fail: the token's revert message for it alone (one batch)."""
    calls = [
        ("eth_call", [{"to": call.to, "data": call.data}, "pending"])
        for call in (scheme_of(p.scheme).settlement_call(p) for p in payments)
    ]
    try:
        answers = rpc_batch(conf.rpc_url, calls, errors_inline=True)
    except ChainUnavailable:
        return ["unknown"] * len(payments)
    return [str(a)[:300] if isinstance(a, RpcError) else "it succeeds alone" for a in answers]


@dataclass
class Formed:
    """One batcher step: the transaction signed (if any) and the payments left to other paths."""

    tx: SettlementTx | None = None
    dropped: list[Any] = field(default_factory=list)  # LAPSING now: the chain decides
    alone: list[Any] = field(default_factory=list)  # settled one per transaction
    full: bool = False  # as many ready payments as a batch takes: there may be more


def _claim(conf: ConfiguredOption, limit: int) -> list[Payment]:
    return list(
        Payment.objects.select_for_update(skip_locked=True)
        .filter(
            status=S.VERIFIED,
            network=conf.option.network,
            asset=conf.option.asset,
            settle_requested_at__isnull=False,
        )
        .order_by("settle_requested_at")[:limit]
    )


def form(conf: ConfiguredOption, *, force: bool) -> Formed | None:
    """Claim ready payments and, if the batch is due (or ``force``), sign and store it with every
    payment moved to SETTLING in one ledger transaction. None: nothing ready, or not due yet."""
    limit = x402.settlement.batch_max
    if not relayers.funded_lanes(conf.option.network):
        # No lane can pay for gas: no new batch (the payments wait, VERIFIED, for a refilled lane).
        log.warning("no batch formed on %s: no relayer lane can pay for gas", conf.option.network)
        return None
    with transaction.atomic():
        rows = _claim(conf, limit)
        if not rows:
            return None
        age = (timezone.now() - rows[0].settle_requested_at).total_seconds()
        if not force and len(rows) < limit and age < x402.settlement.batch_max_age_seconds:
            return None
        formed = Formed(full=len(rows) == limit)
        # An authorization valid from this very second (a client may sign validAfter = now) is
        # waited out (rare, a second at most); a block mined now could not use it yet.
        deadline = time.monotonic() + VALID_AFTER_WAIT_SECONDS
        wait_for_valid_after(max(p.valid_after for p in rows))
        soon = time.time() + lapsing.SETTLE_SAFETY_SECONDS
        items = []
        for p in rows:
            if p.valid_after >= time.time():
                continue  # not yet usable by a block mined now: left VERIFIED for the next batch
            if p.valid_before <= soon:
                lapsing.lapse(p, UnpaidReason.NOT_SETTLED_IN_TIME, "authorization expired before settlement")
                formed.dropped.append(p.pk)
            elif not batchable(p, conf):
                formed.alone.append(p.pk)
            else:
                items.append(p)
        if not items:
            return formed
        block, ok, reasons = _simulate_when_valid(conf, items, deadline)
        head = int(block["timestamp"], 16)
        failing = [p for p, good in zip(items, ok, strict=True) if not good]
        for p, why in zip(failing, reasons, strict=True):
            if NOT_YET_VALID_MESSAGE in why:
                continue  # the node's clock is behind validAfter: left VERIFIED, never lapsed
            if p.valid_before <= max(head, time.time()) + lapsing.SETTLE_SAFETY_SECONDS:
                lapsing.lapse(p, UnpaidReason.NOT_SETTLED_IN_TIME, "authorization expired before settlement")
            else:
                lapsing.lapse(p, UnpaidReason.SIMULATION_REVERTED, f"simulation reverted: {why}")
            formed.dropped.append(p.pk)
        items = [p for p, good in zip(items, ok, strict=True) if good]
        if not items:
            return formed
        formed.tx = relayers.sign_and_store(
            conf,
            relayers.take_lane(conf.option.network),
            kind=SettlementTx.Kind.BATCH,
            to=conf.batch_settler,
            data=calldata(conf, items),
            gas_limit=gas_limit(len(items)),
            items=len(items),
            block=block,
        )
        number = int(block["number"], 16)
        common = {"settle_tx_hash": formed.tx.tx_hash, "settlement_tx": formed.tx}
        Payment.advance_many(
            [(p, {**common} if p.search_from_block else {**common, "search_from_block": number}) for p in items],
            S.SETTLING,
            detail={"batch": formed.tx.tx_hash, "items": len(items)},
        )
        _number_items(items)
    BATCH_SIZE.observe(len(items))
    return formed


def _number_items(items: list[Payment]) -> None:
    """Each payment's position in the batch's calldata, in one statement."""
    from django.db import connection

    for i, p in enumerate(items):
        p.settlement_index = i
    table = Payment._meta.db_table
    values = ", ".join(["(%s::uuid, %s)"] * len(items))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET settlement_index = v.i FROM (VALUES {values}) AS v(id, i) WHERE {table}.id = v.id",
            [x for i, p in enumerate(items) for x in (str(p.pk), i)],
        )


def _finish(conf: ConfiguredOption, formed: Formed) -> None:
    """After the batch's commit: broadcast it, and send the others their way. A failure here
    loses nothing: the reconciler rebroadcasts, resolves the lapsing, sweeps the ready."""
    if formed.tx is not None:
        settlement.fault_pause()
        relayers.broadcast(conf.rpc_url, formed.tx)
    for pk in formed.dropped:
        try:
            lapsing.resolve_lapsing(pk)
        except Exception as exc:  # noqa: BLE001 - the reconciler resolves it later
            log.warning("payment %s dropped from a batch: resolving later (%s)", pk, exc)
    for pk in formed.alone:
        try:
            settlement.RelayerSettler().start(pk)
        except Exception as exc:  # noqa: BLE001 - swept and retried later
            log.warning("payment %s (settled alone): retried later (%s)", pk, exc)


#: Batches one batcher run forms at most (see :func:`run`).
MAX_BATCHES_PER_RUN = 5


def run(conf: ConfiguredOption, *, force: bool = False) -> list[SettlementTx]:
    """Form, store and broadcast batches while some are due; the transactions sent.

    ``force`` makes the first batch due whatever its size and age (the kick that queued this run
    waited the age already). With a full batch taken and more ready, another batcher is kicked
    so that workers share the backlog; after ``MAX_BATCHES_PER_RUN`` this one stops, so that the
    task follows what it sent and the tracking tasks queued behind it get a worker (a batcher
    that looped while the backlog lasted confirmed nothing until a sustained load ended).
    """
    sent: list[SettlementTx] = []
    while len(sent) < MAX_BATCHES_PER_RUN:
        try:
            formed = form(conf, force=force)
        except relayers.NoLaneCanPay as exc:  # a lane was flagged while the batch formed
            log.warning("batch not signed on %s: %s", conf.option.network, exc)
            break
        force = False
        if formed is None:
            break
        if formed.full:
            kick(conf, delay=0, force=False)
        _finish(conf, formed)
        if formed.tx is not None:
            sent.append(formed.tx)
        if not formed.full:
            break
    return sent


def follow(tx_ids: list[int], wait_seconds: float) -> list[int]:
    """Track our transactions until their payments are confirmed (or lapse), for at most
    ``wait_seconds``; the ones still open."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    open_ids = list(tx_ids)
    while open_ids:
        still = []
        for tx_id in open_ids:
            try:
                payments = tracking.track_tx(tx_id)
            except ChainUnavailable as exc:
                log.warning("RPC unavailable while tracking settlement %s (%s): the reconciler finishes", tx_id, exc)
                return open_ids
            if any(p.status in (S.SETTLING, S.SETTLED) for p in payments):
                still.append(tx_id)
        open_ids = still
        if not open_ids or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return open_ids


def settle_now(payment_id: Any) -> Payment:
    """Settle this payment now, in a batch with whatever else is ready (a payment a batch cannot
    carry goes alone)."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED:
        return p
    lapsed = lapsing.expire_if_lapsed(payment_id)
    if lapsed is not None:
        return lapsed
    conf = for_payment(p.network, p.asset)
    if not batchable(p, conf):
        return settlement.RelayerSettler().start(payment_id)
    if p.settle_requested_at is None:
        Payment.objects.filter(pk=p.pk, settle_requested_at=None).update(settle_requested_at=timezone.now())
    for _ in range(10):  # older ready payments fill the first batches
        formed = form(conf, force=True)
        if formed is not None:
            _finish(conf, formed)
        p = Payment.objects.select_related("settlement_tx").get(pk=payment_id)
        if p.status != S.VERIFIED or formed is None:
            break
    return p


#: Per process: until when (monotonic) a batcher is known to be scheduled, per kick key.
_scheduled_until: dict[str, float] = {}


def kick(conf: ConfiguredOption, *, delay: float | None = None, force: bool = True) -> None:
    """Make sure a batcher runs for this option within ``delay`` seconds (default
    ``X402_BATCH_MAX_AGE``). On the paid request's hot path: nothing while this process knows a
    batcher is scheduled, else one cache write per window; the batcher it queues takes every
    payment ready by then. Best effort: the reconciler's sweep kicks again for anything left."""
    from django.core.cache import cache

    delay = x402.settlement.batch_max_age_seconds if delay is None else delay
    network, asset = conf.option.network, conf.option.asset
    key = _kick_key(conf, delay)
    now = time.monotonic()
    if delay > 0 and _scheduled_until.get(key, 0.0) > now:
        return  # a batcher runs by then and takes this payment
    try:
        if cache.add(key, 1, timeout=max(1, math.ceil(delay))):
            _scheduled_until[key] = now + delay  # before the send: a batcher run at once clears it
            try:
                dispatch.send(dispatch.SETTLE_BATCHES, network, asset, kwargs={"force": force}, countdown=delay)
            except Exception:
                cache.delete(key)  # not queued: the next payment kicks again
                _scheduled_until.pop(key, None)
                raise
        else:
            # Another process scheduled it, when is not known: trust that for a tenth of the
            # window (a batcher that started since takes what came before it; later payments
            # kick again at most that much later).
            _scheduled_until[key] = now + delay / 10
    except Exception as exc:  # noqa: BLE001 - the sweep settles it; a request never fails for this
        log.warning("could not kick the batcher for %s %s: %s", network, asset, exc)


def _kick_key(conf: ConfiguredOption, delay: float) -> str:
    return f"x402:batch-kick:{conf.option.network}:{conf.option.asset}:{'now' if delay <= 0 else 'later'}"


def started(conf: ConfiguredOption) -> None:
    """A kicked batcher starts: payments recorded from now on need a kick of their own."""
    from django.core.cache import cache

    key = _kick_key(conf, x402.settlement.batch_max_age_seconds)
    _scheduled_until.pop(key, None)
    try:
        cache.delete(key)
    except Exception as exc:  # noqa: BLE001 - the key expires by itself
        log.warning("could not clear the batcher's kick: %s", exc)


def is_batched(network: str, asset: str) -> bool:
    try:
        return for_payment(network, asset).mode == SettlementMode.BATCH
    except LookupError:
        return False


class BatchSettlement:
    """Our relayer settles many payments per transaction through the option's BatchSettler.

    ``start`` settles the payment now, in a batch with whatever else is ready (a payment a
    batch cannot carry, a contract wallet's signature, goes alone); the batcher
    (:mod:`payments.chain.batching`) normally forms batches by size and age.
    """

    def start(self, payment_id: Any) -> Payment:
        return settle_now(payment_id)

    def retry_unknown(self, p: Payment, conf: ConfiguredOption) -> Payment:
        return p  # our own settlements always carry their hash; the chain search decides


settlement.SETTLERS[SettlementMode.BATCH] = BatchSettlement()
