"""Getting a prediction's work queued: its run (on its hardware tier's queue), or its payment's
settlement first. Tasks are sent by name (``x402site.dispatch``): the code that decides never
imports the tasks that do the work."""

from __future__ import annotations

import logging
from typing import Any

from kombu.exceptions import OperationalError

from payments import ledger
from x402site import dispatch
from x402site.conf import x402

from .models import Prediction, SettlementPolicy

log = logging.getLogger("predictions.tasks")


def queue_for(model: Any) -> str | None:
    """The queue of the model's hardware tier (X402_TIER_QUEUES, by slug prefix), if routed."""
    slug = model.hardware.slug if model.hardware_id else ""
    for prefix, queue in x402.runs.tier_queues.items():
        if slug.startswith(prefix):
            return queue
    return None


def enqueue_run(prediction: Prediction) -> None:
    """Send the run task, with the options its runner asks for (its time limits)."""
    options = prediction.version.runner_impl.task_options(prediction)
    dispatch.send(dispatch.RUN_PREDICTION, prediction.id, queue=queue_for(prediction.model), **options)


def enqueue_runs(predictions: list[Prediction]) -> None:
    """Send the run tasks of many predictions (a confirmed batch's): one task on the default
    queue sends them (:func:`predictions.tasks.start_runs`), so the settlement worker that
    confirmed the batch publishes one message, not a hundred."""
    if len(predictions) == 1:
        enqueue_run(predictions[0])
    elif predictions:
        dispatch.send(dispatch.START_RUNS, [p.id for p in predictions])


def start_prediction(prediction: Prediction) -> None:
    """After commit: run now (free, or after_success) or settle first (before_run).

    With the broker down the request still succeeds (the payment and prediction are committed);
    the sweeps (payments.tasks.reconcile, sweep below) enqueue the work once it is back.
    """
    try:
        if prediction.payment_id is None or prediction.settlement_policy == SettlementPolicy.AFTER_SUCCESS:
            enqueue_run(prediction)
        else:
            ledger.start_settlement(prediction.payment)
    except (OperationalError, OSError) as exc:
        log.error("broker unavailable, prediction %s left for the sweep: %s", prediction.id, exc)
