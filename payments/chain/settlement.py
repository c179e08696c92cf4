"""Settlement through our relayer: sign, store, broadcast, then track the receipt.

Each step is idempotent and driven by the ledger state, so a task delivered twice, a worker
killed between steps or an RPC outage never sends a second transaction for one payment:
the signed transaction is stored before it is broadcast, and only that stored transaction is
ever rebroadcast.

Paid means: a receipt with status 1 that carries the token's ``Transfer(from, payTo, value)``.
Unpaid is never decided from our side alone: a payment we cannot or will not settle goes
LAPSING, and only :func:`payments.chain.lapsing.resolve_lapsing`, after asking the chain whether
the authorization was used (by anyone, in any transaction), writes FAILED or EXPIRED, or adopts
the transaction that paid.

How a payment is settled depends on its option's mode (our relayer one payment per
transaction, our relayer in batches, or a remote facilitator): the settlers are registered in
:data:`SETTLERS`, and nothing else branches on the mode. Our own transactions are
:class:`~payments.models.SettlementTx` rows (one per signed transaction, several payments each
when batched); receipts are read per transaction, and each payment is judged by its own logs.

What differs per scheme (the call, how its use shows on chain) is the payment's scheme
(``payments.schemes``). The other steps have their own modules: the call and the chain's answer
(``calls``), what the chain says about one payment (``evidence``), receipts and the reconciler's
batches (``tracking``), lapsing (``lapsing``), the simulation before a held run (``prerun``)
and the remote facilitator's settler (``facilitated``). This module signs, stores, broadcasts and
drives a payment (:func:`settle`), and registers the settlers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Protocol

from django.db import transaction

from payments.chain import relayer as relayers
from payments.chain.calls import SettlementCall, not_yet_valid, revert_message, when_valid
from payments.chain.evidence import chain_use, has_lapsed
from payments.chain.facilitated import FacilitatorSettler
from payments.chain.lapsing import expire_if_lapsed, lapse, lock, resolve_lapsing
from payments.chain.node import ChainUnavailable, RpcError, rpc_batch
from payments.chain.relayer import relayer_account
from payments.chain.tracking import isolated, reconcile_batch, track
from payments.models import Payment, PaymentStatus, SettlementTx, UnpaidReason
from payments.options import ConfiguredOption, SettlementMode, for_payment
from payments.schemes import scheme_of
from x402site.conf import x402

__all__ = ["relayer_account"]  # re-exported: views and ops name the relayer through this module

log = logging.getLogger("payments.chain.settlement")
S = PaymentStatus


def fault_pause() -> None:
    if x402.settlement.fault_pause_after_sign_seconds:
        # Fault injection for the crash tests only: a window between store and broadcast.
        time.sleep(x402.settlement.fault_pause_after_sign_seconds)


def prepare(payment_id: Any) -> Payment:
    """VERIFIED -> SETTLING, one transaction for this payment: simulate, then sign and store it
    with a nonce of the least loaded relayer lane."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED:
        return p
    lapsed = expire_if_lapsed(payment_id)
    if lapsed is not None:
        return lapsed
    conf = for_payment(p.network, p.asset)
    settle = scheme_of(p.scheme).settlement_call(p)
    call = {"from": settle.sender or relayers.lanes()[0].address, "to": settle.to, "data": settle.data}
    try:
        # Simulated in the block the transaction will be mined in (see simulate).
        block, _ = when_valid(
            p.valid_after,
            lambda: rpc_batch(
                conf.rpc_url,
                [("eth_getBlockByNumber", ["latest", False]), ("eth_estimateGas", [call, "pending"])],
            ),
        )
    except RpcError as exc:
        if not_yet_valid(exc):
            # The node's clock is behind validAfter: a correct payment, settled later (it stays
            # VERIFIED: the reconciler's sweep sends it again), never lapsed.
            log.info("payment %s: not yet valid on chain (validAfter %s), settled later", p.pk, p.valid_after)
            return p
        # The transfer would revert: maybe someone already settled it (front-running), maybe
        # the payer moved the funds. The chain decides which (resolve_lapsing).
        with transaction.atomic():
            p = lock(payment_id)
            if p.status == S.VERIFIED:
                lapse(p, UnpaidReason.SIMULATION_REVERTED, f"simulation reverted: {revert_message(exc)}")
        return resolve_lapsing(payment_id)
    try:
        with transaction.atomic():
            p = lock(payment_id)
            if p.status != S.VERIFIED:
                return p
            lane = relayers.take_lane(p.network, settle.sender)
            p = _sign(p, conf, settle, lane, block)
    except relayers.NoLaneCanPay as exc:
        # Nothing signed: the payment waits, VERIFIED, until a lane can pay again (the
        # reconciler then sends it its way, see ledger.resend_lost).
        log.warning("payment %s not signed: %s", payment_id, exc)
        return Payment.objects.get(pk=payment_id)
    fault_pause()
    return p


def _sign(
    p: Payment, conf: ConfiguredOption, settle: SettlementCall, lane: relayers.Lane, block: dict[str, Any]
) -> Payment:
    """Sign and store the payment's transaction on ``lane`` and move it to SETTLING (the payment
    and the lane locked by the caller)."""
    tx = relayers.sign_and_store(
        conf,
        lane,
        kind=SettlementTx.Kind.SINGLE,
        to=settle.to,
        data=settle.data,
        gas_limit=settle.gas_limit,
        items=1,
        block=block,
    )
    p.advance(
        S.SETTLING,
        settle_tx_hash=tx.tx_hash,
        settlement_tx=tx,
        settlement_index=0,
        search_from_block=p.search_from_block or int(block["number"], 16),
    )
    return p


def broadcast(p: Payment) -> None:
    """Send the payment's stored transaction (again). Safe to repeat: the same signed bytes."""
    if p.status != S.SETTLING or p.settlement_tx_id is None:
        return
    relayers.broadcast(for_payment(p.network, p.asset).rpc_url, p.settlement_tx)


class Settler(Protocol):
    """How one option's payments are settled (registered by SettlementMode in SETTLERS)."""

    def start(self, payment_id: Any) -> Payment:
        """VERIFIED -> SETTLING (or LAPSING), at most once whatever the concurrency."""
        ...

    def retry_unknown(self, p: Payment, conf: ConfiguredOption) -> Payment:
        """A SETTLING payment with no transaction hash, not yet lapsed: try to learn or finish it."""
        ...


class RelayerSettler:
    """Our relayer signs transferWithAuthorization, stores it, then broadcasts it."""

    def start(self, payment_id: Any) -> Payment:
        p = prepare(payment_id)
        broadcast(p)
        return p

    def retry_unknown(self, p: Payment, conf: ConfiguredOption) -> Payment:
        return p  # our own settlements always carry their hash; the chain search decides


#: How each SettlementMode settles; payments.chain.batching registers SettlementMode.BATCH's
#: (imported by PaymentsConfig.ready), as the module that forms batches.
SETTLERS: dict[str, Settler] = {
    SettlementMode.RELAYER: RelayerSettler(),
    SettlementMode.FACILITATOR: FacilitatorSettler(),
}


def resolve_unknown(payment_id: Any) -> Payment:
    """A SETTLING payment with no transaction hash: find its settlement on chain, or ask again."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.SETTLING or p.settle_tx_hash:
        return p
    use = chain_use(p)
    with transaction.atomic():
        p = lock(payment_id)
        if p.status != S.SETTLING or p.settle_tx_hash:
            return p
        if use.used_in:
            p.advance(S.SETTLING, settle_tx_hash=use.used_in, detail={"found_on_chain": use.used_in})
        elif use.canceled_in or has_lapsed(p, use):
            lapse(p, UnpaidReason.NOT_MINED, "no settlement found on chain before validBefore")
    if p.status == S.LAPSING:
        return resolve_lapsing(payment_id)
    if p.settle_tx_hash:
        return track(payment_id)
    conf = for_payment(p.network, p.asset)
    return SETTLERS[conf.mode].retry_unknown(p, conf)


def recheck_lanes() -> set[str]:
    """The balance check of the lanes flagged as unable to pay (:func:`relayer.recheck_unfunded`);
    the networks where one can pay again. An RPC failure leaves them flagged until next pass."""
    from payments.options import configured

    urls = {c.option.network: c.rpc_url for c in configured()}
    try:
        return relayers.recheck_unfunded(urls)
    except (RpcError, ChainUnavailable, ValueError, TypeError) as exc:
        log.warning("reconcile: balance check of unfunded lanes failed (%s); next pass", exc)
        return set()


def reconcile_open() -> Counter[str]:
    """Re-derive every open payment from the chain, each row in isolation: finish unknown
    outcomes, track receipts in batches (rebroadcasting or replacing the unmined), and ask the
    chain about LAPSING payments and lapsed VERIFIED ones."""
    stats: Counter[str] = Counter()
    due = Payment.objects.due_for_reconcile()
    try:
        for pk in due.filter(status=S.SETTLING, settle_tx_hash=None).values_list("pk", flat=True):
            isolated(stats, pk, "unknown", resolve_unknown, pk)
            stats["unknown"] += 1
        open_ids = list(due.filter(status__in=[S.SETTLING, S.SETTLED]).values_list("pk", flat=True))
        reconcile_batch(open_ids, stats)
        for pk in due.filter(status=S.LAPSING).values_list("pk", flat=True):
            isolated(stats, pk, "lapsing", resolve_lapsing, pk)
            stats["lapsing"] += 1
        for pk in due.filter(status=S.VERIFIED, valid_before__lt=time.time()).values_list("pk", flat=True):
            isolated(stats, pk, "expire", expire_if_lapsed, pk)
            stats["expired"] += 1
    except ChainUnavailable as exc:
        stats["errors"] += 1
        stats["chain_unavailable"] += 1
        log.warning("reconcile: RPC unavailable (%s); will retry next pass", exc)
    return stats


def settle(payment_id: Any, wait_seconds: float = 30.0) -> Payment:
    """Drive one payment as far as it goes now; the reconciler finishes anything left."""
    p = Payment.objects.get(pk=payment_id)
    if p.status == S.VERIFIED:
        p = SETTLERS[for_payment(p.network, p.asset).mode].start(payment_id)
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while p.status in (S.SETTLING, S.SETTLED) and p.settle_tx_hash:
        try:
            p = track(p.pk)
        except ChainUnavailable:
            log.warning("RPC unavailable while tracking payment %s; the reconciler will finish", p.pk)
            break
        if p.status not in (S.SETTLING, S.SETTLED) or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return p
