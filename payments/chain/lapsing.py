"""Lapsing: a payment we cannot or will not settle goes LAPSING, and only
:func:`resolve_lapsing`, after asking the chain whether the authorization was used (by anyone,
in any transaction), writes FAILED or EXPIRED, or adopts the transaction that paid."""

from __future__ import annotations

import time
from typing import Any

from django.db import transaction

from payments.chain.calls import UseNotFound
from payments.chain.evidence import chain_use, has_lapsed, transfer_matches
from payments.chain.node import rpc
from payments.chain.tracking import track
from payments.models import Payment, PaymentStatus, UnpaidReason
from payments.options import for_payment
from payments.signals import payment_unsettled

S = PaymentStatus

#: A VERIFIED payment this close to validBefore is not signed any more: it lapses instead.
SETTLE_SAFETY_SECONDS = 2


def lock(payment_id: Any) -> Payment:
    """The payment, locked for update (its transaction of ours with it)."""
    return Payment.objects.select_for_update(of=("self",)).select_related("settlement_tx").get(pk=payment_id)


def lapse(p: Payment, reason: UnpaidReason, message: str, **fields: Any) -> None:
    """Move a locked payment to LAPSING: not settled by us; the chain will say what it became."""
    p.advance(S.LAPSING, unpaid_reason=reason, failure_reason=message[:1000], **fields)


def resolve_lapsing(payment_id: Any) -> Payment:
    """The only writer of FAILED and EXPIRED: ask the chain whether the authorization was used.

    Used by a transaction that carries this payment's Transfer: SETTLING with that hash (its
    receipt then decides SETTLED or CONFIRMED), so money that moved is always on the books and
    its prediction is served. Used without that Transfer (the payer spent the nonce on another
    authorization) or canceled by the payer: FAILED. Unused and lapsed: the reason's terminal
    state. Otherwise it may still be used: nothing changes (``payment_unsettled`` is sent: what
    waits for the payment need not wait for its lapse).
    """
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.LAPSING:
        return p
    use = chain_use(p)
    receipt = None
    if use.used_in:
        receipt = rpc(for_payment(p.network, p.asset).rpc_url, "eth_getTransactionReceipt", [use.used_in])
        if receipt is None:
            return p  # its block was just dropped: ask again next pass
    with transaction.atomic():
        p = lock(payment_id)
        if p.status != S.LAPSING:
            return p
        chain = use.as_detail()
        if receipt is not None and transfer_matches(receipt, p):
            # Ours only if it is one of our transaction's hashes (a replaced signature mined late).
            ours = p.settlement_tx if p.settlement_tx and use.used_in in p.settlement_tx.hashes else None
            # Paid: why it was going unpaid no longer holds (kept in the event for the books; a
            # payment we had released is refunded, see predictions.charges.refund_if_owed).
            p.advance(
                S.SETTLING,
                settle_tx_hash=use.used_in,
                settlement_tx=ours,
                unpaid_reason="",
                failure_reason="",
                detail={"found_on_chain": use.used_in, "chain": chain, "was_unpaid": p.unpaid_reason},
            )
        elif receipt is not None or use.canceled_in or use.used_elsewhere:
            reason = (
                UnpaidReason.PAYER_CANCELED if use.canceled_in and receipt is None else UnpaidReason.NONCE_USED_ELSEWHERE
            )
            p.advance(
                S.FAILED,
                unpaid_reason=reason,
                failure_reason=f"{reason.label} ({use.used_in or use.canceled_in or 'Permit2 nonce'})",
                detail={"chain": chain},
            )
        elif use.used:
            # Used, but the transaction lies outside the searched blocks: never call it unpaid.
            # Raised, so the reconciler counts it, backs off and keeps it in sight.
            raise UseNotFound(
                f"payment {p.pk}: authorization used on chain, no log of it since block {use.searched_from} "
                "(raise X402_LOG_LOOKBACK_BLOCKS or set search_from_block)"
            )
        elif has_lapsed(p, use):
            p.advance(UnpaidReason(p.unpaid_reason).final_status, detail={"chain": chain})
        else:
            payment_unsettled.send(sender=Payment, payment=p)
    if p.status == S.SETTLING:
        p = track(p.pk)
    return p


def expire_if_lapsed(payment_id: Any) -> Payment | None:
    """A VERIFIED payment whose authorization lapsed before we settled it goes LAPSING, and the
    chain is asked at once whether someone else used it (then it is paid, not expired)."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED or p.valid_before > time.time() + SETTLE_SAFETY_SECONDS:
        return None
    with transaction.atomic():
        p = lock(payment_id)
        if p.status != S.VERIFIED:
            return p
        lapse(p, UnpaidReason.NOT_SETTLED_IN_TIME, "authorization expired before settlement")
    return resolve_lapsing(payment_id)
