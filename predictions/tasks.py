"""Celery tasks that run predictions, at most once each, in the order the settlement policy sets.

- ``before_run`` (default): settle, see it confirmed, then run (payments.signals -> receivers).
- ``after_success``: run first; a success asks for settlement and its output is released once
  the payment is confirmed; a failure releases the authorization unsettled (nothing is charged).

The policy is the prediction's own, fixed when it was bought. A run is claimed (STARTING ->
PROCESSING) once, in one transaction, so a task delivered twice never runs twice; a runner that
was busy is asked again with the claim kept, until ``X402_RUN_START_TIMEOUT`` after the claim:
then (``enforce_start``, armed at the claim) the run ended on our side, unstarted. Every run has
a time limit (what was paid for), counted from when its runner confirmed the run
(``lifecycle.run_started``, which arms the watchdog; or the claim itself, for a runner that has
the run the moment it is claimed, a predictor loaded in this worker): the runner enforces it where it can (the
python runner's own watcher), the watchdog task ends it at the limit (stopped if it was alive,
else lost on our side: see ``lifecycle.end_at_limit``) and cancels it on its runner, and
``sweep`` gives up on runs that never reported, never rerunning them; a run past its
``Cancel-After`` deadline is canceled. After
``X402_DATA_RETENTION_DAYS`` a finished prediction's input, output and logs are removed
(``remove_expired_data``). Status changes all go through ``lifecycle``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.db.models import Q
from django.utils import timezone

from payments.chain import prerun
from payments.chain.node import ChainUnavailable
from payments.models import Payment, PaymentStatus, UnpaidReason, held_q
from x402site.conf import x402

from . import lifecycle, scheduling
from .lifecycle import Cause
from .models import TERMINAL, Prediction, PredictionStatus, SettlementPolicy
from .runners import Outcome, RunnerBusy, RunnerRefused

log = logging.getLogger("predictions.tasks")
P = PredictionStatus

#: A busy runner is asked again this many times (backing off to 15 s) before the run fails,
#: unless ``X402_RUN_START_TIMEOUT`` ends it first (``enforce_start``).
MAX_START_ATTEMPTS = 120


@shared_task(acks_late=True)
def start_runs(prediction_ids: list[str]) -> int:
    """Send the run task of each of these predictions (confirmed together, scheduling.enqueue_runs).
    A message lost here is found by the sweep, like any run the broker lost."""
    predictions = Prediction.objects.select_related("model__hardware", "version").filter(pk__in=prediction_ids)
    for prediction in predictions:
        scheduling.enqueue_run(prediction)
    return len(prediction_ids)


@shared_task(bind=True, acks_late=True, max_retries=MAX_START_ATTEMPTS)
def run_prediction(self: Any, prediction_id: str, resume: bool = False) -> str:
    """Claim the prediction and hand it to its runner. ``resume``: a start the runner refused as
    busy is tried again on the prediction already claimed."""
    try:
        if not resume and _refused_before_run(prediction_id):
            return "refused"
    except ChainUnavailable as exc:  # the simulation got no answer: neither refused nor run yet
        log.info("prediction %s: settlement simulation unavailable (%s), retrying", prediction_id, exc)
        raise self.retry(countdown=min(2 + self.request.retries, 15)) from None
    if resume:
        prediction = lifecycle.running(prediction_id)
    else:
        prediction = lifecycle.claim(prediction_id, starts_at_once=_starts_at_once)
    if prediction is None:
        return "skipped"
    if not resume:
        if prediction.run_started_at is None:
            # The time-limit watchdog is armed when the runner confirms the run (lifecycle.run_started).
            enforce_start.apply_async(args=[prediction.id], countdown=x402.runs.start_timeout_seconds)
        if prediction.cancel_after_at is not None:
            enforce_cancel_after.apply_async(args=[prediction.id], eta=prediction.cancel_after_at)
    try:
        outcome = prediction.version.runner_impl.start(prediction)
    except RunnerBusy as exc:
        if self.request.retries >= self.max_retries:
            return lifecycle.finish(
                prediction_id, Outcome(succeeded=False, error=f"could not start: {exc}"), cause=Cause.TASK
            )
        log.info("prediction %s: runner busy (%s), retrying", prediction_id, exc)
        raise self.retry(countdown=min(2 + self.request.retries, 15), kwargs={"resume": True}) from None
    except RunnerRefused as exc:
        return lifecycle.finish(prediction_id, Outcome(succeeded=False, error=str(exc)), cause=Cause.TASK)
    if outcome is None:
        return "started"  # the runner reports back through its callback
    return lifecycle.finish(prediction_id, outcome, cause=Cause.TASK)


def _starts_at_once(prediction: Prediction) -> bool:
    try:
        runner = prediction.version.runner_impl
    except LookupError:  # not a runner of this worker: the claim stands, the start fails after it
        return False
    return runner.ready(prediction.version)


def _refused_before_run(prediction_id: str) -> bool:
    """Before a run whose payment is held until after it (upto, after_success): its settlement
    is simulated, and a payment that could not be settled is refused, never run (its prediction
    fails unstarted, see payments.chain.prerun.refuse_if_unsettleable)."""
    # Held (to simulate), or refused already (by an earlier try whose prediction is not failed
    # yet: it must not run either); anything else (free, paid, being settled) runs.
    payment_id = (
        Payment.objects.filter(prediction__pk=prediction_id, prediction__status=P.STARTING)
        .filter(held_q() | Q(unpaid_reason=UnpaidReason.REFUSED_BEFORE_RUN))
        .values_list("pk", flat=True)
        .first()
    )
    if payment_id is None:
        return False
    payment = prerun.refuse_if_unsettleable(payment_id)
    return payment.unpaid_reason == UnpaidReason.REFUSED_BEFORE_RUN


@shared_task(acks_late=True)
def enforce_start(prediction_id: str) -> bool:
    """End a claimed run its runner never confirmed within ``X402_RUN_START_TIMEOUT``."""
    return lifecycle.fail_unstarted(prediction_id, cause=Cause.TASK)


@shared_task(acks_late=True)
def enforce_time_limit(prediction_id: str) -> bool:
    """End a run still going past its time limit, and cancel it on its runner: stopped if it
    was alive (its runner is asked first), else lost on our side (``lifecycle.end_at_limit``)."""
    prediction = lifecycle.running(prediction_id)
    if prediction is None:
        return False
    alive = prediction.version.runner_impl.alive(prediction)
    return lifecycle.end_at_limit(prediction_id, runner_alive=alive, cause=Cause.TASK)


@shared_task(acks_late=True)
def enforce_cancel_after(prediction_id: str) -> bool:
    """Cancel a run still going at its Cancel-After deadline, and stop it on its runner."""
    return lifecycle.cancel_past_deadline(prediction_id, cause=Cause.TASK)


@shared_task(acks_late=True)
def remove_expired_data() -> int:
    """Remove the input, output and logs of predictions that ended more than
    ``X402_DATA_RETENTION_DAYS`` ago (``data_removed`` then reads true, as on Replicate). The
    prediction, its status, error, times and payment stay (the ledger keeps what was paid)."""
    days = x402.runs.data_retention_days
    if days <= 0:
        return 0
    expired = Prediction.objects.filter(
        status__in=TERMINAL, completed_at__lt=timezone.now() - timedelta(days=days), data_removed=False
    )
    return expired.update(input={}, output=None, logs="", data_removed=True)


@shared_task(acks_late=True)
def sweep() -> dict[str, int]:
    """Give up on runs that never reported (past their time limit plus grace: failed, canceled
    on their runner, never rerun) or never started (past ``X402_RUN_START_TIMEOUT`` plus grace:
    their ``enforce_start`` was lost); enqueue runs whose task was lost; abort overdue
    Cancel-After.

    A run that finished and waits for its payment (``after_success``) is not lost: its payment's
    outcome ends it (see lifecycle.on_payments).
    """
    now = timezone.now()
    grace = x402.runs.lost_grace_seconds
    lost = _each(
        Prediction.objects.overdue(grace).values_list("id", flat=True),
        lambda pk: lifecycle.fail_overdue(pk, grace=grace, cause=Cause.SWEEP),
        "giving up on a lost run",
    )
    unstarted = Prediction.objects.unstarted(x402.runs.start_timeout_seconds + grace)
    lost += _each(
        unstarted.values_list("id", flat=True),
        lambda pk: lifecycle.fail_unstarted(pk, cause=Cause.SWEEP),
        "giving up on a run that never started",
    )
    # Runs whose task was lost (a broker outage): due now, still STARTING after a minute.
    stale = Prediction.objects.filter(status=P.STARTING, created_at__lt=now - timedelta(seconds=60))
    due = stale.filter(
        Q(payment=None)
        | Q(settlement_policy=SettlementPolicy.AFTER_SUCCESS)
        | Q(payment__status=PaymentStatus.CONFIRMED)
    ).select_related("model__hardware", "version")
    for prediction in due:
        scheduling.enqueue_run(prediction)
    overdue = Prediction.objects.filter(status=P.STARTING, cancel_after_at__lt=now)
    aborted = _each(
        overdue.values_list("id", flat=True),
        lambda pk: lifecycle.abort_overdue(pk, cause=Cause.SWEEP),
        "aborting past its Cancel-After",
    )
    canceled = _each(
        Prediction.objects.running().filter(cancel_after_at__lt=now).values_list("id", flat=True),
        lambda pk: lifecycle.cancel_past_deadline(pk, cause=Cause.SWEEP),
        "canceling past its Cancel-After",
    )
    return {"lost": lost, "aborted": aborted, "canceled": canceled, "requeued": len(due)}


def _each(prediction_ids: Iterable[str], step: Callable[[str], int], what: str) -> int:
    """``step`` on each prediction, the count it returns summed; one that raises is logged and
    left for the next pass: one prediction's trouble must not stall the sweep for all others."""
    done = 0
    for prediction_id in prediction_ids:
        try:
            done += step(prediction_id)
        except Exception:  # noqa: BLE001 - logged with its traceback; the next pass retries it
            log.exception("sweep: %s failed for prediction %s; left for the next pass", what, prediction_id)
    return done
