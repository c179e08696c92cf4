"""The in-process runner: a Cog-style predictor class (``setup()`` once, ``predict(**input)``).

The predictor is loaded (its ``setup()``, once per worker process) before the run: loading is
never billed nor counted against the time limit, and a predictor that cannot load fails the
run on our side. Then the run is confirmed (``lifecycle.run_started``: the run clock and the
watchdog start) and happens inside the Celery task, stopped at the prediction's own time limit
(what was paid for) as decided then, which may be shorter than when the task was sent (an
authorization about to expire cuts it): a per-run watcher thread beats (``alive_at``, the
watchdog's evidence that the run is alive) and raises
``SoftTimeLimitExceeded`` in the run's thread then, and :class:`RunStopped` when the prediction
ended meanwhile (its payer canceled it, its ``Cancel-After`` passed, the watchdog gave up on
it), so a run nobody pays for any more stops computing. Both arrive at the run's next Python
instruction: a predictor held in one long C call finishes that call first. The task's Celery
limits, set at enqueue from the uncut limit plus the time the run may take to start, are the
backstop (the hard one kills the worker child); whatever such a run returns after its prediction
ended is discarded
(``lifecycle.finish`` records one outcome of a run still in progress). What the predictor prints and logs becomes the prediction's logs, as
on Cog, reported while it runs (at most every :data:`REPORT_INTERVAL` seconds, by a reporter
thread) and in full with the outcome; only the run's own thread is captured (``capture.py``).

A predictor whose ``predict`` is a generator streams: its output is the list of what it
yielded (Replicate's iterator outputs), each piece recorded as it comes.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import logging
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from django.core.cache import cache
from django.core.exceptions import ValidationError

from x402site.conf import x402

from . import READY, Outcome, register
from .capture import Capture, capturing

if TYPE_CHECKING:
    from ..models import ModelVersion, Prediction

log = logging.getLogger("predictions.runners.python")

#: The hard limit (the worker child is killed) follows the soft one by this much.
HARD_LIMIT_GRACE = 30
#: Logs are reported, and output webhooks sent, at most this often while a run goes on
#: (Replicate throttles its logs and output webhooks to one per 500 ms).
REPORT_INTERVAL = 0.5
#: How often a run's watcher checks its time limit and whether its prediction ended.
STOP_CHECK_INTERVAL = 0.2
#: How often a run's watcher records that the run is alive (``lifecycle.record_alive``); well
#: within ``runclock.ALIVE_WINDOW``.
HEARTBEAT_INTERVAL = 1.0
STOPPED_ERROR = "the prediction ended while it ran; the run was stopped"
#: Sent to the run's thread (when it is the main thread) to wake it from a blocking call such as
#: ``time.sleep`` so the stop is delivered; its default action is to ignore it, so one that
#: arrives after the run is harmless.
WAKE_SIGNAL = signal.SIGURG


class RunStopped(BaseException):
    """Raised in a run's thread when its prediction ended meanwhile (a BaseException: a
    predictor's ``except Exception`` does not swallow it)."""


def _stop_key(prediction_id: str) -> str:
    return f"predictions:python:stop:{prediction_id}"


class Predictor(Protocol):
    def setup(self) -> None: ...

    def predict(self, **inputs: Any) -> Any: ...


def _predictor_class(dotted_path: str) -> type:
    module_name, _, class_name = dotted_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


#: The predictors this process has set up, by dotted path.
_loaded: dict[str, Predictor] = {}


def load_predictor(dotted_path: str) -> Predictor:
    """Import, instantiate and ``setup()`` a predictor once per worker process."""
    predictor = _loaded.get(dotted_path)
    if predictor is None:
        predictor = _predictor_class(dotted_path)()
        predictor.setup()
        _loaded[dotted_path] = predictor
    return predictor


class PythonRunner:
    kind = "python"
    label = "In-process Python predictor"

    def validate(self, version: ModelVersion) -> None:
        if not version.predictor:
            raise ValidationError(
                {"predictor": "A python runner needs the dotted path of a predictor class."}
            )
        try:
            cls = _predictor_class(version.predictor)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValidationError({"predictor": f"Cannot import {version.predictor}: {exc}"}) from None
        if not callable(getattr(cls, "predict", None)):
            raise ValidationError({"predictor": f"{version.predictor} has no predict() method."})

    def health(self, version: ModelVersion) -> str:
        return READY  # runs in whichever worker takes the task

    def task_options(self, prediction: Prediction) -> dict[str, Any]:
        """Celery's limits, the backstop of the run's own (:class:`_Stopper`): the limit at
        enqueue is the longest the run may get (the claim may only cut it), after loading the
        predictor within ``X402_RUN_START_TIMEOUT``."""
        limit = prediction.time_limit_seconds + x402.runs.start_timeout_seconds
        return {"soft_time_limit": limit, "time_limit": limit + HARD_LIMIT_GRACE}

    def alive(self, prediction: Prediction) -> bool:
        return False  # its watcher's heartbeat (alive_at) is the evidence

    def ready(self, version: ModelVersion) -> bool:
        return version.predictor in _loaded  # set up by an earlier run in this process

    def start(self, prediction: Prediction) -> Outcome:
        from .. import lifecycle

        try:
            predictor = load_predictor(prediction.version.predictor)
        except Exception as exc:  # noqa: BLE001 - a predictor that cannot load fails the run on our side
            log.warning("prediction %s: the predictor did not load: %s", prediction.id, exc)
            return Outcome(succeeded=False, error=f"the model could not be loaded: {exc.__class__.__name__}: {exc}")
        if prediction.run_started_at is not None:  # started with its claim (ready)
            limit: int | None = prediction.time_limit_seconds
        else:
            limit = lifecycle.run_started(prediction.id)
        if limit is None:  # it ended while the predictor loaded: nothing runs
            return Outcome(succeeded=False, error=STOPPED_ERROR)
        started = time.perf_counter()
        capture = Capture()
        reporter = _LogReporter(prediction.id, capture)
        reporter.start()
        stopper = _Stopper(prediction.id, limit)
        run = _Run()
        try:
            try:
                stopper.start()
                self._run(prediction, predictor, capture, reporter, run)
            finally:
                stopper.disarm()
        except (RunStopped, SoftTimeLimitExceeded):
            stopper.disarm()  # completes a disarm the stop interrupted
            if run.finished:  # the stop landed after the run returned: the run's outcome stands
                return Outcome(
                    succeeded=True,
                    output=run.result[0],
                    logs=reporter.stop(),
                    predict_time=time.perf_counter() - started,
                )
            return self._stopped(prediction, limit, reporter, started, sys.exc_info()[0] is RunStopped)
        except Exception as exc:  # a model's failure is the prediction's outcome, not the worker's
            log.warning("prediction %s failed: %s", prediction.id, exc)
            return Outcome(
                succeeded=False,
                error=f"{exc.__class__.__name__}: {exc}",
                logs=reporter.stop() + traceback.format_exc(limit=5),
                predict_time=time.perf_counter() - started,
            )
        return Outcome(
            succeeded=True, output=run.result[0], logs=reporter.stop(), predict_time=time.perf_counter() - started
        )

    @staticmethod
    def _stopped(prediction: Prediction, limit: int, reporter: _LogReporter, started: float, ended: bool) -> Outcome:
        """The outcome of a run stopped before it returned: its prediction ended meanwhile
        (``ended``), or its time limit came."""
        if ended:
            log.info("prediction %s: stopped, its prediction ended while it ran", prediction.id)
            return Outcome(
                succeeded=False, error=STOPPED_ERROR, logs=reporter.stop(), predict_time=time.perf_counter() - started
            )
        return Outcome(
            succeeded=False,
            error=f"the prediction ran longer than its time limit ({limit}s)",
            logs=reporter.stop(),
            predict_time=time.perf_counter() - started,
            timed_out=True,
        )

    @staticmethod
    def _run(prediction: Prediction, predictor: Predictor, capture: Capture, reporter: _LogReporter, run: _Run) -> None:
        """Run the predictor into ``run.result``; a generator's pieces are recorded one by one
        as they come (the logs written before each piece first), and its output is their list.
        The result is stored by the statement that receives it, before any other Python code
        runs: a stop that lands later finds it there (see :class:`_Run`)."""
        from .. import lifecycle

        with capturing(capture):
            run.result = (predictor.predict(**prediction.input),)
        result = run.result[0]
        if not inspect.isgenerator(result):
            return
        pieces: list[Any] = []
        notified = 0.0
        while True:
            with capturing(capture):  # only the predictor's own code is captured
                try:
                    piece = next(result)
                except StopIteration:
                    run.result = (pieces,)
                    return
            pieces.append(piece)
            reporter.report()
            # Every piece reaches the streams; webhooks at most every REPORT_INTERVAL.
            webhook = time.monotonic() - notified >= REPORT_INTERVAL
            notified = time.monotonic() if webhook else notified
            lifecycle.record_output(prediction.id, list(pieces), cause=lifecycle.Cause.TASK, webhook=webhook)

    def cancel(self, prediction: Prediction) -> None:
        """Mark the run to stop: its watcher, in whichever worker runs it, raises
        :class:`RunStopped` in it (the mark outlives the run's hard limit, then it is moot)."""
        cache.set(_stop_key(prediction.pk), True, timeout=prediction.time_limit_seconds + HARD_LIMIT_GRACE + 60)

    def handle_callback(self, prediction_id: str, body: dict[str, Any]) -> None:
        """In-process runs report by returning; there is nothing to call back."""


class _Run:
    """What a run returned, once it returned: ``result`` is empty until then, then the one-item
    tuple of its output. A stop exception (``PyThreadState_SetAsyncExc``) can land after the
    predictor returned but before :meth:`_Stopper.disarm` withdrew it; the result being there
    says the run finished, so a finished run is never turned into a stopped or timed-out one."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: tuple[Any, ...] = ()

    @property
    def finished(self) -> bool:
        """It returned its output (a generator returned by ``predict`` has not run yet: its
        run ends when it is exhausted, and ``result`` then holds its pieces)."""
        return bool(self.result) and not inspect.isgenerator(self.result[0])


class _Stopper:
    """Stops a run from a watcher thread: ``SoftTimeLimitExceeded`` in the run's thread at its
    time limit, :class:`RunStopped` once :meth:`PythonRunner.cancel` marked it. An exception
    raised in another thread (``PyThreadState_SetAsyncExc``) arrives at that thread's next
    Python instruction; a no-op handler of :data:`WAKE_SIGNAL`, sent along, runs one and wakes
    a blocking system call (a sleep, a socket read) when the run is the main thread (a worker
    child's, an eager test's). :meth:`disarm` (the run returned) withdraws one not delivered
    yet, so it never lands after the run."""

    def __init__(self, prediction_id: str, limit: float) -> None:
        self.prediction_id = prediction_id
        self.limit = limit
        self._target = threading.get_ident()
        self._lock = threading.Lock()
        self._armed = True
        self._fired = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"stop-{prediction_id[:8]}", daemon=True)
        self._wakes = threading.current_thread() is threading.main_thread()
        self._previous: Any = None

    def start(self) -> None:
        if self._wakes:
            self._previous = signal.signal(WAKE_SIGNAL, _wake)
        self._thread.start()

    def disarm(self) -> None:
        self._done.set()
        with self._lock:
            self._armed = False
            if self._fired:  # withdrawn if still pending; delivered already, it is being handled
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), None)
        if self._wakes:
            signal.signal(WAKE_SIGNAL, self._previous)
        self._thread.join()

    def _fire(self, exc: type[BaseException]) -> None:
        with self._lock:
            if self._armed:
                self._fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(exc))
                if self._wakes:
                    signal.pthread_kill(self._target, WAKE_SIGNAL)

    def _loop(self) -> None:
        from django.db import connection

        try:
            self._watch()
        finally:
            connection.close()  # this thread's own connection (its heartbeats)

    def _watch(self) -> None:
        from .. import lifecycle

        deadline = time.monotonic() + self.limit
        beat = time.monotonic()
        fired = False
        while not self._done.wait(STOP_CHECK_INTERVAL):
            now = time.monotonic()
            if not fired and now >= deadline:
                # Stopped at its limit; the heartbeat goes on until the run returns (a long call
                # that outlives the limit, or a predictor that swallowed the stop, still
                # computes: the watchdog must not take it for a run lost on our side).
                fired = True
                self._fire(SoftTimeLimitExceeded)
            if now - beat >= HEARTBEAT_INTERVAL:
                beat = now
                try:
                    lifecycle.record_alive(self.prediction_id)
                except Exception:  # noqa: BLE001 - a missed beat only weakens the evidence
                    log.exception("prediction %s: recording a heartbeat failed", self.prediction_id)
            if fired:
                continue  # one stop only: a second could land while the first is handled
            try:
                marked = cache.get(_stop_key(self.prediction_id))
            except Exception:  # noqa: BLE001 - the cache down: the limit and the watchdog still hold
                log.exception("prediction %s: checking for a stop failed", self.prediction_id)
                marked = False
            if marked:
                return self._fire(RunStopped)
        return None


def _wake(signum: int, frame: Any) -> None:
    """Runs in the run's thread: the pending stop is raised here, out of the blocking call."""


class _LogReporter:
    """Reports a run's logs while it goes on: a thread that wakes when the run writes and
    records the text so far (through the lifecycle), at most every :data:`REPORT_INTERVAL`."""

    def __init__(self, prediction_id: str, capture: Capture) -> None:
        self.prediction_id = prediction_id
        self.capture = capture
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._reported = 0
        self._thread = threading.Thread(target=self._loop, name=f"logs-{prediction_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self) -> None:
        """Record the logs now if they grew (also called by the run before each output piece)."""
        from .. import lifecycle

        with self._lock:
            text = self.capture.text()
            if len(text) > self._reported:
                lifecycle.record_logs(self.prediction_id, text, cause=lifecycle.Cause.TASK)
                self._reported = len(text)

    def stop(self) -> str:
        """Stop reporting; the full logs (the outcome carries them)."""
        self._stopped.set()
        self.capture.changed.set()
        self._thread.join()
        return self.capture.text()

    def _loop(self) -> None:
        from django.db import connection

        try:
            while not self._stopped.is_set():
                self.capture.changed.wait()
                self.capture.changed.clear()
                if self._stopped.is_set():
                    return
                try:
                    self.report()
                except Exception:  # noqa: BLE001 - progress is best effort; the outcome has it all
                    log.exception("prediction %s: reporting logs failed", self.prediction_id)
                self._stopped.wait(REPORT_INTERVAL)
        finally:
            connection.close()  # this thread's own connection


register(PythonRunner())
