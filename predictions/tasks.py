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
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from kombu.exceptions import OperationalError

from payments import ledger
from payments.metrics import PREDICTION_SECONDS

from . import webhooks
from .models import Prediction, PredictionStatus, Runner, SettlementPolicy
from .runners import cog
from .runners.python import run_python
from .services import end

log = logging.getLogger("predictions.tasks")
P = PredictionStatus


def queue_for(model: Any) -> str | None:
    """The queue of the model's hardware tier (X402_TIER_QUEUES, by slug prefix), if routed."""
    slug = model.hardware.slug if model.hardware_id else ""
    for prefix, queue in settings.X402_TIER_QUEUES.items():
        if slug.startswith(prefix):
            return queue
    return None


def enqueue_run(prediction_id: str, model: Any) -> None:
    run_prediction.apply_async(args=[prediction_id], queue=queue_for(model))


def start_prediction(prediction: Prediction) -> None:
    """After commit: run now (free, or after_success) or settle first (before_run).

    With the broker down the request still succeeds (the payment and prediction are committed);
    the sweeps (payments.tasks.reconcile, sweep below) enqueue the work once it is back.
    """
    policy = prediction.model.settlement_policy
    try:
        if prediction.payment_id is None or policy == SettlementPolicy.AFTER_SUCCESS:
            enqueue_run(prediction.id, prediction.model)
        else:
            from payments.tasks import settle_payment

            settle_payment.delay(str(prediction.payment_id))
    except (OperationalError, OSError) as exc:
        log.error("broker unavailable, prediction %s left for the sweep: %s", prediction.id, exc)


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
    end(
        prediction,
        P.CANCELED,
        "aborted: the Cancel-After deadline passed before the prediction started",
        "aborted before start (Cancel-After)",
    )


@shared_task(bind=True, acks_late=True, soft_time_limit=settings.X402_PREDICTION_TIME_LIMIT, max_retries=120)
def run_prediction(self: Any, prediction_id: str) -> str:
    prediction = _claim(prediction_id)
    if prediction is None:
        return "skipped"
    version = prediction.version
    if version.runner == Runner.COG:
        try:
            cog.start(version.cog_url, prediction.id, prediction.input)
        except cog.CogError as exc:
            if exc.retry:  # busy or unreachable: give the claim back and try again shortly
                Prediction.objects.filter(pk=prediction_id, status=P.PROCESSING).update(status=P.STARTING)
                raise self.retry(countdown=min(2 + self.request.retries, 15)) from None
            return finish(prediction_id, succeeded=False, error=str(exc))
        return "started"  # Cog reports back through CogWebhook
    started = time.perf_counter()
    try:
        output = run_python(version.predictor, prediction.input)
    except SoftTimeLimitExceeded:
        return finish(
            prediction_id,
            succeeded=False,
            predict_time=time.perf_counter() - started,
            error=f"the prediction ran longer than {settings.X402_PREDICTION_TIME_LIMIT}s",
        )
    except Exception as exc:  # a model's failure is the prediction's outcome, not the worker's
        log.warning("prediction %s failed: %s", prediction_id, exc)
        return finish(
            prediction_id,
            succeeded=False,
            predict_time=time.perf_counter() - started,
            error=f"{exc.__class__.__name__}: {exc}",
            logs=traceback.format_exc(limit=5),
        )
    return finish(prediction_id, succeeded=True, output=output, predict_time=time.perf_counter() - started)


def finish(
    prediction_id: str,
    *,
    succeeded: bool,
    output: Any = None,
    error: str = "",
    logs: str | None = None,
    predict_time: float | None = None,
) -> str:
    """Record a run's outcome (any runner), once: only a prediction still PROCESSING is written,
    so a cancel during the run, or a second report of the same outcome, changes nothing."""
    with transaction.atomic():
        prediction = (
            Prediction.objects.select_for_update(of=("self",))
            .select_related("model", "payment")
            .filter(pk=prediction_id)
            .first()
        )
        if prediction is None:
            return "missing"
        if prediction.status != P.PROCESSING or prediction.predict_time is not None:
            return prediction.status
        awaiting_payment = (
            succeeded
            and prediction.payment is not None
            and prediction.model.settlement_policy == SettlementPolicy.AFTER_SUCCESS
        )
        prediction.output, prediction.error = output, error
        prediction.predict_time = predict_time if predict_time is not None else 0.0
        if logs is not None:
            prediction.logs = logs
        if not awaiting_payment:
            prediction.status = P.SUCCEEDED if succeeded else P.FAILED
            prediction.completed_at = timezone.now()
        prediction.save(update_fields=["output", "error", "logs", "predict_time", "status", "completed_at"])
        if awaiting_payment:
            # The output is kept back until the payment is confirmed (receivers.py).
            ledger.request_settlement(prediction.payment)
        elif not succeeded and prediction.payment is not None:
            ledger.release(prediction.payment, "the prediction failed")
        if output is not None and not awaiting_payment:
            webhooks.send(prediction, "output")
        if prediction.is_terminal:
            webhooks.send(prediction, "completed")
    PREDICTION_SECONDS.labels(model=str(prediction.model)).observe(prediction.predict_time)
    log.info("prediction %s %s", prediction_id, prediction.status)
    return prediction.status


@shared_task(acks_late=True)
def sweep() -> dict[str, int]:
    """Fail runs whose worker died (past the time limit); abort overdue Cancel-After."""
    limit = timezone.now() - timedelta(seconds=settings.X402_PREDICTION_LOST_AFTER)
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
            end(
                prediction,
                P.FAILED,
                "the worker running this prediction was lost; it was not run again",
                "the prediction's worker was lost",
            )
            lost += 1
    # Runs whose task was lost (a broker outage): due now, still STARTING after a minute.
    stale = Prediction.objects.filter(
        status=P.STARTING, created_at__lt=timezone.now() - timedelta(seconds=60)
    )
    due = stale.filter(
        Q(payment=None)
        | Q(model__settlement_policy=SettlementPolicy.AFTER_SUCCESS)
        | Q(payment__status="confirmed")
    ).select_related("model__hardware")
    for prediction in due:
        enqueue_run(prediction.id, prediction.model)
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
    return {"lost": lost, "aborted": aborted, "requeued": len(due)}
