"""The prediction lifecycle: the only code that changes ``Prediction.status``.

Every change is checked against :data:`TRANSITIONS` and written with an appended
:class:`~predictions.models.PredictionEvent` (what caused it) in one transaction. From here,
and only here, follow the consequences:

- in the same transaction, the ledger writes that must not be lost or half-done, and the
  refund owed (:mod:`predictions.charges`: settlement asked for, authorization released, a
  pay-per-second run charged, a refund owed);
- after commit: the webhooks the prediction's filter asks for (``start``, ``logs``,
  ``output``, ``completed``), the progress events its listeners wait for (``events``: logs,
  output, end), metrics, enqueuing the run, and stopping a run on its runner.

Locks are taken payment first, then prediction: the order in which the ledger reaches us
(``Payment.advance`` holds the payment and sends ``payment_advanced``, see receivers.py), so the
two never wait on each other crosswise.

The settlement policy and the time limit are the prediction's own (copied from the model at
creation): a model edited mid-run changes nothing about a run already paid for.

The run clock (:mod:`predictions.runclock`) decides how long a run may take and when it is
over: the limit a held authorization allows (at the claim and at :func:`run_started`, when
its runner confirms the run and the watchdog is armed), a run ended at its limit
(:func:`end_at_limit`), lost past it (:func:`fail_overdue`) or never started
(:func:`fail_unstarted`); this module moves the prediction as it decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from django.db import transaction
from django.utils import timezone
from prometheus_client import Counter

from payments.ledger import RunEnd
from payments.metrics import PREDICTION_SECONDS
from payments.models import UNPAID_STATUSES, Payment, PaymentStatus
from x402site import rows

from . import charges, events, runclock, scheduling, webhooks
from .charges import ENDED_UNSERVED
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
ABORTED_ERROR = "aborted: the Cancel-After deadline passed before the prediction started"
DEADLINE_ERROR = "canceled: the Cancel-After deadline passed while the prediction ran"
#: Why a prediction past its deadline ran all the same (in its PROCESSING event's detail).
DEADLINE_WAIVED = "the Cancel-After deadline passed after the payment was settled: run, not aborted"
PREDICTIONS_ENDED = Counter("x402_predictions_total", "Predictions that ended, by status", ["status"])


class IllegalTransition(Exception):
    pass


def _lock(prediction_id: str) -> Prediction | None:
    """The prediction, locked (its payment locked first); None if there is no such prediction."""
    # A prediction's payment is fixed at its creation: found and locked in one statement.
    list(Payment.objects.select_for_update(of=("self",)).filter(prediction__pk=prediction_id).values_list("pk", flat=True))
    return (
        Prediction.objects.select_for_update(of=("self",))
        .select_related("model__hardware", "version", "payment")
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
        if previous == P.PROCESSING:  # what the refund policy asks (charges.refund_cause)
            ended_run = charges.run_record(prediction, run_end)
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
        charges.bill_unserved(prediction, ran=previous == P.PROCESSING, run_end=run_end, now=now)
    if to in TERMINAL and prediction.channel_id is not None:
        charges.bill_channel(prediction, ran=previous == P.PROCESSING, run_end=run_end, now=now)
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


def create(
    version: ModelVersion,
    inputs: dict[str, Any],
    *,
    payment: Payment | None,
    settlement_policy: str,
    options: dict[str, Any] | None = None,
    cause: str = Cause.API,
    channel_id: int | None = None,
    prediction_id: str | None = None,
) -> Prediction:
    """A new STARTING prediction with its first event (call inside the transaction that recorded
    its payment, or held its ``channel_id`` for ``prediction_id``). Its time limit and
    settlement policy are fixed here, for good."""
    prediction = Prediction(
        **({"id": prediction_id} if prediction_id else {}),
        model=version.model,
        version=version,
        input=inputs,
        payment=payment,
        channel_id=channel_id,
        settlement_policy=settlement_policy,
        time_limit_seconds=version.model.time_limit_seconds,
        **(options or {}),
    )
    prediction.assign_ref()
    rows.insert(prediction, PredictionEvent(prediction=prediction, to_status=P.STARTING, cause=cause))
    return prediction


def claim(prediction_id: str, *, starts_at_once: Callable[[Prediction], bool] | None = None) -> Prediction | None:
    """STARTING -> PROCESSING, once: the prediction to run, or None when there is nothing to run
    (already claimed, ended, not yet paid under ``before_run``, or past its Cancel-After and
    aborted; past it but already charged, it runs without the deadline: see abort_overdue).

    ``starts_at_once``, asked of the locked prediction: its runner has the run the moment it is
    claimed (a predictor loaded in this process). Then the run clock starts with the claim, in
    its transaction, as :func:`run_started` would start it (``run_started_at`` set, the
    watchdog armed): one transaction and no start watchdog for a run with nothing to load."""
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None or prediction.status != P.STARTING:
            return None  # delivered twice, canceled, or already claimed: never run a paid prediction twice
        late = bool(prediction.cancel_after_at and timezone.now() > prediction.cancel_after_at)
        if late and not charges.charged(prediction):
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
        limit = runclock.limit_the_authorization_allows(prediction)
        if limit is None:  # released: nothing charged
            _move(prediction, P.FAILED, Cause.TASK, error=runclock.expires_before_run_error(prediction))
            return None
        if limit < prediction.time_limit_seconds:
            detail["time_limit"] = f"cut from {prediction.time_limit_seconds}s: the payment authorization expires"
            fields["time_limit_seconds"] = limit
        if starts_at_once is not None and starts_at_once(prediction):
            fields["started_at"] = fields["run_started_at"] = fields["alive_at"] = timezone.now()
            transaction.on_commit(lambda: runclock.arm_watchdog(prediction_id, limit))
        _move(prediction, P.PROCESSING, Cause.TASK, detail=detail or None, **fields)
        return prediction


def run_started(prediction_id: str) -> int | None:
    """Its runner confirmed it has the run: the run clock starts (once) and the time-limit
    watchdog is armed. The time limit the run has, or None when it must not run (it ended
    meanwhile; or its held authorization can no longer outlast it: it fails, nothing charged).

    A held authorization (``upto``, ``after_success``) was checked at the claim; the wait for
    the runner (busy retries, model loading) counts against it, so the limit may be cut again
    here, by the claim's rule (``runclock.limit_the_authorization_allows``)."""
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
        limit = runclock.limit_the_authorization_allows(prediction)
        if limit is None:
            error = runclock.expires_before_run_error(prediction)
            _move(prediction, P.FAILED, Cause.TASK, stop_run=True, error=error)
            return None
        now = timezone.now()
        prediction.run_started_at = prediction.alive_at = now
        prediction.time_limit_seconds = limit
        prediction.save(update_fields=["run_started_at", "alive_at", "time_limit_seconds"])
        transaction.on_commit(lambda: runclock.arm_watchdog(prediction_id, limit))
        return limit


def record_alive(prediction_id: str) -> None:
    """A sign of life of a run going on (its runner's heartbeat or report)."""
    Prediction.objects.running().filter(pk=prediction_id, run_started_at__isnull=False).update(
        alive_at=timezone.now()
    )


def running(prediction_id: str) -> Prediction | None:
    """The prediction if it is claimed and its runner has not reported yet (a start retried)."""
    return (
        Prediction.objects.running()
        .select_related("model__hardware", "version", "payment")
        .filter(pk=prediction_id)
        .first()
    )


def finish(prediction_id: str, outcome: Outcome, *, cause: str) -> str:
    """Record a run's outcome (any runner), once, whenever it arrives: only a claimed run not yet
    reported is written, so a cancel during the run, or a second report, changes nothing.

    A success under ``after_success`` keeps its output back (status stays PROCESSING) and asks
    for settlement; the payment's confirmation releases it (:func:`on_payments`). A payment
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
            charges.bill_success(prediction, now)
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
            or charges.charged(prediction)  # paid for: it runs once its payment is confirmed (see claim)
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
    """The time-limit watchdog: end a run still going at its time limit, stopped if it was
    alive, else lost on our side (``runclock.at_limit``; ``runner_alive``: its runner's own
    word, asked just before), and cancel it on its runner."""
    return _end_run(prediction_id, partial(runclock.at_limit, runner_alive=runner_alive), cause)


def fail_overdue(prediction_id: str, *, grace: float, cause: str) -> bool:
    """The lost-run sweep: fail a run still going ``grace`` seconds past its time limit (its
    watchdog was lost; ``runclock.overdue``), and cancel it on its runner."""
    return _end_run(prediction_id, partial(runclock.overdue, grace=grace), cause)


def fail_unstarted(prediction_id: str, *, cause: str) -> bool:
    """A claimed run whose runner never confirmed it within ``X402_RUN_START_TIMEOUT``
    (``runclock.unstarted``) ended on our side: failed (refunded, released, or the failure
    charge) and canceled on its runner, so a late start runs nothing (:func:`run_started`
    answers None)."""
    return _end_run(prediction_id, runclock.unstarted, cause)


def _end_run(
    prediction_id: str, verdict: Callable[[Prediction, datetime], runclock.RunEnding | None], cause: str
) -> bool:
    """End a run still going (claimed, not yet reported) as the run clock's ``verdict`` says,
    and cancel it on its runner: whether it ended."""
    with transaction.atomic():
        prediction = _lock(prediction_id)
        if prediction is None or prediction.status != P.PROCESSING or prediction.run_ended_at is not None:
            return False
        ending = verdict(prediction, timezone.now())
        if ending is None:
            return False
        _move(
            prediction,
            P.FAILED,
            cause,
            detail=ending.detail,
            stop_run=True,
            run_end=ending.run_end,
            error=ending.error,
        )
        return True


def on_payments(payments: list[Payment]) -> None:
    """The ledger moved ``payments`` (called inside its transaction, the payments locked): their
    predictions, locked in one query, move by :func:`_on_payment`. Settling and settled moves
    read nothing (nothing happens before the chain's last word)."""
    acting = {p.pk: p for p in payments if p.status == PaymentStatus.CONFIRMED or p.status in UNPAID_STATUSES}
    if not acting:
        return
    predictions = (
        Prediction.objects.select_for_update(of=("self",))
        .select_related("model__hardware", "version", "payment")
        .filter(payment__in=list(acting))
        .order_by("pk")
    )
    to_run: list[Prediction] = []
    for prediction in predictions:
        _on_payment(prediction, acting[prediction.payment_id], to_run)
    if to_run:
        transaction.on_commit(lambda: scheduling.enqueue_runs(to_run))


def _on_payment(prediction: Prediction, payment: Payment, to_run: list[Prediction]) -> None:
    """One prediction whose payment the ledger moved (both locked).

    Confirmed: a finished ``after_success`` run is released (SUCCEEDED: ``output`` and
    ``completed`` webhooks), a waiting ``before_run`` prediction is enqueued (``to_run``), and one that
    already ended unserved is owed a refund. Failed or expired: an unfinished prediction fails
    (and a run in progress is canceled on its runner).
    """
    if prediction.is_terminal:
        charges.refund_if_owed(prediction, payment)  # money that arrived after the run ended unserved
        return
    if payment.status == PaymentStatus.CONFIRMED:
        if prediction.status == P.PROCESSING and prediction.run_ended_at is not None:
            _move(prediction, P.SUCCEEDED, Cause.PAYMENT, detail={"payment": str(payment.pk)})
        elif prediction.status == P.STARTING and prediction.settlement_policy == SettlementPolicy.BEFORE_RUN:
            to_run.append(prediction)  # enqueued after commit
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
    if someone still submits it, it is paid and refunded (``charges.refund_if_owed``)."""
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
