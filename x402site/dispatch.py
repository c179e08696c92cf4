"""The one place that sends Celery tasks. Domain modules name the task they want (the constants
below) instead of importing a ``tasks`` module, which imports them back: no import circle
between the code that does the work and the tasks that schedule it.

Tasks are looked up in the app's registry by name, so eager mode in tests and the routes of
``x402site.celery`` apply as they do to ``task.apply_async``. A web process has not imported the
tasks modules (a worker's loader does at start): the first lookup has the loader import them,
as Celery's autodiscovery does in a worker.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Task
from celery.result import AsyncResult

from .celery import app

SETTLE_PAYMENT = "payments.tasks.settle_payment"
SETTLE_BATCHES = "payments.tasks.settle_batches"
SEND_REFUND = "payments.tasks.send_refund"
RUN_EXPORT = "payments.tasks.run_export"
TRACK_CHANNEL_TXS = "payments.tasks.track_channel_txs"
REFUND_CHANNEL = "payments.tasks.refund_channel"
RUN_PREDICTION = "predictions.tasks.run_prediction"
START_RUNS = "predictions.tasks.start_runs"
ENFORCE_TIME_LIMIT = "predictions.tasks.enforce_time_limit"
#: Every task name domain code sends (a test checks each is registered).
SENT = (
    SETTLE_PAYMENT,
    SETTLE_BATCHES,
    SEND_REFUND,
    RUN_EXPORT,
    RUN_PREDICTION,
    START_RUNS,
    ENFORCE_TIME_LIMIT,
    TRACK_CHANNEL_TXS,
    REFUND_CHANNEL,
)


#: The loader's import is not thread-safe: a second thread's lookup returned while the first was
#: still importing the tasks modules, and found no task (NotRegistered).
_discovery = threading.Lock()


def task(name: str) -> Task:
    """The registered task called ``name``."""
    if name not in app.tasks:
        with _discovery:
            app.loader.import_default_modules()  # autodiscovery: every app's tasks module
    return app.tasks[name]


def send(name: str, *args: Any, **options: Any) -> AsyncResult:
    """Send task ``name`` with positional ``args``; ``options`` as ``apply_async`` takes them
    (``kwargs``, ``countdown``, ``queue``...). Raises the broker's error (callers decide)."""
    return task(name).apply_async(args=list(args), **options)
