"""Creating a prediction: the one path shared by the API, commands and tests."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from payments import idempotency, ledger, settlement
from payments.chain import ChainUnavailable
from payments.exceptions import Challenge
from payments.idempotency import IdempotencyConflict
from payments.models import Payment
from payments.permissions import Charge, ServiceUnavailable
from payments.verification import Verification
from payments.x402.verify import NONCE_ALREADY_USED, SETTLEMENT_WOULD_REVERT

from . import lifecycle
from .models import ModelVersion, Prediction, SettlementPolicy


def create_prediction(
    version: ModelVersion,
    inputs: dict[str, Any],
    *,
    paid: Verification | None,
    charge: Charge | None,
    challenge: Challenge | None,
    options: dict[str, Any] | None = None,
) -> tuple[Prediction, bool]:
    """Record the payment (if any) and create its prediction in one transaction.

    Returns ``(prediction, created)``. An authorization already in the ledger buys nothing
    more: only an idempotent retry (the same ``payment-identifier`` and payload, for the same
    request) that lost the race with its first attempt gets that prediction back; anything
    else is refused with ``invalid_exact_evm_nonce_already_used`` and learns nothing of it.
    """
    from .tasks import start_prediction  # late: tasks import this module's models

    policy = version.model.settlement_policy  # read once: the prediction keeps it for good
    usage = None
    if paid is not None and paid.payment.payload.permit is not None:
        # Pay per second (upto): the charge is known only once the run is measured, so it is
        # run first and settled after, whatever the model's policy for fixed quotes.
        assert charge is not None and charge.usage is not None
        policy, usage = SettlementPolicy.AFTER_SUCCESS, charge.usage
    if paid is not None and policy == SettlementPolicy.AFTER_SUCCESS:
        _refuse_unless_settleable(paid, challenge)
    try:
        with transaction.atomic():
            payment = None
            if paid is not None:
                assert charge is not None
                payment = ledger.record(
                    paid,
                    resource=charge.resource,
                    fingerprint=charge.fingerprint,
                    settle_now=policy == SettlementPolicy.BEFORE_RUN,
                    usage=usage,
                )
            prediction = lifecycle.create(
                version, inputs, payment=payment, settlement_policy=policy, options=options
            )
            transaction.on_commit(lambda: start_prediction(prediction))
            return prediction, True
    except IntegrityError as exc:
        if paid is None or not ledger.is_duplicate(exc):
            raise
    assert charge is not None and challenge is not None
    first = idempotency.lookup(paid.payment.payload)
    if first is not None:
        return replayed(first, charge), False
    raise challenge.reject(NONCE_ALREADY_USED, "this authorization was already presented")


def _refuse_unless_settleable(paid: Verification, challenge: Challenge | None) -> None:
    """A payment held until after its run is settled only then: its settlement is simulated now
    (as it will be sent, at the most it can settle), and refused (402, no run) if it would
    revert, so a run is never given for an authorization the chain will not honour."""
    assert challenge is not None
    try:
        why = settlement.refusal_before_run(paid.payment, paid.conf)
    except ChainUnavailable:
        raise ServiceUnavailable() from None
    if why is not None:
        raise challenge.reject(
            SETTLEMENT_WOULD_REVERT, f"this payment could not be settled after the run: {why}"
        )


def replayed(payment: Payment, charge: Charge) -> Prediction:
    """The prediction an idempotent retry's first attempt bought (409 if it bought another request)."""
    prediction = Prediction.objects.select_related("payment", "model").filter(payment=payment).first()
    if prediction is None or payment.request_fingerprint != charge.fingerprint:
        raise IdempotencyConflict("This payment-identifier was already used for another request.")
    return prediction

