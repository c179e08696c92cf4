"""The in-process runner: a Cog-style predictor class (``setup()`` once, ``predict(**input)``).

The run happens inside the Celery task, under a soft time limit of the prediction's own time
limit (what was paid for). What the predictor prints and logs becomes the prediction's logs, as
on Cog, reported while it runs (at most every :data:`REPORT_INTERVAL` seconds, by a reporter
thread) and in full with the outcome; only the run's own thread is captured (``capture.py``).

A predictor whose ``predict`` is a generator streams: its output is the list of what it
yielded (Replicate's iterator outputs), each piece recorded as it comes.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
import time
import traceback
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from django.core.exceptions import ValidationError

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


class Predictor(Protocol):
    def setup(self) -> None: ...

    def predict(self, **inputs: Any) -> Any: ...


def _predictor_class(dotted_path: str) -> type:
    module_name, _, class_name = dotted_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


@lru_cache(maxsize=32)
def load_predictor(dotted_path: str) -> Predictor:
    """Import, instantiate and ``setup()`` a predictor once per worker process."""
    predictor = _predictor_class(dotted_path)()
    predictor.setup()
    return predictor


class PythonRunner:
    kind = "python"
    label = "In-process Python predictor"
    reports_time_limit = True  # the task's soft time limit

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
        limit = prediction.time_limit_seconds
        return {"soft_time_limit": limit, "time_limit": limit + HARD_LIMIT_GRACE}

    def start(self, prediction: Prediction) -> Outcome:
        started = time.perf_counter()
        capture = Capture()
        reporter = _LogReporter(prediction.id, capture)
        reporter.start()
        try:
            output = self._run(prediction, capture, reporter)
        except SoftTimeLimitExceeded:
            return Outcome(
                succeeded=False,
                error=f"the prediction ran longer than its time limit ({prediction.time_limit_seconds}s)",
                logs=reporter.stop(),
                predict_time=time.perf_counter() - started,
                timed_out=True,
            )
        except Exception as exc:  # a model's failure is the prediction's outcome, not the worker's
            log.warning("prediction %s failed: %s", prediction.id, exc)
            return Outcome(
                succeeded=False,
                error=f"{exc.__class__.__name__}: {exc}",
                logs=reporter.stop() + traceback.format_exc(limit=5),
                predict_time=time.perf_counter() - started,
            )
        return Outcome(
            succeeded=True, output=output, logs=reporter.stop(), predict_time=time.perf_counter() - started
        )

    @staticmethod
    def _run(prediction: Prediction, capture: Capture, reporter: _LogReporter) -> Any:
        """The predictor's output; a generator's pieces are recorded one by one as they come
        (the logs written before each piece first), and its output is their list."""
        from .. import lifecycle

        with capturing(capture):
            result = load_predictor(prediction.version.predictor).predict(**prediction.input)
        if not inspect.isgenerator(result):
            return result
        pieces: list[Any] = []
        notified = 0.0
        while True:
            with capturing(capture):  # only the predictor's own code is captured
                try:
                    piece = next(result)
                except StopIteration:
                    return pieces
            pieces.append(piece)
            reporter.report()
            # Every piece reaches the streams; webhooks at most every REPORT_INTERVAL.
            webhook = time.monotonic() - notified >= REPORT_INTERVAL
            notified = time.monotonic() if webhook else notified
            lifecycle.record_output(prediction.id, list(pieces), cause=lifecycle.Cause.TASK, webhook=webhook)

    def cancel(self, prediction: Prediction) -> None:
        """An in-process run cannot be interrupted safely; its late outcome is ignored."""

    def handle_callback(self, prediction_id: str, body: dict[str, Any]) -> None:
        """In-process runs report by returning; there is nothing to call back."""


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
