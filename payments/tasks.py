"""Celery tasks: settle one payment, and the periodic reconciliation that finishes the rest.

Tasks are idempotent (the ledger state decides what is left to do) and acknowledged late, so a
redelivered or retried task never moves money twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from . import settlement
from .chain import ChainUnavailable
from .models import Payment, PaymentStatus

log = logging.getLogger("payments.tasks")
S = PaymentStatus

#: A VERIFIED payment this old with no settlement under way lost its task (broker outage...).
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
    """Rebroadcast and track unfinished settlements; re-enqueue verified payments left behind."""
    counts = {"tracked": 0, "swept": 0, "errors": 0}
    for payment in Payment.objects.filter(status__in=[S.SETTLING, S.SETTLED]).only("pk"):
        try:
            p = settlement.resolve_unknown(payment.pk)
            p = settlement.track(p.pk)
            if p.status == S.SETTLING:
                settlement.broadcast(p)
            counts["tracked"] += 1
        except ChainUnavailable as exc:
            counts["errors"] += 1
            log.warning("reconcile: RPC unavailable (%s); will retry next pass", exc)
            break
    stale = timezone.now() - SWEEP_AFTER
    for pk in Payment.objects.filter(status=S.VERIFIED, created_at__lt=stale).values_list("pk", flat=True):
        settle_payment.delay(str(pk))
        counts["swept"] += 1
    return counts
