"""The Celery app; configuration comes from Django settings (``CELERY_*``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")

app = Celery("x402site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def settlement_queue() -> str:
    """Where settlement tasks go: X402_SETTLEMENT_QUEUE, else ``<default queue>-settlement``."""
    from django.conf import settings

    return settings.X402_SETTLEMENT_QUEUE or f"{app.conf.task_default_queue}-settlement"


def route_task(name: str, args: object, kwargs: object, options: object, task: object = None, **kw: object) -> dict | None:
    """Settlement and reconciliation on their own queue, so that a slow prediction never delays
    them; prediction runs stay on the default queue (or their tier's, X402_TIER_QUEUES)."""
    if name.startswith("payments.tasks."):
        return {"queue": settlement_queue()}
    return None
