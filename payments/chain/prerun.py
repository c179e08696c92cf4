"""Before a held payment's run (``upto``, or ``exact`` settled ``after_success``): simulate
its settlement at the most it can settle, and refuse the payment before the run if it would
revert."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from payments.chain.calls import is_revert, not_yet_valid, revert_message, simulate, when_valid
from payments.chain.lapsing import lapse, lock, resolve_lapsing
from payments.chain.node import ChainUnavailable, RpcError
from payments.models import Payment, PaymentStatus, UnpaidReason
from payments.options import ConfiguredOption, SettlementMode, for_payment
from payments.schemes import scheme_of
from payments.x402.verify import VerifiedPayment

S = PaymentStatus


def refusal_before_run(verified: VerifiedPayment, conf: ConfiguredOption) -> str | None:
    """Why the settlement of a payment held until after its run (upto, ``after_success``) would
    revert if sent now (the chain's message), else None. Simulated as it will be sent: from the
    lane that sends it, at the most it can settle, in the next block. An option settled by a
    remote facilitator is that facilitator's to judge (its ``/verify``): None."""
    if conf.mode == SettlementMode.FACILITATOR:
        return None
    call = scheme_of(verified.payload.scheme).held_call(verified)
    try:
        when_valid(verified.payload.authorization.valid_after, lambda: simulate(conf.rpc_url, call))
    except RpcError as exc:
        if not_yet_valid(exc):
            return None
        if not is_revert(exc):
            raise ChainUnavailable(f"settlement simulation: {exc}") from exc
        return revert_message(exc)
    return None


def refuse_if_unsettleable(payment_id: Any) -> Payment:
    """Before a held payment's run starts (VERIFIED, its settlement not asked for yet): simulate
    the settlement at the most it can settle; if it would revert, the payment is refused before
    the run (LAPSING, ``refused_before_run``; the chain then says what it became) and, once the
    chain says it is unused, its prediction fails unstarted (``payment_unsettled``). A node that
    does not answer (not a revert) raises ChainUnavailable: the caller tries again later."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED or p.settle_requested_at is not None:
        return p
    conf = for_payment(p.network, p.asset)
    if conf.mode == SettlementMode.FACILITATOR:
        return p
    call = scheme_of(p.scheme).settlement_call(p, held=True)
    try:
        when_valid(p.valid_after, lambda: simulate(conf.rpc_url, call))
    except RpcError as exc:
        if not_yet_valid(exc):
            return p
        if not is_revert(exc):
            raise ChainUnavailable(f"settlement simulation: {exc}") from exc
        with transaction.atomic():
            p = lock(payment_id)
            if p.status != S.VERIFIED or p.settle_requested_at is not None:
                return p
            why = f"refused before the run: its settlement would revert: {revert_message(exc)}"
            lapse(p, UnpaidReason.REFUSED_BEFORE_RUN, why)
        return resolve_lapsing(payment_id)
    return p
