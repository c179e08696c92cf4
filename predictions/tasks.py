"""Celery tasks that run predictions, at most once each."""

from __future__ import annotations

import logging
import time
import traceback

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from .models import Prediction, PredictionStatus
from .runners import run_python

log = logging.getLogger("predictions.tasks")
P = PredictionStatus


def start_prediction(prediction: Prediction) -> None:
    """After commit: a paid prediction waits for its settlement, a free one runs now."""
    if prediction.payment_id is None:
        run_prediction.delay(prediction.id)
    else:
        from payments.tasks import settle_payment

        settle_payment.delay(str(prediction.payment_id))


@shared_task(acks_late=True)
def run_prediction(prediction_id: str) -> str:
    with transaction.atomic():
        prediction = Prediction.objects.select_for_update().select_related("version").get(pk=prediction_id)
        if prediction.status != P.STARTING:
            # Delivered twice, or the worker died mid-run: never run a paid prediction again.
            return prediction.status
        prediction.status = P.PROCESSING
        prediction.started_at = timezone.now()
        prediction.save(update_fields=["status", "started_at"])
    started = time.perf_counter()
    try:
        output = run_python(prediction.version.predictor, prediction.input)
        prediction.output, prediction.status = output, P.SUCCEEDED
    except Exception as exc:  # a model's failure is the prediction's outcome, not the worker's
        log.warning("prediction %s failed: %s", prediction_id, exc)
        prediction.status = P.FAILED
        prediction.error = f"{exc.__class__.__name__}: {exc}"
        prediction.logs = traceback.format_exc(limit=5)
    prediction.predict_time = time.perf_counter() - started
    prediction.completed_at = timezone.now()
    prediction.save(update_fields=["output", "status", "error", "logs", "predict_time", "completed_at"])
    log.info("prediction %s %s in %.3fs", prediction_id, prediction.status, prediction.predict_time)
    return prediction.status
