"""The run clock and its watchdog: how long a run may take, when it started, and when it is
over. Decisions only: the lifecycle (the one writer of a prediction's status) asks them and
moves the prediction.

A claim (STARTING -> PROCESSING) is not a run. The billable clock and the time-limit watchdog
start when the runner confirms it has the run (``lifecycle.run_started``: Cog accepted the PUT,
the python runner loaded its predictor and entered ``predict``), or with the claim when the
runner has it at once (a predictor already loaded in the worker); a claimed run whose runner
never confirms within ``X402_RUN_START_TIMEOUT`` ended on our side (:func:`unstarted`). At its
limit a run ends "stopped" (its compute used, charged) only on evidence it was alive
(:func:`at_limit`: a recent heartbeat or report, or its runner's own word); without it the run
was lost on our side (failed: refunded, released, failure charge).

A run whose authorization is held until after it (``upto``, ``after_success``) starts only if
the authorization outlasts it and its settlement: the claim cuts its limit, or fails it
unstarted (:func:`limit_the_authorization_allows`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from kombu.exceptions import OperationalError

from payments.ledger import RunEnd
from payments.models import PaymentStatus
from x402site import dispatch
from x402site.conf import x402

from .models import Prediction

log = logging.getLogger("predictions.runclock")

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


@dataclass(frozen=True)
class RunEnding:
    """The clock's verdict on a run it ends (failed, stopped on its runner): how it is charged
    (``run_end``), its error, and what the ending event records (``detail``)."""

    run_end: RunEnd
    error: str
    detail: dict[str, Any] | None = None


def limit_the_authorization_allows(prediction: Prediction) -> int | None:
    """The time limit a run may start with: its own, unless its payment is held for settlement
    after the run (``upto``, ``after_success``) and the authorization would expire before the
    run ends and its settlement lands (queue wait counts against it). Then what is left (minus
    the watchdog's slack and the settlement margin) if that keeps a fair share of the limit,
    else None: the run must not start."""
    payment, limit = prediction.payment, prediction.time_limit_seconds
    if payment is None or payment.status != PaymentStatus.VERIFIED or payment.settle_requested_at is not None:
        return limit  # free, paid already, or being settled now: the authorization is not held
    margin = x402.verification.settle_margin_seconds + WATCHDOG_SLACK
    left = math.floor(payment.valid_before - time.time() - margin)
    if left >= limit:
        return limit
    return left if left >= max(1, math.ceil(limit * MIN_CUT_LIMIT_SHARE)) else None


def expires_before_run_error(prediction: Prediction) -> str:
    """Why a run whose held authorization cannot outlast it (see
    :func:`limit_the_authorization_allows`) is not started."""
    payment = prediction.payment
    left = max(0, int(payment.valid_before - time.time())) if payment else 0
    return EXPIRES_BEFORE_RUN_ERROR.format(left=left, limit=prediction.time_limit_seconds)


def arm_watchdog(prediction_id: str, limit: int) -> None:
    """The watchdog of a run just started (after commit); with the broker down, the lost-run
    sweep is the backstop."""
    try:
        dispatch.send(dispatch.ENFORCE_TIME_LIMIT, prediction_id, countdown=limit + WATCHDOG_SLACK)
    except (OperationalError, OSError) as exc:
        log.error("prediction %s: watchdog not armed (broker: %s), left for the sweep", prediction_id, exc)


def run_seconds(prediction: Prediction, now: datetime) -> Decimal:
    """The run's measured seconds: the runner's ``predict_time``, else the wall time since its
    runner confirmed the run (a run stopped before it reported); 0 for a run never started
    (waiting for a busy runner is not billed)."""
    limit = prediction.time_limit_seconds  # what the payer was told it could run; never billed past it
    if prediction.predict_time is not None:
        return Decimal(str(min(prediction.predict_time, limit)))
    if prediction.run_started_at is None:
        return Decimal(0)
    return Decimal(str(min(max(0.0, (now - prediction.run_started_at).total_seconds()), limit)))


def at_limit(prediction: Prediction, now: datetime, *, runner_alive: bool) -> RunEnding | None:
    """The time-limit watchdog's verdict on a run going on: None before its time limit (counted
    from its start on its runner). Past it: stopped (``RunEnd.STOPPED``: its compute was used,
    charged its seconds, not refunded) only on evidence the run was alive: a sign of life within
    :data:`ALIVE_WINDOW` (the python runner's heartbeat, a Cog report) or ``runner_alive`` (its
    runner's own word, asked just before). Without it the run ended on our side (a killed
    worker, a lost runner): failed (``RunEnd.FAILED``: refunded, released, or the failure
    charge)."""
    started, limit = prediction.run_started_at, prediction.time_limit_seconds
    if started is None or started + timedelta(seconds=limit) > now:
        return None
    beat = prediction.alive_at
    alive = runner_alive or (beat is not None and beat >= now - timedelta(seconds=ALIVE_WINDOW))
    return RunEnding(
        run_end=RunEnd.STOPPED if alive else RunEnd.FAILED,
        error=(OVERRAN_ERROR if alive else LOST_ERROR).format(limit=limit),
        detail={"alive": "runner" if runner_alive else str(beat)} if alive else None,
    )


def overdue(prediction: Prediction, now: datetime, *, grace: float) -> RunEnding | None:
    """The lost-run sweep's verdict on a run going on: failed when it is still going ``grace``
    seconds past its time limit (its watchdog was lost). ``RunEnd.FAILED``: nothing came back
    at all, the run was lost on our side."""
    limit = timedelta(seconds=prediction.time_limit_seconds + grace)
    if prediction.run_started_at is None or prediction.run_started_at + limit > now:
        return None
    return RunEnding(run_end=RunEnd.FAILED, error=LOST_ERROR.format(limit=prediction.time_limit_seconds))


def unstarted(prediction: Prediction, now: datetime) -> RunEnding | None:
    """The verdict on a claimed run whose runner never confirmed it within
    ``X402_RUN_START_TIMEOUT`` (busy retries exhausted, a worker killed before the run, a PUT
    answered 5xx and never run): it ended on our side, failed. None while it may still start."""
    timeout = x402.runs.start_timeout_seconds
    if (
        prediction.run_started_at is not None
        or prediction.started_at is None
        or prediction.started_at + timedelta(seconds=timeout) > now
    ):
        return None
    return RunEnding(run_end=RunEnd.FAILED, error=NOT_STARTED_ERROR.format(timeout=timeout))
