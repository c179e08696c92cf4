"""Settlement by the option's remote x402 facilitator (``SettlementMode.FACILITATOR``)."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from payments.chain.lapsing import expire_if_lapsed, lapse, lock, resolve_lapsing
from payments.facilitator import FacilitatorClient, FacilitatorUnavailable
from payments.models import Payment, PaymentStatus, UnpaidReason
from payments.options import ConfiguredOption, for_payment

log = logging.getLogger("payments.chain.facilitated")
S = PaymentStatus


class FacilitatorSettler:
    """The option's x402 facilitator settles; an unknown outcome stays SETTLING for the reconciler."""

    def start(self, payment_id: Any) -> Payment:
        """The payment is claimed (VERIFIED -> SETTLING) before the call, so only one worker asks."""
        lapsed = expire_if_lapsed(payment_id)
        if lapsed is not None:
            return lapsed
        with transaction.atomic():
            p = lock(payment_id)
            if p.status != S.VERIFIED:
                return p
            conf = for_payment(p.network, p.asset)
            p.advance(S.SETTLING, detail={"facilitator": conf.facilitator_url})
        try:
            return self.retry_unknown(p, conf)
        except FacilitatorUnavailable:
            return p  # unknown outcome: the reconciler finds it on chain or asks again

    def retry_unknown(self, p: Payment, conf: ConfiguredOption) -> Payment:
        """Ask (again): sending the identical payload is safe, one authorization moves money once.

        A facilitator that cannot answer raises FacilitatorUnavailable, so the reconciler backs
        this row off instead of waiting out its timeouts on every pass."""
        client = FacilitatorClient(conf.facilitator_url, conf.facilitator_auth)
        try:
            answer = client.settle(p.x402_version, p.payload, p.requirement)
        except FacilitatorUnavailable as exc:
            log.warning("facilitator settle for payment %s: unknown outcome (%s)", p.pk, exc)
            raise
        tx = answer.get("transaction") or ""
        with transaction.atomic():
            p = lock(p.pk)
            if p.status != S.SETTLING or p.settle_tx_hash:
                return p
            if tx:
                # Success or "settlement_pending" with a hash: the receipt decides either way.
                p.advance(S.SETTLING, settle_tx_hash=tx, detail={"facilitator_answer": answer})
            elif answer.get("success") is False and answer.get("errorReason") != "settlement_pending":
                # A refusal is the facilitator's word, not the chain's: it may still have landed.
                lapse(
                    p,
                    UnpaidReason.FACILITATOR_REFUSED,
                    f"facilitator refused: {answer.get('errorReason')}",
                    detail={"facilitator_answer": answer},
                )
        return resolve_lapsing(p.pk) if p.status == S.LAPSING else p

