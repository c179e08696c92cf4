"""React to the ledger: a payment's state change moves its prediction (through the lifecycle)."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from payments.models import Payment
from payments.signals import payment_advanced, payment_unsettled, payments_advanced

from . import lifecycle


@receiver(payment_advanced, sender=Payment, dispatch_uid="predictions.on_payment")
def on_payment_advanced(payment: Payment, previous: str, **kwargs: Any) -> None:
    lifecycle.on_payments([payment])


@receiver(payments_advanced, sender=Payment, dispatch_uid="predictions.on_payments")
def on_payments_advanced(payments: list[Payment], previous: list[str], **kwargs: Any) -> None:
    lifecycle.on_payments(payments)


@receiver(payment_unsettled, sender=Payment, dispatch_uid="predictions.on_unsettled")
def on_payment_unsettled(payment: Payment, **kwargs: Any) -> None:
    lifecycle.on_unsettled(payment)
