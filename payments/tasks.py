"""Celery tasks: settle one payment, and the periodic reconciliation that finishes the rest.

Tasks are idempotent (the ledger state decides what is left to do) and acknowledged late, so a
redelivered or retried task never moves money twice.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from . import settlement
from .chain import ChainUnavailable
from .models import Payment, PaymentStatus

log = logging.getLogger("payments.tasks")
S = PaymentStatus

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
    """One pass: finish unknown outcomes, track receipts in batches, rebroadcast or replace the
    unmined, and re-enqueue verified payments whose settle task was lost."""
    stats = {"unknown": 0, "swept": 0, "expired": 0, "errors": 0}
    open_payments = Payment.objects.filter(status__in=[S.SETTLING, S.SETTLED])
    try:
        for pk in open_payments.filter(settle_tx_hash=None).values_list("pk", flat=True):
            settlement.resolve_unknown(pk)
            stats["unknown"] += 1
        stats.update(settlement.reconcile_batch(list(open_payments.values_list("pk", flat=True))))
    except ChainUnavailable as exc:
        stats["errors"] += 1
        log.warning("reconcile: RPC unavailable (%s); will retry next pass", exc)
    for pk in Payment.objects.filter(status=S.VERIFIED, valid_before__lt=time.time()).values_list(
        "pk", flat=True
    ):
        settlement.expire_if_lapsed(pk)
        stats["expired"] += 1
    stale = timezone.now() - SWEEP_AFTER
    lost = Payment.objects.filter(status=S.VERIFIED, settle_requested_at__lt=stale)
    for pk in lost.values_list("pk", flat=True):
        settle_payment.delay(str(pk))
        stats["swept"] += 1
    return stats
