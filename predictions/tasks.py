"""Celery tasks that run predictions, at most once each, in the order the settlement policy sets.

- ``before_run`` (default): settle, see it confirmed, then run (payments.signals -> receivers).
- ``after_success``: run first; a success asks for settlement and its output is released once
  the payment is confirmed; a failure releases the authorization unsettled (nothing is charged).
"""

from __future__ import annotations

import logging
import time
import traceback

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from payments import ledger

from .models import Prediction, PredictionStatus, SettlementPolicy
from .runners import run_python

log = logging.getLogger("predictions.tasks")
P = PredictionStatus


def start_prediction(prediction: Prediction) -> None:
    """After commit: run now (free, or after_success) or settle first (before_run)."""
    policy = prediction.model.settlement_policy
    if prediction.payment_id is None or policy == SettlementPolicy.AFTER_SUCCESS:
        run_prediction.delay(prediction.id)
    else:
        from payments.tasks import settle_payment

        settle_payment.delay(str(prediction.payment_id))


@shared_task(acks_late=True)
def run_prediction(prediction_id: str) -> str:
    with transaction.atomic():
        prediction = (
            Prediction.objects.select_for_update(of=("self",))
            .select_related("version", "model", "payment")
            .get(pk=prediction_id)
        )
        if prediction.status != P.STARTING:
            # Delivered twice, or the worker died mid-run: never run a paid prediction again.
            return prediction.status
        prediction.status = P.PROCESSING
        prediction.started_at = timezone.now()
        prediction.save(update_fields=["status", "started_at"])
    started = time.perf_counter()
    succeeded = False
    try:
        prediction.output = run_python(prediction.version.predictor, prediction.input)
        succeeded = True
    except Exception as exc:  # a model's failure is the prediction's outcome, not the worker's
        log.warning("prediction %s failed: %s", prediction_id, exc)
        prediction.error = f"{exc.__class__.__name__}: {exc}"
        prediction.logs = traceback.format_exc(limit=5)
    prediction.predict_time = time.perf_counter() - started
    awaiting_payment = (
        succeeded
        and prediction.payment is not None
        and prediction.model.settlement_policy == SettlementPolicy.AFTER_SUCCESS
    )
    with transaction.atomic():
        if awaiting_payment:
            # The output is kept back until the payment is confirmed (receivers.py).
            ledger.request_settlement(prediction.payment)
        else:
            prediction.status = P.SUCCEEDED if succeeded else P.FAILED
            prediction.completed_at = timezone.now()
            if not succeeded and prediction.payment is not None:
                ledger.release(prediction.payment, "the prediction failed")
        prediction.save(update_fields=["output", "status", "error", "logs", "predict_time", "completed_at"])
    log.info("prediction %s %s in %.3fs", prediction_id, prediction.status, prediction.predict_time)
    return prediction.status
