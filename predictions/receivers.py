"""React to the ledger: a confirmed payment runs its prediction, a lost one fails it."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.dispatch import receiver
from django.utils import timezone

from payments.models import Payment, PaymentStatus
from payments.signals import payment_advanced

from .models import Prediction, PredictionStatus


@receiver(payment_advanced, sender=Payment, dispatch_uid="predictions.on_payment")
def on_payment_advanced(payment: Payment, previous: str, **kwargs: Any) -> None:
    if payment.status == PaymentStatus.CONFIRMED:
        from .tasks import run_prediction

        prediction_id = Prediction.objects.filter(payment=payment).values_list("id", flat=True).first()
        if prediction_id:
            transaction.on_commit(lambda: run_prediction.delay(prediction_id))
    elif payment.status in (PaymentStatus.FAILED, PaymentStatus.EXPIRED):
        Prediction.objects.filter(payment=payment, status=PredictionStatus.STARTING).update(
            status=PredictionStatus.FAILED,
            error=f"payment {payment.status}: {payment.failure_reason}",
            completed_at=timezone.now(),
        )
