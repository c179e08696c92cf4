"""The Celery app; configuration comes from Django settings (``CELERY_*``)."""

import os
from typing import Any

from celery import Celery
from celery.signals import task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")

app = Celery("x402site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
def close_old_connections(task: Any = None, **kwargs: Any) -> None:
    """Before each task, as Django before each request: a connection left unusable (an error) or
    older than CONN_MAX_AGE is closed; a healthy one is kept (Celery's fix-up no longer closes
    them all around every task: CELERY_DB_REUSE_MAX). Not for an eager task, which runs inside
    its caller's transaction."""
    if task is not None and getattr(task.request, "is_eager", False):
        return
    from django.db import close_old_connections as close

    close()


def settlement_queue() -> str:
    """Where settlement tasks go: X402_SETTLEMENT_QUEUE, else ``<default queue>-settlement``."""
    from x402site.conf import x402

    return x402.settlement.queue or f"{app.conf.task_default_queue}-settlement"


#: Payment tasks that are not settlement: a long export must not hold a settlement slot.
SLOW_PAYMENT_TASKS = frozenset({"payments.tasks.run_export", "payments.tasks.expire_exports"})


def route_task(name: str, args: object, kwargs: object, options: object, task: object = None, **kw: object) -> dict | None:
    """Settlement, reconciliation and refunds on their own queue, so that a slow prediction (or
    export) never delays them; prediction runs and exports stay on the default queue (or their
    tier's, X402_TIER_QUEUES)."""
    if name.startswith("payments.tasks.") and name not in SLOW_PAYMENT_TASKS:
        return {"queue": settlement_queue()}
    return None
