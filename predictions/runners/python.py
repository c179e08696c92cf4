"""The in-process runner: a Cog-style predictor class (``setup()`` once, ``predict(**input)``).

The run happens inside the Celery task, under a soft time limit of the prediction's own time
limit (what was paid for); what the predictor prints becomes the prediction's logs, as on Cog.
Run the worker with the prefork pool (Celery's default): stdout is captured per process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import time
import traceback
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from django.core.exceptions import ValidationError

from . import READY, Outcome, register

if TYPE_CHECKING:
    from ..models import ModelVersion, Prediction

log = logging.getLogger("predictions.runners.python")

#: The hard limit (the worker child is killed) follows the soft one by this much.
HARD_LIMIT_GRACE = 30


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
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                output = load_predictor(prediction.version.predictor).predict(**prediction.input)
        except SoftTimeLimitExceeded:
            return Outcome(
                succeeded=False,
                error=f"the prediction ran longer than its time limit ({prediction.time_limit_seconds}s)",
                logs=printed.getvalue(),
                predict_time=time.perf_counter() - started,
                timed_out=True,
            )
        except Exception as exc:  # a model's failure is the prediction's outcome, not the worker's
            log.warning("prediction %s failed: %s", prediction.id, exc)
            return Outcome(
                succeeded=False,
                error=f"{exc.__class__.__name__}: {exc}",
                logs=printed.getvalue() + traceback.format_exc(limit=5),
                predict_time=time.perf_counter() - started,
            )
        return Outcome(
            succeeded=True, output=output, logs=printed.getvalue(), predict_time=time.perf_counter() - started
        )

    def cancel(self, prediction: Prediction) -> None:
        """An in-process run cannot be interrupted safely; its late outcome is ignored."""

    def handle_callback(self, prediction_id: str, body: dict[str, Any]) -> None:
        """In-process runs report by returning; there is nothing to call back."""


register(PythonRunner())
