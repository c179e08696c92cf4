"""The prediction lifecycle: the only code that changes ``Prediction.status``.

Every change is checked against :data:`TRANSITIONS` and written with an appended
:class:`~predictions.models.PredictionEvent` (what caused it) in one transaction. From here,
and only here, follow the consequences:

- in the same transaction, the ledger writes that must not be lost or half-done: a success
  under ``after_success`` asks for settlement (``ledger.request_settlement``), an end without
  output releases an authorization not yet being settled (``ledger.release``); a pay-per-second
  (``upto``) payment is charged for the measured run instead (``ledger.charge_usage``: its
  seconds on success, at its time limit or when its payer cancels it; its price's failure
  charge when it failed on our side or an operator canceled it); an end without output whose
  payment is confirmed under ``before_run`` is owed a refund (``refunds.owe``) when it failed
  on our side before any output left, or ended before its run started (:func:`_refund_cause`);
- after commit: the webhooks the prediction's filter asks for (``start``, ``logs``,
  ``output``, ``completed``), the progress events its listeners wait for (``events``: logs,
  output, end), metrics, enqueuing the run, and stopping a run on its runner.

Locks are taken payment first, then prediction: the order in which the ledger reaches us
(``Payment.advance`` holds the payment and sends ``payment_advanced``, see receivers.py), so the
two never wait on each other crosswise.

The settlement policy and the time limit are the prediction's own (copied from the model at
creation): a model edited mid-run changes nothing about a run already paid for.
A run whose authorization is held until after it (``upto``, ``after_success``) starts only if the
authorization outlasts it and its settlement: the claim cuts its limit, or fails it unstarted.

The run clock: a claim (STARTING -> PROCESSING) is not a run. The billable clock and the
time-limit watchdog start when the runner confirms it has the run (:func:`run_started`: Cog
accepted the PUT, the python runner loaded its predictor and entered ``predict``); a claimed
run whose runner never confirms within ``X402_RUN_START_TIMEOUT`` ended on our side
(:func:`fail_unstarted`). At its limit a run ends "stopped" (its compute used, charged) only on
evidence it was alive (:func:`end_at_limit`: a recent heartbeat or report, or its runner's own
word); without it the run was lost on our side (failed: refunded, released, failure charge).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError
from prometheus_client import Counter

from payments import ledger, refunds
from payments.ledger import RunEnd
from payments.metrics import PREDICTION_SECONDS
from payments.models import CHARGED_STATUSES, UNPAID_STATUSES, Payment, PaymentStatus
from x402site import dispatch

from . import events, scheduling, webhooks
from .models import (
    TERMINAL,
    ModelVersion,
    Prediction,
    PredictionEvent,
    PredictionStatus,
    SettlementPolicy,
)
from .runners import Outcome

log = logging.getLogger("predictions.lifecycle")
P = PredictionStatus
Cause = PredictionEvent.Cause

#: The one state machine of predictions (Replicate's statuses).
TRANSITIONS: dict[str, frozenset[str]] = {
    # Failed before the run: its payment failed or expired. Aborted: Cancel-After passed.
    P.STARTING: frozenset({P.PROCESSING, P.FAILED, P.CANCELED, P.ABORTED}),
    P.PROCESSING: frozenset({P.SUCCEEDED, P.FAILED, P.CANCELED}),
    **{status: frozenset() for status in TERMINAL},
}
#: Ends without output: an authorization not yet being settled is released (nothing charged).
ENDED_UNSERVED = frozenset({P.FAILED, P.CANCELED, P.ABORTED})

ABORTED_ERROR = "aborted: the Cancel-After deadline passed before the prediction started"
DEADLINE_ERROR = "canceled: the Cancel-After deadline passed while the prediction ran"
#: Why a prediction past its deadline ran all the same (in its PROCESSING event's detail).
DEADLINE_WAIVED = "the Cancel-After deadline passed after the payment was settled: run, not aborted"
#: The watchdog fires this long after a run's time limit (the runner's own limit acts first).
WATCHDOG_SLACK = 2
#: A run's last sign of life (``alive_at``) this recent is evidence it is alive (the python
#: runner beats every ``runners.python.HEARTBEAT_INTERVAL`` seconds).
ALIVE_WINDOW = 5
OVERRAN_ERROR = "the prediction ran longer than its time limit ({limit}s) and was stopped"
LOST_ERROR = (
    "the prediction's run was lost on our side: no sign of life at its time limit ({limit}s); "
    "it was not run again"
)
NOT_STARTED_ERROR = (
    "the prediction's runner never started the run within {timeout}s (busy, unreachable, or "
    "lost); it was not run"
)
#: A held authorization (settled after the run) that cannot outlast the run: the run's limit is
#: cut to what is left if that keeps at least this share of it (and a whole second), else it
#: is not started.
MIN_CUT_LIMIT_SHARE = 0.5
EXPIRES_BEFORE_RUN_ERROR = (
    "not started: the payment authorization expires in {left}s, too soon to run for {limit}s "
    "and settle after the run; nothing was charged, pay again with a later deadline"
)
PREDICTIONS_ENDED = Counter("x402_predictions_total", "Predictions that ended, by status", ["status"])


class IllegalTransition(Exception):
    pass


def _lock(prediction_id: str) -> Prediction | None:
    """The prediction, locked (its payment locked first); None if there is no such prediction."""
    payment_id = Prediction.objects.filter(pk=prediction_id).values_list("payment_id", flat=True).first()
    if payment_id is not None:
        list(Payment.objects.select_for_update().filter(pk=payment_id).values_list("pk", flat=True))
    return (
        Prediction.objects.select_for_update(of=("self",))
        .select_related("model", "version", "payment")
        .filter(pk=prediction_id)
        .first()
    )


def _move(
    prediction: Prediction,
    to: str,
    cause: str,
    *,
    detail: dict[str, Any] | None = None,
    stop_run: bool = False,
    run_end: RunEnd = RunEnd.FAILED,
    **fields: Any,
) -> None:
    """Move a locked prediction to ``to``, set ``fields``, append the event, and arrange what
    follows (see the module's docstring). ``stop_run``: the runner is told to cancel the run.
    ``run_end``: how a run that ends unserved is charged when it is paid per second (stopped at
    its time limit or by the payer: its seconds; failed on our side: the failure charge)."""
    if to not in TRANSITIONS[prediction.status]:
        raise IllegalTransition(f"{prediction.status} -> {to} for prediction {prediction.pk}")
    previous, now, held_logs = prediction.status, timezone.now(), not prediction.logs_released
    if to == P.PROCESSING:
        fields.setdefault("started_at", now)
    if to in TERMINAL:
        fields.setdefault("completed_at", now)
    ended_run: dict[str, Any] = {}
    if to in ENDED_UNSERVED:
        if previous == P.PROCESSING:
            # How the run ended and how many output pieces its payer may have seen (a before_run
            # run streams them while it runs): what the refund policy asks (:func:`_refund_cause`).
            pieces = len(prediction.output) if isinstance(prediction.output, list) else 0
            ended_run = {"run_end": str(run_end), "output_pieces": pieces}
        fields["output"] = None
    prediction.status = to
    for name, value in fields.items():
        setattr(prediction, name, value)
    prediction.save(update_fields=["status", *fields])
    event_detail = {**({"error": prediction.error} if to in ENDED_UNSERVED else {}), **ended_run, **(detail or {})}
    PredictionEvent.objects.create(
        prediction=prediction, from_status=previous, to_status=to, cause=cause, detail=event_detail
    )
    if to in ENDED_UNSERVED and prediction.payment is not None:
        reason = f"the prediction ended {to}: {prediction.error}"[:500]
        if previous == P.PROCESSING and ledger.is_usage_priced(prediction.payment):
            ledger.charge_usage(prediction.payment, _run_seconds(prediction, now), run_end, reason=reason)
        else:
            ledger.release(prediction.payment, reason)
        _refund_if_owed(prediction, prediction.payment)
    if stop_run:
        runner, ended = prediction.version.runner_impl, prediction
        transaction.on_commit(lambda: runner.cancel(ended))
    if to == P.PROCESSING:
        webhooks.send(prediction, "start")
    if to == P.SUCCEEDED and prediction.output is not None:
        webhooks.send(prediction, "output")
    if to in TERMINAL and previous == P.PROCESSING and held_logs and prediction.logs_released and prediction.logs:
        webhooks.send(prediction, "logs")  # kept back while the payment was held: released now
    if to in TERMINAL:
        events.ended(prediction.pk)
        webhooks.send(prediction, "completed")
        transaction.on_commit(lambda: PREDICTIONS_ENDED.labels(status=to).inc())
    log.info("prediction %s: %s -> %s (%s)", prediction.pk, previous, to, cause)


def _run_seconds(prediction: Prediction, now: Any) -> Decimal:
    """The run's measured seconds: the runner's ``predict_time``, else the wall time since its
    runner confirmed the run (a run stopped before it reported); 0 for a run never started
    (waiting for a busy runner is not billed)."""
    limit = prediction.time_limit_seconds  # what the payer was told it could run; never billed past it
    if prediction.predict_time is not None:
        return Decimal(str(min(prediction.predict_time, limit)))
    if prediction.run_started_at is None:
        return Decimal(0)
    return Decimal(str(min(max(0.0, (now - prediction.run_started_at).total_seconds()), limit)))


def create(
    version: ModelVersion,
    inputs: dict[str, Any],
    *,
    payment: Payment | None,
    settlement_policy: str,
    options: dict[str, Any] | None = None,
    cause: str = Cause.API,
) -> Prediction:
    """A new STARTING prediction with its first event (call inside the transaction that recorded
    its payment). Its time limit and settlement policy are fixed here, for good."""
    prediction = Prediction.objects.create(
        model=version.model,
        version=version,
        input=inputs,
        payment=payment,
        settlement_policy=settlement_policy,
        time_limit_seconds=version.model.time_limit_seconds,
        **(options or {}),
    )
    PredictionEvent.objects.create(prediction=prediction, to_status=P.STARTING, cause=cause)
    return prediction


def claim(prediction_id: str) -> Prediction | None:
    """STARTING -> PROCESSING, once: the prediction to run, or None when there is nothing to run
    (already claimed, ended, not yet paid under ``before_run``, or past its Cancel-After and
    aborted; past it but already charged, it runs without the deadline: see abort_overdue)."""
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None or prediction.status != P.STARTING:
            return None  # delivered twice, canceled, or already claimed: never run a paid prediction twice
        late = bool(prediction.cancel_after_at and timezone.now() > prediction.cancel_after_at)
        if late and not _charged(prediction):
            _move(prediction, P.ABORTED, Cause.TASK, error=ABORTED_ERROR)
            return None
        payment = prediction.payment
        if (
            payment is not None
            and prediction.settlement_policy == SettlementPolicy.BEFORE_RUN
            and payment.status != PaymentStatus.CONFIRMED
        ):
            return None  # no compute before the money is in; the confirmation enqueues it again
        detail: dict[str, Any] = {}
        fields: dict[str, Any] = {}
        if late:  # paid for: deliver it rather than abort (the deadline no longer applies)
            detail["cancel_after"], fields["cancel_after_at"] = DEADLINE_WAIVED, None
        limit = _limit_the_authorization_allows(prediction)
        if limit is None:
            left = max(0, int(payment.valid_before - time.time())) if payment else 0
            error = EXPIRES_BEFORE_RUN_ERROR.format(left=left, limit=prediction.time_limit_seconds)
            _move(prediction, P.FAILED, Cause.TASK, error=error)  # releases it: nothing charged
            return None
        if limit < prediction.time_limit_seconds:
            detail["time_limit"] = f"cut from {prediction.time_limit_seconds}s: the payment authorization expires"
            fields["time_limit_seconds"] = limit
        _move(prediction, P.PROCESSING, Cause.TASK, detail=detail or None, **fields)
        return prediction


def _limit_the_authorization_allows(prediction: Prediction) -> int | None:
    """The time limit a run may start with: its own, unless its payment is held for settlement
    after the run (``upto``, ``after_success``) and the authorization would expire before the
    run ends and its settlement lands (queue wait counts against it). Then what is left (minus
    the watchdog's slack and the settlement margin) if that keeps a fair share of the limit,
    else None: the run must not start."""
    payment, limit = prediction.payment, prediction.time_limit_seconds
    if payment is None or payment.status != PaymentStatus.VERIFIED or payment.settle_requested_at is not None:
        return limit  # free, paid already, or being settled now: the authorization is not held
    margin = settings.X402_SETTLE_MARGIN_SECONDS + WATCHDOG_SLACK
    left = math.floor(payment.valid_before - time.time() - margin)
    if left >= limit:
        return limit
    return left if left >= max(1, math.ceil(limit * MIN_CUT_LIMIT_SHARE)) else None


def run_started(prediction_id: str) -> int | None:
    """Its runner confirmed it has the run: the run clock starts (once) and the time-limit
    watchdog is armed. The time limit the run has, or None when it must not run (it ended
    meanwhile; or its held authorization can no longer outlast it: it fails, nothing charged).

    A held authorization (``upto``, ``after_success``) was checked at the claim; the wait for
    the runner (busy retries, model loading) counts against it, so the limit may be cut again
    here, by the claim's rule (:func:`_limit_the_authorization_allows`)."""
    started = (
        Prediction.objects.running()
        .filter(pk=prediction_id, run_started_at__isnull=False)
        .values_list("time_limit_seconds", flat=True)
        .first()
    )
    if started is not None:
        return started  # confirmed already (a runner's later reports): no lock taken
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None or prediction.status != P.PROCESSING or prediction.run_ended_at is not None:
            return None
        if prediction.run_started_at is not None:
            return prediction.time_limit_seconds
        limit = _limit_the_authorization_allows(prediction)
        if limit is None:
            left = max(0, int(prediction.payment.valid_before - time.time())) if prediction.payment else 0
            error = EXPIRES_BEFORE_RUN_ERROR.format(left=left, limit=prediction.time_limit_seconds)
            _move(prediction, P.FAILED, Cause.TASK, stop_run=True, error=error)
            return None
        now = timezone.now()
        prediction.run_started_at = prediction.alive_at = now
        prediction.time_limit_seconds = limit
        prediction.save(update_fields=["run_started_at", "alive_at", "time_limit_seconds"])
        transaction.on_commit(lambda: _arm_watchdog(prediction_id, limit))
        return limit


def _arm_watchdog(prediction_id: str, limit: int) -> None:
    """The watchdog of a run just started (after commit); with the broker down, the lost-run
    sweep is the backstop."""
    try:
        dispatch.send(dispatch.ENFORCE_TIME_LIMIT, prediction_id, countdown=limit + WATCHDOG_SLACK)
    except (OperationalError, OSError) as exc:
        log.error("prediction %s: watchdog not armed (broker: %s), left for the sweep", prediction_id, exc)


def record_alive(prediction_id: str) -> None:
    """A sign of life of a run going on (its runner's heartbeat or report)."""
    Prediction.objects.running().filter(pk=prediction_id, run_started_at__isnull=False).update(
        alive_at=timezone.now()
    )


def running(prediction_id: str) -> Prediction | None:
    """The prediction if it is claimed and its runner has not reported yet (a start retried)."""
    return (
        Prediction.objects.running()
        .select_related("model", "version", "payment")
        .filter(pk=prediction_id)
        .first()
    )


def finish(prediction_id: str, outcome: Outcome, *, cause: str) -> str:
    """Record a run's outcome (any runner), once, whenever it arrives: only a claimed run not yet
    reported is written, so a cancel during the run, or a second report, changes nothing.

    A success under ``after_success`` keeps its output back (status stays PROCESSING) and asks
    for settlement; the payment's confirmation releases it (:func:`on_payment`). A payment
    already confirmed (settled before the run ended, by whomever) releases it at once: the
    confirmation that would have released it has come and gone.
    """
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None:
            return "missing"
        if prediction.status != P.PROCESSING or prediction.run_ended_at is not None:
            return prediction.status
        now = timezone.now()
        predict_time = outcome.predict_time
        if predict_time is None:
            predict_time = (now - (prediction.run_started_at or now)).total_seconds()
        fields: dict[str, Any] = {"run_ended_at": now, "predict_time": predict_time, "error": outcome.error}
        if outcome.logs is not None and outcome.logs != prediction.logs:
            if prediction.logs_released:  # held ones are told when they are released (_move)
                events.logs_grew(prediction.pk, prediction.logs, outcome.logs)
                webhooks.send(prediction, "logs")
            fields["logs"] = outcome.logs
        if not outcome.succeeded:
            run_end = RunEnd.STOPPED if outcome.timed_out else RunEnd.FAILED
            _move(prediction, P.FAILED, cause, run_end=run_end, **fields)
        elif (
            prediction.payment is not None
            and prediction.settlement_policy == SettlementPolicy.AFTER_SUCCESS
            and prediction.payment.status != PaymentStatus.CONFIRMED
        ):
            fields["output"] = outcome.output
            for name, value in fields.items():
                setattr(prediction, name, value)
            prediction.save(update_fields=list(fields))
            if ledger.is_usage_priced(prediction.payment):
                ledger.charge_usage(prediction.payment, _run_seconds(prediction, now), RunEnd.SUCCEEDED)
            else:
                ledger.request_settlement(prediction.payment)
        else:
            _move(prediction, P.SUCCEEDED, cause, output=outcome.output, **fields)
        model = str(prediction.model)
        transaction.on_commit(lambda: PREDICTION_SECONDS.labels(model=model).observe(predict_time))
        return prediction.status


def record_logs(prediction_id: str, logs: str, *, cause: str) -> None:
    """New logs of a running prediction (a runner's progress report). Logs only grow: a report
    that arrives after a later one (deliveries overtake each other) changes nothing."""
    with transaction.atomic():
        prediction = Prediction.objects.select_for_update().filter(pk=prediction_id).first()
        if prediction is None or prediction.status != P.PROCESSING or prediction.run_ended_at is not None:
            return
        if len(logs) > len(prediction.logs):
            before, prediction.logs = prediction.logs, logs
            prediction.save(update_fields=["logs"])
            if prediction.logs_released:  # held ones are told with the end (see logs_released)
                events.logs_grew(prediction_id, before, logs)
                webhooks.send(prediction, "logs")
            log.debug("prediction %s: logs from %s", prediction_id, cause)


def record_output(prediction_id: str, output: list[Any], *, cause: str, webhook: bool = True) -> None:
    """The output so far of a running prediction that streams (the pieces a generator yielded,
    a runner's progress report). It only grows: a shorter or late report changes nothing. When
    the output may be shown (see ``Prediction.output_released``) its listeners are told, and an
    ``output`` webhook goes out unless the runner throttles them (``webhook=False``; Replicate
    sends at most one every 500 ms, and the ``completed`` one carries everything)."""
    with transaction.atomic():
        prediction = Prediction.objects.select_for_update().filter(pk=prediction_id).first()
        if prediction is None or prediction.status != P.PROCESSING or prediction.run_ended_at is not None:
            return
        known = prediction.output if isinstance(prediction.output, list) else []
        if not isinstance(output, list) or len(output) <= len(known):
            return
        prediction.output = output
        prediction.save(update_fields=["output"])
        if prediction.output_released:
            if webhook:
                webhooks.send(prediction, "output")
            events.output_grew(prediction_id, known, output)
        log.debug("prediction %s: %d output pieces from %s", prediction_id, len(output), cause)


def cancel(
    prediction_id: str, *, cause: str = Cause.CANCEL, detail: dict[str, Any] | None = None
) -> Prediction:
    """Cancel a prediction that has not finished (a finished run, even one whose output awaits
    its payment, is left alone: its work is done and paid for).

    What the agent pays: before the run, nothing if its authorization was not yet being settled
    (it is released); under ``before_run`` a settlement already under way is charged. During the
    run, ``after_success`` releases the payment (no success, no charge); ``before_run`` was paid;
    a pay-per-second run canceled by its payer (the API's cancel) is charged the seconds it ran,
    one canceled by an operator only the model's failure charge. Claimed but not yet started on
    its runner (waiting for a busy one) is before the run: nothing of the wait is charged
    (``before_run`` is owed a refund, per-second only the failure charge).
    """
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None:
            raise Prediction.DoesNotExist(prediction_id)
        if prediction.is_terminal or prediction.run_ended_at is not None:
            return prediction
        _move(
            prediction,
            P.CANCELED,
            cause,
            detail=detail,
            stop_run=prediction.status == P.PROCESSING,
            run_end=RunEnd.STOPPED if cause == Cause.CANCEL and prediction.run_started_at else RunEnd.FAILED,
            error="canceled",
        )
        return prediction


def _charged(prediction: Prediction) -> bool:
    """Its payment is being or has been settled: aborting it now would charge for nothing."""
    return prediction.payment is not None and prediction.payment.status in CHARGED_STATUSES


def abort_overdue(prediction_id: str, *, cause: str) -> bool:
    """STARTING past its Cancel-After deadline -> ABORTED, not charged (its authorization is
    released). Once its settlement has begun the agent is charged, so it is run instead: an
    agent never pays for an aborted prediction."""
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if (
            prediction is None
            or prediction.status != P.STARTING
            or not prediction.cancel_after_at
            or prediction.cancel_after_at > timezone.now()
            or _charged(prediction)  # paid for: it runs once its payment is confirmed (see claim)
        ):
            return False
        _move(prediction, P.ABORTED, cause, error=ABORTED_ERROR)
        return True


def cancel_past_deadline(prediction_id: str, *, cause: str) -> bool:
    """A run still going past its Cancel-After deadline is canceled and stopped on its runner
    (Replicate's ``canceled``: under ``before_run`` it was paid for; ``after_success`` releases;
    paid per second, it is charged the seconds it ran: the payer set the deadline)."""
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if (
            prediction is None
            or prediction.status != P.PROCESSING
            or prediction.run_ended_at is not None
            or not prediction.cancel_after_at
            or prediction.cancel_after_at > timezone.now()
        ):
            return False
        run_end = RunEnd.STOPPED if prediction.run_started_at else RunEnd.FAILED
        _move(prediction, P.CANCELED, cause, stop_run=True, run_end=run_end, error=DEADLINE_ERROR)
        return True


def end_at_limit(prediction_id: str, *, runner_alive: bool, cause: str) -> bool:
    """The time-limit watchdog: end a run still going at its time limit (counted from its
    start on its runner), and cancel it on its runner.

    Stopped (``RunEnd.STOPPED``: its compute was used, charged its seconds, not refunded) only
    on evidence the run was alive: a sign of life within :data:`ALIVE_WINDOW` (the python
    runner's heartbeat, a Cog report) or ``runner_alive`` (its runner's own word, asked just
    before). Without it the run ended on our side (a killed worker, a lost runner): failed
    (``RunEnd.FAILED``: refunded, released, or the failure charge)."""
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None or prediction.status != P.PROCESSING or prediction.run_ended_at is not None:
            return False
        now = timezone.now()
        started, limit = prediction.run_started_at, prediction.time_limit_seconds
        if started is None or started + timedelta(seconds=limit) > now:
            return False
        beat = prediction.alive_at
        alive = runner_alive or (beat is not None and beat >= now - timedelta(seconds=ALIVE_WINDOW))
        _move(
            prediction,
            P.FAILED,
            cause,
            detail={"alive": "runner" if runner_alive else str(beat)} if alive else None,
            stop_run=True,
            run_end=RunEnd.STOPPED if alive else RunEnd.FAILED,
            error=(OVERRAN_ERROR if alive else LOST_ERROR).format(limit=limit),
        )
        return True


def fail_overdue(prediction_id: str, *, grace: float, cause: str) -> bool:
    """The lost-run sweep: fail a run still going ``grace`` seconds past its time limit (its
    watchdog was lost), and cancel it on its runner. ``RunEnd.FAILED``: nothing came back at
    all, the run was lost on our side."""
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None or prediction.status != P.PROCESSING or prediction.run_ended_at is not None:
            return False
        limit = timedelta(seconds=prediction.time_limit_seconds + grace)
        if prediction.run_started_at is None or prediction.run_started_at + limit > timezone.now():
            return False
        _move(
            prediction,
            P.FAILED,
            cause,
            stop_run=True,
            run_end=RunEnd.FAILED,
            error=LOST_ERROR.format(limit=prediction.time_limit_seconds),
        )
        return True


def fail_unstarted(prediction_id: str, *, cause: str) -> bool:
    """A claimed run whose runner never confirmed it within ``X402_RUN_START_TIMEOUT`` (busy
    retries exhausted, a worker killed before the run, a PUT answered 5xx and never run) ended
    on our side: failed (refunded, released, or the failure charge) and canceled on its runner,
    so a late start runs nothing (:func:`run_started` answers None)."""
    timeout = settings.X402_RUN_START_TIMEOUT
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if (
            prediction is None
            or prediction.status != P.PROCESSING
            or prediction.run_ended_at is not None
            or prediction.run_started_at is not None
            or prediction.started_at is None
            or prediction.started_at + timedelta(seconds=timeout) > timezone.now()
        ):
            return False
        _move(
            prediction,
            P.FAILED,
            cause,
            stop_run=True,
            run_end=RunEnd.FAILED,
            error=NOT_STARTED_ERROR.format(timeout=timeout),
        )
        return True


class RefundCause(StrEnum):
    """Why a prediction that ended unserved is, or is not, owed a refund (on the OWED event, for
    finance): see :attr:`owed`."""

    #: The run failed on our side (predictor error, runner lost) before any output left.
    FAILED = "failed"
    #: Canceled or aborted before the run started (on its runner): nothing was computed.
    NOT_STARTED = "ended_before_run"
    #: Canceled by an operator (our decision, not the payer's), whenever.
    OPERATOR = "canceled_by_operator"
    #: Stopped at its time limit: the compute was used as asked (the payer's input decides how
    #: long it runs), as Replicate bills it. Not owed.
    TIME_LIMIT = "time_limit"
    #: Failed after output pieces were delivered (a before_run run streams them while it
    #: runs): the payer has part of what it paid for. Not owed.
    FAILED_AFTER_OUTPUT = "failed_after_output"
    #: Canceled by its payer after the run started. Not owed.
    CANCELED_RUNNING = "canceled_while_running"
    #: Released unsettled (or refused before the run), then paid on chain by someone who
    #: submitted the authorization: owed whatever the policy (see :func:`_refund_if_owed`).
    PAID_ALTHOUGH_RELEASED = "paid_although_released"

    @property
    def owed(self) -> bool:
        return self in {
            RefundCause.FAILED,
            RefundCause.NOT_STARTED,
            RefundCause.OPERATOR,
            RefundCause.PAID_ALTHOUGH_RELEASED,
        }

    @property
    def ours(self) -> bool:
        """Owed for what we did (a failure on our side, an operator's cancel): paid without a
        human under the refund policy. A payer's own cancel (or Cancel-After) before its run,
        and an authorization someone submitted after we released it, are owed too but
        reviewed by finance: otherwise paying, canceling and being refunded is a loop that
        costs the payer nothing and us a settlement and a refund transfer each time."""
        return self in {RefundCause.FAILED, RefundCause.OPERATOR}


def _ended_run(prediction: Prediction) -> dict[str, Any]:
    """How its run ended (``run_end``, ``output_pieces``: recorded by :func:`_move` on the event
    that ended it while it ran), or {} when it ended before its run."""
    event = prediction.events.filter(to_status=prediction.status).order_by("-pk").first()
    return event.detail if event is not None else {}


def _refund_cause(prediction: Prediction) -> RefundCause | None:
    """The refund policy, for a prediction that ended unserved: money back only when the
    payer got nothing and it is not the payer's doing: the run failed on our side before any
    output left, or the prediction was canceled or aborted before its run started, or an
    operator canceled it. Not refunded: a run stopped at its time limit (the compute was used as
    asked), a run that failed after streaming output pieces (a before_run payer sees them while
    it runs), a cancel by its payer after the run started; all as Replicate bills runs for the
    time used. "Started" is its runner's confirmation (``run_started_at``), not the claim: a
    wait for a busy runner is before the run. None: not ended unserved."""
    if prediction.status == P.FAILED:
        run = _ended_run(prediction)
        if run.get("run_end") == RunEnd.STOPPED:
            return RefundCause.TIME_LIMIT
        if run.get("output_pieces", 0) > 0:
            return RefundCause.FAILED_AFTER_OUTPUT
        return RefundCause.FAILED
    if prediction.status not in ENDED_UNSERVED:
        return None
    if prediction.started_at is None:
        return RefundCause.NOT_STARTED
    if prediction.events.filter(to_status=P.CANCELED, cause=Cause.ADMIN).exists():
        return RefundCause.OPERATOR
    if prediction.run_started_at is None:
        return RefundCause.NOT_STARTED
    return RefundCause.CANCELED_RUNNING


def _refund_if_owed(prediction: Prediction, payment: Payment) -> None:
    """A prediction that ended without its output, under a policy that refunds, whose payment
    is confirmed, and that the refund policy covers (:func:`_refund_cause`): the payer is owed
    the money back (payments.refunds, once per payment). So is any payment that ends paid
    although we released it unsettled (``settle_requested_at`` never set: an ``after_success``
    authorization someone else submitted after its run failed, or one refused before its run).
    A payment still settling is looked at again when it confirms (:func:`on_payment`). The
    reason names the payment, never the prediction id (a bearer capability)."""
    if payment.status != PaymentStatus.CONFIRMED:
        return
    if payment.settle_requested_at is None and prediction.status != P.SUCCEEDED:
        # Paid although we never asked for it (released, or refused before its run): someone
        # submitted the authorization we let go. Whatever the policy, it is the payer's money.
        refunds.owe(
            payment,
            f"payment {payment.pk}: paid on chain although released unsettled; the prediction ended "
            f"{prediction.status}: {prediction.error}",
            detail={"cause": str(RefundCause.PAID_ALTHOUGH_RELEASED), "prediction_status": prediction.status},
            auto_approve=RefundCause.PAID_ALTHOUGH_RELEASED.ours,
        )
        return
    cause = _refund_cause(prediction)
    if cause is not None and cause.owed and SettlementPolicy(prediction.settlement_policy).refunds_unserved:
        seconds = _run_seconds(prediction, prediction.completed_at or timezone.now()) if prediction.started_at else 0
        refunds.owe(
            payment,
            f"payment {payment.pk}: the prediction ended {prediction.status} ({cause}): {prediction.error}",
            detail={
                "cause": str(cause),
                "run_seconds": str(seconds),
                "prediction_status": prediction.status,
                "output_pieces": _ended_run(prediction).get("output_pieces", 0),
            },
            auto_approve=cause.ours,
        )


def on_payment(payment: Payment) -> None:
    """The ledger moved ``payment`` (called inside its transaction, payment locked).

    Confirmed: a finished ``after_success`` run is released (SUCCEEDED: ``output`` and
    ``completed`` webhooks), a waiting ``before_run`` prediction is enqueued, and one that
    already ended unserved is owed a refund. Failed or expired: an unfinished prediction fails
    (and a run in progress is canceled on its runner).
    """
    prediction_id = Prediction.objects.filter(payment=payment).values_list("pk", flat=True).first()
    if prediction_id is None:
        return
    prediction = _lock(prediction_id)
    if prediction is None:
        return
    if prediction.is_terminal:
        _refund_if_owed(prediction, payment)  # money that arrived after the run ended unserved
        return
    if payment.status == PaymentStatus.CONFIRMED:
        if prediction.status == P.PROCESSING and prediction.run_ended_at is not None:
            _move(prediction, P.SUCCEEDED, Cause.PAYMENT, detail={"payment": str(payment.pk)})
        elif prediction.status == P.STARTING and prediction.settlement_policy == SettlementPolicy.BEFORE_RUN:
            transaction.on_commit(lambda: scheduling.enqueue_run(prediction))
    elif payment.status in UNPAID_STATUSES:
        _move(
            prediction,
            P.FAILED,
            Cause.PAYMENT,
            detail={"payment": str(payment.pk)},
            stop_run=prediction.status == P.PROCESSING and prediction.run_ended_at is None,
            error=f"payment {payment.status}: {payment.failure_reason}",
        )


def on_unsettled(payment: Payment) -> None:
    """The chain says ``payment`` (LAPSING: we will not, or could not, settle it) is unused
    (called inside its transaction, payment locked). A prediction still waiting to start for it
    fails now, with the reason, instead of staying ``starting`` until the authorization lapses;
    if someone still submits it, it is paid and refunded (:func:`_refund_if_owed`)."""
    prediction_id = Prediction.objects.filter(payment=payment).values_list("pk", flat=True).first()
    prediction = _lock(prediction_id) if prediction_id is not None else None
    if prediction is None or prediction.status != P.STARTING:
        return
    _move(
        prediction,
        P.FAILED,
        Cause.PAYMENT,
        detail={"payment": str(payment.pk)},
        error=f"payment not settled: {payment.failure_reason}",
    )
