"""Creating a prediction: the one path shared by the API, commands and tests."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from payments import idempotency, ledger
from payments.exceptions import Challenge
from payments.idempotency import IdempotencyConflict
from payments.models import Payment
from payments.permissions import Charge
from payments.verification import Verification
from payments.x402.verify import NONCE_ALREADY_USED

from . import webhooks
from .models import ModelVersion, Prediction, PredictionStatus, Runner, SettlementPolicy
from .runners import cog


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

    try:
        with transaction.atomic():
            payment = None
            if paid is not None:
                assert charge is not None
                payment = ledger.record(
                    paid,
                    resource=charge.resource,
                    fingerprint=charge.fingerprint,
                    settle_now=version.model.settlement_policy == SettlementPolicy.BEFORE_RUN,
                )
            prediction = Prediction.objects.create(
                model=version.model, version=version, input=inputs, payment=payment, **(options or {})
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


def replayed(payment: Payment, charge: Charge) -> Prediction:
    """The prediction an idempotent retry's first attempt bought (409 if it bought another request)."""
    prediction = Prediction.objects.select_related("payment", "model").filter(payment=payment).first()
    if prediction is None or payment.request_fingerprint != charge.fingerprint:
        raise IdempotencyConflict("This payment-identifier was already used for another request.")
    return prediction


def cancel(prediction: Prediction) -> Prediction:
    """Cancel a prediction that has not finished.

    What the agent pays: before the run, nothing if its authorization was not yet being settled
    (it is released); under ``before_run`` a settlement already under way is charged. During the
    run, ``after_success`` releases the payment (no success, no charge); ``before_run`` was paid.
    """
    with transaction.atomic():
        locked = (
            Prediction.objects.select_for_update(of=("self",))
            .select_related("payment", "version")
            .get(pk=prediction.pk)
        )
        if locked.is_terminal:
            return locked
        if locked.status == PredictionStatus.PROCESSING and locked.version.runner == Runner.COG:
            url, pk = locked.version.cog_url, locked.pk
            transaction.on_commit(lambda: cog.cancel(url, pk))
        end(locked, PredictionStatus.CANCELED, "canceled", "the prediction was canceled")
        return locked


def end(prediction: Prediction, status: str, error: str, release_reason: str) -> None:
    """End a locked prediction without output (canceled, aborted, lost): release a payment not
    yet being settled, and tell the webhook."""
    prediction.status = status
    prediction.error = error
    prediction.output = None
    prediction.completed_at = timezone.now()
    prediction.save(update_fields=["status", "error", "output", "completed_at"])
    if prediction.payment is not None:
        ledger.release(prediction.payment, release_reason)
    webhooks.send(prediction, "completed")
