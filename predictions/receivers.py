"""React to the ledger: a confirmed payment runs (or releases) its prediction; a lost one fails it."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.dispatch import receiver
from django.utils import timezone

from payments.models import Payment, PaymentStatus
from payments.signals import payment_advanced

from .models import Prediction, PredictionStatus

P = PredictionStatus


@receiver(payment_advanced, sender=Payment, dispatch_uid="predictions.on_payment")
def on_payment_advanced(payment: Payment, previous: str, **kwargs: Any) -> None:
    mine = Prediction.objects.filter(payment=payment)
    if payment.status == PaymentStatus.CONFIRMED:
        # after_success: the run already finished; its output is now paid for.
        mine.filter(status=P.PROCESSING, predict_time__isnull=False).update(
            status=P.SUCCEEDED, completed_at=timezone.now()
        )
        # before_run: the money is in, run it.
        waiting = mine.filter(status=P.STARTING).select_related("model__hardware").first()
        if waiting is not None:
            from .tasks import enqueue_run

            transaction.on_commit(lambda: enqueue_run(waiting.id, waiting.model))
    elif payment.status in (PaymentStatus.FAILED, PaymentStatus.EXPIRED):
        mine.filter(status__in=[P.STARTING, P.PROCESSING]).update(
            status=P.FAILED,
            output=None,
            error=f"payment {payment.status}: {payment.failure_reason}",
            completed_at=timezone.now(),
        )
