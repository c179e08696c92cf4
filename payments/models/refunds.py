"""Refunds owed to payers, their approval and sending, and their append-only event log."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from payments.models.ledger import IllegalTransition, Payment


class RefundStatus(models.TextChoices):
    OWED = "owed", "Owed"  # waits for finance's approval, then for the refund wallet
    SENT = "sent", "Sent"  # transfer signed and stored, maybe broadcast, maybe mined
    CONFIRMED = "confirmed", "Confirmed"
    FAILED = "failed", "Failed"  # the transfer reverted (at depth): finance may approve it again
    # Mined with status 1 but without the expected Transfer: money may have moved; a human
    # checks the chain (never re-approved automatically).
    REVIEW = "review", "Needs review"


R = RefundStatus

#: The one state machine of refunds.
REFUND_TRANSITIONS: dict[str, frozenset[str]] = {
    R.OWED: frozenset({R.SENT}),
    # A signed transfer that never reached a block is re-signed with the same nonce.
    R.SENT: frozenset({R.SENT, R.CONFIRMED, R.FAILED, R.REVIEW}),
    R.FAILED: frozenset({R.OWED}),
    R.REVIEW: frozenset(),
    R.CONFIRMED: frozenset(),
}

_REFUND_STAMPS = {R.SENT: "sent_at", R.CONFIRMED: "confirmed_at", R.FAILED: "failed_at"}


class Refund(models.Model):
    """Money we owe back to a payer: a paid prediction ended without its output under a policy
    that promises a refund. Finance approves; the refund wallet (its key from settings, never
    the database) sends the token back to the payer; the reconciler confirms it.

    State changes go through :meth:`advance` only."""

    payment = models.OneToOneField(Payment, on_delete=models.PROTECT, related_name="refund")
    status = models.CharField(max_length=16, choices=RefundStatus.choices, default=R.OWED)
    reason = models.TextField()
    network = models.CharField(max_length=64)
    asset = models.CharField(max_length=42)
    decimals = models.PositiveSmallIntegerField(default=6)
    recipient = models.CharField(max_length=42, help_text="The payer")
    amount = models.DecimalField(max_digits=78, decimal_places=0, help_text="Atomic units")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    approved_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    # The transfer of the current attempt: signed and stored in the outbox (``tx``) before it is
    # broadcast. ``tx_hash`` is its current (or mined) hash, as finance reads it (the payments'
    # ``settle_tx_hash`` likewise); forgotten when the refund is approved again after a failure.
    tx = models.ForeignKey(
        "payments.SettlementTx", null=True, blank=True, on_delete=models.PROTECT, related_name="refunds"
    )
    sender = models.CharField(max_length=42, blank=True, help_text="The refund wallet")
    tx_hash = models.CharField(max_length=66, blank=True, db_index=True)
    block_number = models.PositiveBigIntegerField(null=True, blank=True)
    confirmations = models.PositiveIntegerField(default=0)
    # Every attempt's gas (a failed attempt's transaction paid its gas too; see refunds._earlier_gas).
    gas_used = models.PositiveBigIntegerField(null=True, blank=True, help_text="Gas of all its attempts")
    gas_cost_wei = models.DecimalField(
        max_digits=78, decimal_places=0, null=True, blank=True, help_text="Wei paid for gas by all its attempts"
    )
    failure_reason = models.TextField(blank=True)
    broadcast_error = models.TextField(
        blank=True, help_text="The node's answer to the last refused broadcast (e.g. the wallet has no gas money)"
    )
    # An approved refund the wallet could not send yet: the reconciler tries again from retry_at
    # (backing off with each attempt).
    send_attempts = models.PositiveIntegerField(default=0)
    retry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("approve_refund", "Can approve a refund")]
        constraints = [
            models.CheckConstraint(condition=models.Q(amount__gt=0), name="refund_amount_positive"),
            models.CheckConstraint(condition=models.Q(status__in=RefundStatus.values), name="refund_status_valid"),
        ]

    def __str__(self) -> str:
        return f"refund of {self.amount_decimal} to {self.recipient} ({self.status})"

    @property
    def amount_decimal(self) -> Decimal:
        return Decimal(self.amount).scaleb(-self.decimals)

    @property
    def nonce(self) -> int | None:
        """The refund wallet's nonce of the current attempt (its outbox row's)."""
        return self.tx.nonce if self.tx is not None else None

    @property
    def raw_tx(self) -> str:
        """The signed bytes of the current attempt ("" before it is signed)."""
        return self.tx.raw_tx if self.tx is not None else ""

    def advance(self, to: str, *, detail: dict[str, Any] | None = None, **fields: Any) -> None:
        """Move to ``to``, setting ``fields``, and append the event (inside ``transaction.atomic()``,
        the row read with ``select_for_update()``)."""
        if to not in REFUND_TRANSITIONS[self.status]:
            raise IllegalTransition(f"{self.status} -> {to} for refund {self.pk}")
        previous = self.status
        self.status = to
        stamp = _REFUND_STAMPS.get(to)
        if stamp:
            fields.setdefault(stamp, timezone.now())
        for name, value in fields.items():
            setattr(self, name, value)
        self.save(update_fields=["status", *fields])
        RefundEvent.objects.create(refund=self, from_status=previous, to_status=to, detail=detail or {})


class RefundEvent(models.Model):
    """Append-only: one row per refund state change (and approval)."""

    refund = models.ForeignKey(Refund, on_delete=models.PROTECT, related_name="events")
    created_at = models.DateTimeField(default=timezone.now)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["refund", "id"]

    def __str__(self) -> str:
        return f"{self.from_status or '-'} -> {self.to_status}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise IllegalTransition("refund events are append-only")
        super().save(*args, **kwargs)
