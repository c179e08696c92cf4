"""Receipts: read our transactions' receipts (one JSON-RPC batch per chunk) and move each
SETTLING/SETTLED payment by its own logs; rebroadcast or replace what is not mined.

A transaction of ours moves as one ledger transaction with every payment it carries; a payment
settled by another transaction (found on chain, or by a facilitator) alone.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from payments.chain import relayer as relayers
from payments.chain.calls import payment_hashes
from payments.chain.evidence import has_lapsed, transfer_matches
from payments.chain.node import ChainUnavailable, RpcError, rpc
from payments.chain.receipts import note_mined, read_receipts
from payments.metrics import RECONCILE_ERRORS
from payments.models import Payment, PaymentStatus, SettlementTx, UnpaidReason
from payments.options import ConfiguredOption, for_payment

log = logging.getLogger("payments.chain.tracking")
S = PaymentStatus


@dataclass
class Move:
    """What the chain says a locked payment becomes: a transition (or only new fields)."""

    to: str | None
    fields: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] | None = None


BlockClock = Callable[[dict[str, Any]], int]


def block_clock(url: str) -> BlockClock:
    """The timestamp of a receipt's block (read once per block, only for payments that failed)."""
    seen: dict[str, int] = {}

    def at(receipt: dict[str, Any]) -> int:
        block_hash = receipt["blockHash"]
        if block_hash not in seen:
            block = rpc(url, "eth_getBlockByHash", [block_hash, False])
            seen[block_hash] = int(block["timestamp"], 16) if block else 0
        return seen[block_hash]

    return at


def _decide(p: Payment, receipts: dict[str, Any], latest: int, conf: ConfiguredOption, clock: BlockClock) -> Move | None:
    """What the receipts say about a SETTLING/SETTLED payment (no writes, no RPC but ``clock``)."""
    mined = next(((h, receipts[h]) for h in payment_hashes(p) if receipts.get(h)), None)
    if mined is None:
        if p.status == S.SETTLED:
            # Reorg: the block holding our settlement is gone. The stored transaction is
            # rebroadcast while the authorization is still valid.
            return Move(
                S.SETTLING,
                {"block_number": None, "block_hash": "", "confirmations": 0},
                {"reorg": f"receipt of {p.settle_tx_hash} disappeared"},
            )
        if has_lapsed(p):
            # Not mined, and no longer minable: unless another transaction used the
            # authorization (a replaced facilitator transaction, a third party).
            return Move(
                S.LAPSING,
                {"unpaid_reason": UnpaidReason.NOT_MINED, "failure_reason": "settlement not mined before validBefore"},
            )
        return None
    tx_hash, receipt = mined
    block_number = int(receipt["blockNumber"], 16)
    fields: dict[str, Any] = {
        "block_number": block_number,
        "block_hash": receipt["blockHash"],
        "confirmations": max(0, latest - block_number + 1),
    }
    if tx_hash != p.settle_tx_hash:
        fields["settle_tx_hash"] = tx_hash
    tx = p.settlement_tx
    if tx is not None and tx.gas_used is not None and (p.gas_used is None or p.block_hash != receipt["blockHash"]):
        fields["gas_used"], fields["gas_cost_wei"] = tx.share(p.settlement_index or 0)
    if not transfer_matches(receipt, p):
        # Reverted (maybe someone else used the authorization first in the same block), or our
        # batch's call for it failed (used, expired, unfunded): the chain decides what it became.
        reverted = int(receipt.get("status", "0x0"), 16) != 1
        if clock(receipt) >= p.valid_before:
            reason, message = UnpaidReason.NOT_SETTLED_IN_TIME, "the authorization expired before its settlement was mined"
        elif reverted:
            reason, message = UnpaidReason.SETTLEMENT_REVERTED, "settlement transaction reverted"
        else:
            reason, message = UnpaidReason.SETTLEMENT_REVERTED, "settlement moved no Transfer of this authorization"
        return Move(
            S.LAPSING,
            {**fields, "unpaid_reason": reason, "failure_reason": message},
            {"tx": tx_hash, "status": receipt.get("status")},
        )
    if fields["confirmations"] >= conf.option.confirmations:
        return Move(S.CONFIRMED, fields)
    if p.status == S.SETTLING:
        return Move(S.SETTLED, fields)
    if (p.block_hash, p.confirmations) != (fields["block_hash"], fields["confirmations"]):
        return Move(None, fields)
    return None


def _write(moves: list[tuple[Payment, Move]]) -> None:
    """Write the moves of locked payments: one ledger transaction, transitions in bulk."""
    groups: dict[tuple[str | None, str], list[tuple[Payment, dict[str, Any]]]] = {}
    for p, move in moves:
        key = (move.to, json.dumps(move.detail or {}, sort_keys=True, default=str))
        groups.setdefault(key, []).append((p, move.fields))
    for (to, detail), changes in groups.items():
        if to is None:
            for p, fields in changes:
                for name, value in fields.items():
                    setattr(p, name, value)
            Payment.update_many(changes)
        else:
            Payment.advance_many(changes, to, detail=json.loads(detail) or None)


def _mine(p: Payment, receipts: dict[str, Any]) -> dict[str, Any]:
    """This payment's receipts; raises the node's error about one of its hashes."""
    mine = {h: receipts.get(h) for h in payment_hashes(p)}
    for answer in mine.values():
        if isinstance(answer, RpcError):
            raise answer
    return mine


def _apply(payment_ids: list[Any], receipts: dict[str, Any], latest: int, conf: ConfiguredOption, clock: BlockClock) -> list[Payment]:
    """Lock the payments (one transaction of ours, or one payment), record what the chain says
    about the transaction, and move each payment by its own logs: one ledger transaction."""
    with transaction.atomic():
        locked = list(
            Payment.objects.select_for_update(of=("self",))
            .select_related("settlement_tx")
            .filter(pk__in=payment_ids, status__in=[S.SETTLING, S.SETTLED])
            .order_by("pk")
        )
        txs: dict[int, SettlementTx] = {}
        for p in locked:
            if p.settlement_tx_id is not None:
                # One instance per transaction, so that every payment sees what note_mined wrote.
                p.settlement_tx = txs.setdefault(p.settlement_tx_id, p.settlement_tx)
        for tx in txs.values():
            note_mined(tx, {h: receipts.get(h) for h in tx.hashes})
        moves = []
        for p in locked:
            move = _decide(p, _mine(p, receipts), latest, conf, clock)
            if move is not None:
                moves.append((p, move))
        _write(moves)
    return locked


def _group_of(p: Payment) -> list[Any]:
    """The open payments tracked together with ``p``: those of its transaction, or itself."""
    if p.settlement_tx_id is None:
        return [p.pk]
    return list(
        Payment.objects.filter(settlement_tx_id=p.settlement_tx_id, status__in=[S.SETTLING, S.SETTLED]).values_list(
            "pk", flat=True
        )
    )


def track(payment_id: Any) -> Payment:
    """Read the receipt and move SETTLING/SETTLED forward (or back, after a reorg), together
    with every payment its transaction carries."""
    p = Payment.objects.select_related("settlement_tx").get(pk=payment_id)
    if p.status not in (S.SETTLING, S.SETTLED) or not p.settle_tx_hash:
        return p
    conf = for_payment(p.network, p.asset)
    receipts, latest = read_receipts(conf.rpc_url, payment_hashes(p))
    _apply(_group_of(p), receipts, latest, conf, block_clock(conf.rpc_url))
    return Payment.objects.get(pk=payment_id)


def track_tx(tx_id: int) -> list[Payment]:
    """Track every open payment of one of our transactions; the payments, as they are now."""
    tx = SettlementTx.objects.get(pk=tx_id)
    ids = list(tx.payments.filter(status__in=[S.SETTLING, S.SETTLED]).values_list("pk", flat=True))
    if not ids:
        return []
    p = Payment.objects.get(pk=ids[0])
    conf = for_payment(p.network, p.asset)
    receipts, latest = read_receipts(conf.rpc_url, tx.hashes)
    return _apply(ids, receipts, latest, conf, block_clock(conf.rpc_url))


#: Receipts read per JSON-RPC batch by the reconciler.
RECONCILE_BATCH = 200
#: Longest wait before a row that raised is tried again.
MAX_BACKOFF_SECONDS = 300


def isolated(stats: Counter[str], payment_ids: Any, step: str, fn: Callable[..., object], *args: Any) -> None:
    """Run one row's (or a list of rows': one transaction's) step so that its failure is logged,
    counted and backed off, and the others go on. A node that cannot be reached at all
    (ChainUnavailable) ends the pass instead."""
    ids = list(payment_ids) if isinstance(payment_ids, list) else [payment_ids]
    try:
        fn(*args)
    except ChainUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad row must not stop the reconciler
        stats["errors"] += 1
        RECONCILE_ERRORS.labels(step=step).inc()
        failures = max(Payment.objects.filter(pk__in=ids).values_list("reconcile_failures", flat=True), default=0)
        delay = min(2 ** min(failures, 16), MAX_BACKOFF_SECONDS)
        Payment.objects.filter(pk__in=ids).update(
            reconcile_failures=F("reconcile_failures") + 1, reconcile_after=timezone.now() + timedelta(seconds=delay)
        )
        log.exception("reconcile %s of payments %s failed (retry in %ss): %s", step, ids[:5], delay, exc)
    else:
        Payment.objects.filter(pk__in=ids, reconcile_failures__gt=0).update(reconcile_failures=0, reconcile_after=None)


def reconcile_batch(payment_ids: list[Any], stats: Counter[str] | None = None) -> Counter[str]:
    """Track many SETTLING/SETTLED payments with one RPC batch per chunk; rebroadcast the unmined.

    Payments are taken together per transaction of ours (a batch moves as one ledger
    transaction), else alone. A transaction not mined ``X402_STUCK_AFTER_SECONDS`` after it was
    signed is replaced (same nonce, higher fees); every replaced hash is still watched, since any
    of them may be mined. Each group is handled in isolation (:func:`isolated`).
    """
    stats = Counter() if stats is None else stats
    payments = list(
        Payment.objects.filter(pk__in=payment_ids, status__in=[S.SETTLING, S.SETTLED])
        .exclude(settle_tx_hash=None)
        .select_related("settlement_tx")
    )
    by_option: dict[tuple[str, str], dict[Any, list[Payment]]] = {}
    for p in payments:
        key = ("tx", p.settlement_tx_id) if p.settlement_tx_id is not None else ("payment", p.pk)
        by_option.setdefault((p.network, p.asset), {}).setdefault(key, []).append(p)
    for (network, asset), groups in by_option.items():
        try:
            conf = for_payment(network, asset)
        except LookupError:
            for group in groups.values():
                isolated(stats, [p.pk for p in group], "receipt", for_payment, network, asset)
            continue
        chunk: list[list[Payment]] = []
        for group in [*groups.values(), None]:
            if group is not None:
                chunk.append(group)
            hashes = sum(len(payment_hashes(g[0])) for g in chunk)
            if chunk and (group is None or hashes >= RECONCILE_BATCH):
                receipts, latest = read_receipts(conf.rpc_url, [h for g in chunk for h in payment_hashes(g[0])])
                stats["rpc_batches"] += 1
                clock = block_clock(conf.rpc_url)
                for g in chunk:
                    isolated(stats, [p.pk for p in g], "receipt", _reconcile_group, g, receipts, latest, conf, clock, stats)
                chunk = []
    return stats


def _reconcile_group(
    group: list[Payment],
    receipts: dict[str, Any],
    latest: int,
    conf: ConfiguredOption,
    clock: BlockClock,
    stats: Counter[str],
) -> None:
    locked = _apply([p.pk for p in group], receipts, latest, conf, clock)
    stats["payments"] += len(locked)
    waiting = [p for p in locked if p.status == S.SETTLING and p.settlement_tx_id is not None]
    if not waiting:
        return
    tx = SettlementTx.objects.get(pk=waiting[0].settlement_tx_id)
    if tx.block_number is not None:
        return
    sent = tx
    stuck = relayers.is_stuck(tx)
    step = relayers.resend(conf.rpc_url, tx.tx_hash, stuck=stuck, send=lambda: relayers.broadcast(conf.rpc_url, sent))
    stats["rebroadcast"] += 1
    if step == relayers.Resend.NO_FUNDS:
        stats["unfunded"] += 1
    elif step == relayers.Resend.RESIGN:
        tx = replace_tx(tx.pk, conf)
        stats["replaced"] += tx.tx_hash != sent.tx_hash
        relayers.broadcast(conf.rpc_url, tx)


def replace_tx(tx_id: int, conf: ConfiguredOption) -> SettlementTx:
    """Re-sign a stuck transaction with the same nonce and fees raised past the node's bump rule;
    its waiting payments follow the new hash (the old ones are still watched)."""
    block = rpc(conf.rpc_url, "eth_getBlockByNumber", ["latest", False])
    with transaction.atomic():
        tx = SettlementTx.objects.select_for_update().get(pk=tx_id)
        waiting = list(
            Payment.objects.select_for_update().filter(settlement_tx=tx, status=S.SETTLING).order_by("pk")
        )
        if not waiting or tx.block_number is not None:
            return tx
        replaced = relayers.replace(tx, relayers.account_of(tx.relayer), block)
        if replaced is None:  # at the fee cap: the last one is rebroadcast
            return tx
        old, max_fee = replaced
        new_hash = tx.tx_hash
        for p in waiting:
            p.settlement_tx = tx
        Payment.advance_many(
            [(p, {"settle_tx_hash": new_hash}) for p in waiting],
            S.SETTLING,
            detail={"replaced": old, "by": new_hash, "max_fee": max_fee},
        )
    return tx
