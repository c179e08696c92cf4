"""Celery tasks that run predictions, at most once each, in the order the settlement policy sets.

- ``before_run`` (default): settle, see it confirmed, then run (payments.signals -> receivers).
- ``after_success``: run first; a success asks for settlement and its output is released once
  the payment is confirmed; a failure releases the authorization unsettled (nothing is charged).

A run is claimed (STARTING -> PROCESSING) in one transaction, so a task delivered twice never
runs twice; a run whose worker died is failed by ``sweep`` after the time limit, never rerun.
"""

from __future__ import annotations

import logging
import time
import traceback
from datetime import timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from payments import ledger

from . import webhooks
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


def _claim(prediction_id: str) -> Prediction | None:
    """STARTING -> PROCESSING, or None when there is nothing to run (done, canceled, overdue)."""
    with transaction.atomic():
        prediction = (
            Prediction.objects.select_for_update(of=("self",))
            .select_related("version", "model", "payment")
            .filter(pk=prediction_id)
            .first()
        )
        if prediction is None or prediction.status != P.STARTING:
            return None  # delivered twice, canceled, or already run: never run a paid prediction twice
        if prediction.cancel_after_at and timezone.now() > prediction.cancel_after_at:
            _abort(prediction)
            return None
        prediction.status = P.PROCESSING
        prediction.started_at = timezone.now()
        prediction.save(update_fields=["status", "started_at"])
        webhooks.send(prediction, "start")
        return prediction


def _abort(prediction: Prediction) -> None:
    """Cancel-After passed before the run started: canceled, and not charged if still possible."""
    prediction.status = P.CANCELED
    prediction.error = "aborted: the Cancel-After deadline passed before the prediction started"
    prediction.completed_at = timezone.now()
    prediction.save(update_fields=["status", "error", "completed_at"])
    if prediction.payment is not None:
        ledger.release(prediction.payment, "aborted before start (Cancel-After)")
    webhooks.send(prediction, "completed")


@shared_task(acks_late=True, soft_time_limit=settings.X402_PREDICTION_TIME_LIMIT)
def run_prediction(prediction_id: str) -> str:
    prediction = _claim(prediction_id)
    if prediction is None:
        return "skipped"
    started = time.perf_counter()
    succeeded = False
    output = None
    error = logs = ""
    try:
        output = run_python(prediction.version.predictor, prediction.input)
        succeeded = True
    except SoftTimeLimitExceeded:
        error = f"the prediction ran longer than {settings.X402_PREDICTION_TIME_LIMIT}s"
    except Exception as exc:  # a model's failure is the prediction's outcome, not the worker's
        log.warning("prediction %s failed: %s", prediction_id, exc)
        error, logs = f"{exc.__class__.__name__}: {exc}", traceback.format_exc(limit=5)
    predict_time = time.perf_counter() - started
    awaiting_payment = (
        succeeded
        and prediction.payment is not None
        and prediction.model.settlement_policy == SettlementPolicy.AFTER_SUCCESS
    )
    with transaction.atomic():
        fields = {"output": output, "error": error, "logs": logs, "predict_time": predict_time}
        if not awaiting_payment:
            fields.update(status=P.SUCCEEDED if succeeded else P.FAILED, completed_at=timezone.now())
        # Only a run still PROCESSING is written: a cancel during the run wins.
        if not Prediction.objects.filter(pk=prediction_id, status=P.PROCESSING).update(**fields):
            return "canceled"
        if awaiting_payment:
            # The output is kept back until the payment is confirmed (receivers.py).
            ledger.request_settlement(prediction.payment)
        elif not succeeded and prediction.payment is not None:
            ledger.release(prediction.payment, "the prediction failed")
        prediction.refresh_from_db()
        if output is not None and not awaiting_payment:
            webhooks.send(prediction, "output")
        if prediction.is_terminal:
            webhooks.send(prediction, "completed")
    log.info("prediction %s %s in %.3fs", prediction_id, prediction.status, predict_time)
    return prediction.status


@shared_task(acks_late=True)
def sweep() -> dict[str, int]:
    """Fail runs whose worker died (past the time limit); abort overdue Cancel-After."""
    limit = timezone.now() - timedelta(seconds=settings.X402_PREDICTION_TIME_LIMIT + 60)
    lost = 0
    for prediction_id in Prediction.objects.filter(status=P.PROCESSING, started_at__lt=limit).values_list(
        "id", flat=True
    ):
        with transaction.atomic():
            prediction = (
                Prediction.objects.select_for_update(of=("self",))
                .select_related("payment")
                .get(pk=prediction_id)
            )
            if prediction.status != P.PROCESSING:
                continue
            prediction.status = P.FAILED
            prediction.error = "the worker running this prediction was lost; it was not run again"
            prediction.completed_at = timezone.now()
            prediction.save(update_fields=["status", "error", "completed_at"])
            if prediction.payment is not None:
                ledger.release(prediction.payment, "the prediction's worker was lost")
            webhooks.send(prediction, "completed")
            lost += 1
    aborted = 0
    overdue = Prediction.objects.filter(status=P.STARTING, cancel_after_at__lt=timezone.now())
    for prediction_id in overdue.values_list("id", flat=True):
        with transaction.atomic():
            prediction = (
                Prediction.objects.select_for_update(of=("self",))
                .select_related("payment")
                .get(pk=prediction_id)
            )
            if prediction.status == P.STARTING:
                _abort(prediction)
                aborted += 1
    return {"lost": lost, "aborted": aborted}
