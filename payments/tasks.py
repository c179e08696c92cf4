"""Celery tasks: settle one payment, and the periodic reconciliation that finishes the rest.

Tasks are idempotent (the ledger state decides what is left to do) and acknowledged late, so a
redelivered or retried task never moves money twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task

from . import settlement
from .chain import ChainUnavailable
from .locks import advisory_lock

log = logging.getLogger("payments.tasks")

#: A VERIFIED payment whose settlement was asked for this long ago lost its task (broker outage...).
SWEEP_AFTER = timedelta(seconds=30)


@shared_task(
    acks_late=True,
    autoretry_for=(ChainUnavailable,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
)
def settle_payment(payment_id: str) -> str:
    payment = settlement.settle(payment_id)
    log.info("payment %s is %s (tx %s)", payment.pk, payment.status, payment.settle_tx_hash)
    return payment.status


@shared_task(acks_late=True)
def reconcile() -> dict[str, int]:
    """One reconciliation pass (settlement.reconcile_all); passes never overlap across workers:
    a pass over many rows can outlast the beat interval, and the next one then skips."""
    with advisory_lock("payments.reconcile") as mine:
        if not mine:
            log.info("reconcile: a pass is already running; skipped")
            return {"skipped": 1}
        return dict(settlement.reconcile_all())
