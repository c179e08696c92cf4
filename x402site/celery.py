"""The Celery app; configuration comes from Django settings (``CELERY_*``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")

app = Celery("x402site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


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
