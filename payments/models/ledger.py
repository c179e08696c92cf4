"""The payment ledger: one row per accepted payment proof, and its append-only event log.

State changes go through :meth:`Payment.advance` only, which checks the transition against
:data:`TRANSITIONS` and writes the event in the same transaction.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.db import models
from django.utils import timezone

from payments.signals import payment_advanced, payments_advanced
from payments.x402.types import SCHEME_EXACT


class PaymentStatus(models.TextChoices):
    VERIFIED = "verified", "Verified"
    SETTLING = "settling", "Settling"  # settlement transaction signed and stored, maybe broadcast
    SETTLED = "settled", "Settled"  # mined with status 1 and our Transfer log, not yet confirmed
    CONFIRMED = "confirmed", "Confirmed"
    # Not settled (released, reverted, refused, not mined), but the authorization may still be
    # used by anyone until it lapses: the chain decides between paid and failed/expired.
    LAPSING = "lapsing", "Lapsing"
    FAILED = "failed", "Failed"
    EXPIRED = "expired", "Expired"


S = PaymentStatus

#: The one state machine of the ledger. FAILED and EXPIRED are reached only from LAPSING, and
#: only by ``lapsing.resolve_lapsing`` once the chain says the authorization was never used.
TRANSITIONS: dict[str, frozenset[str]] = {
    S.VERIFIED: frozenset({S.SETTLING, S.LAPSING}),
    # A signed transaction that never reached a block may be re-signed (SETTLING -> SETTLING).
    S.SETTLING: frozenset({S.SETTLING, S.SETTLED, S.CONFIRMED, S.LAPSING}),
    # A reorg can drop a mined settlement: back to SETTLING to rebroadcast the stored transaction;
    # re-mined on the new fork, it may revert (someone else's use got in first): LAPSING.
    S.SETTLED: frozenset({S.CONFIRMED, S.SETTLING, S.LAPSING}),
    # The chain shows the authorization used (by anyone): SETTLING with the transaction that did it.
    # A failed attempt whose identical proof verifies again may be tried again: VERIFIED.
    S.LAPSING: frozenset({S.SETTLING, S.VERIFIED, S.FAILED, S.EXPIRED}),
    S.CONFIRMED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
}

#: Status sets, defined once.
OPEN_STATUSES = frozenset({S.VERIFIED, S.SETTLING, S.SETTLED, S.LAPSING})
PAID_STATUSES = frozenset({S.SETTLED, S.CONFIRMED})
UNPAID_STATUSES = frozenset({S.FAILED, S.EXPIRED})
#: The money moves or has moved: the authorization can no longer be released unsettled.
CHARGED_STATUSES = frozenset({S.SETTLING, *PAID_STATUSES})


class UptoOrder(models.TextChoices):
    """Whether a per-second model's 402 offers pay-per-use (x402 ``upto``) beside the fixed
    quote (``exact``), and which the agent sees first."""

    OFF = "off", "Fixed quote only (exact)"
    UPTO_FIRST = "upto_first", "Pay per second (upto) first, fixed quote second"
    EXACT_FIRST = "exact_first", "Fixed quote first, pay per second (upto) second"


class FailureCharge(models.TextChoices):
    """What a pay-per-second (``upto``) run that failed on our side or that an operator canceled
    costs (one stopped at its time limit or canceled by its payer is charged its seconds)."""

    NOTHING = "nothing", "Nothing (the permit is released)"
    MINIMUM = "minimum", "The model's minimum price"


class VerificationMethod(models.TextChoices):
    LOCAL = "local", "Our node"
    FACILITATOR = "facilitator", "A remote facilitator"
    #: Recorded by our facilitator API for another merchant (its pay-to is theirs, not ours).
    FACILITATOR_API = "facilitator-api", "Our facilitator API"


class UnpaidReason(models.TextChoices):
    """Why a payment went LAPSING; the terminal state it reaches if the chain agrees it is unused."""

    RELEASED = "released", "Released unsettled (nothing to charge)"
    NOT_SETTLED_IN_TIME = "not_settled_in_time", "Lapsed before settlement"
    SIMULATION_REVERTED = "simulation_reverted", "Settlement simulation reverted"
    SETTLEMENT_REVERTED = "settlement_reverted", "Settlement transaction reverted"
    NOT_MINED = "not_mined", "Settlement not mined before validBefore"
    FACILITATOR_REFUSED = "facilitator_refused", "The facilitator refused to settle"
    PAYER_CANCELED = "payer_canceled", "The payer canceled the authorization"
    NONCE_USED_ELSEWHERE = "nonce_used_elsewhere", "The payer used the nonce for another authorization"
    #: Held until after its run (upto, after_success), its settlement was simulated before the
    #: run and would revert: refused, the run never started (issue 25).
    REFUSED_BEFORE_RUN = "refused_before_run", "Refused before the run: its settlement would revert"

    @property
    def final_status(self) -> str:
        """EXPIRED when no settlement was wanted or made; FAILED when one was tried and did not pay."""
        return S.EXPIRED if self in (self.RELEASED, self.NOT_SETTLED_IN_TIME, self.NOT_MINED) else S.FAILED

    @property
    def retryable(self) -> bool:
        """A failed attempt (not a decision of ours) may be tried again if the proof verifies again."""
        return self in (self.SIMULATION_REVERTED, self.SETTLEMENT_REVERTED, self.FACILITATOR_REFUSED)


#: Timestamp column stamped when a payment enters a state.
_STAMPS = {
    S.SETTLING: "settling_at",
    S.SETTLED: "settled_at",
    S.CONFIRMED: "confirmed_at",
    S.FAILED: "failed_at",
    S.EXPIRED: "failed_at",
}


class PaymentQuerySet(models.QuerySet["Payment"]):
    def due_for_reconcile(self) -> PaymentQuerySet:
        """Rows the reconciler may look at now (not backing off after an error)."""
        return self.filter(models.Q(reconcile_after=None) | models.Q(reconcile_after__lte=timezone.now()))

    def held(self) -> PaymentQuerySet:
        """Verified and kept for settlement after the run (``upto``, ``after_success``): the
        authorization is unused and its settlement not asked for yet."""
        return self.filter(held_q())

    def of_authorization(self, network: str, asset: str, payer: str, nonce: str) -> PaymentQuerySet:
        return self.filter(network=network, asset=asset, payer=payer, nonce=nonce)

    def ours(self) -> PaymentQuerySet:
        """Payments whose money is ours: everything the gate took, and facilitator-API payments
        to one of our pay-to addresses. The rest of the facilitator API's rows is money we moved
        for other merchants: in the ledger, never in our revenue."""
        return self.exclude(for_others_q())

    def for_others(self) -> PaymentQuerySet:
        """Facilitator-API payments to another merchant's pay-to (the complement of ``ours``)."""
        return self.filter(for_others_q())


def held_q() -> models.Q:
    """The condition of :meth:`PaymentQuerySet.held`, to combine with others."""
    return models.Q(status=S.VERIFIED, settle_requested_at=None)


def for_others_q() -> models.Q:
    """The condition of :meth:`PaymentQuerySet.for_others`, for annotations (the exports' ``ours``)."""
    from payments.options import configured

    our_pay_to = {c.option.pay_to for c in configured()}
    return models.Q(verification=VerificationMethod.FACILITATOR_API) & ~models.Q(pay_to__in=our_pay_to)


class IllegalTransition(Exception):
    pass


class Payment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(max_length=16, choices=PaymentStatus.choices, default=S.VERIFIED)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    settling_at = models.DateTimeField(null=True, blank=True)
    settled_at = models.DateTimeField(null=True, blank=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)

    # What was paid, as signed.
    x402_version = models.PositiveSmallIntegerField()
    scheme = models.CharField(max_length=32, default=SCHEME_EXACT)
    network = models.CharField(max_length=64, help_text="CAIP-2, e.g. eip155:8453")
    asset = models.CharField(max_length=42)
    decimals = models.PositiveSmallIntegerField(default=6)
    payer = models.CharField(max_length=42, db_index=True)
    pay_to = models.CharField(max_length=42)
    amount = models.DecimalField(
        max_digits=78,
        decimal_places=0,
        help_text="Atomic units: what is charged (upto: the signed maximum until the run is measured)",
    )
    #: upto (pay per use): the signed maximum, the usage price it was accepted at, and the run
    #: seconds the charge (``amount``) was computed from. Empty for exact.
    maximum = models.DecimalField(
        max_digits=78, decimal_places=0, null=True, blank=True, help_text="upto: the signed maximum (atomic units)"
    )
    usage_price = models.JSONField(default=dict, blank=True, help_text="upto: the price per second it was accepted at")
    run_seconds = models.DecimalField(
        max_digits=18, decimal_places=9, null=True, blank=True, help_text="upto: the measured run time charged for (to the ns)"
    )
    nonce = models.CharField(max_length=66)
    valid_after = models.PositiveBigIntegerField()
    valid_before = models.PositiveBigIntegerField()
    signature = models.CharField(max_length=8194)
    payload = models.JSONField(help_text="The payment header as received (decoded)")
    requirement = models.JSONField(help_text="The requirement (v2 shape) this payment answered")
    verification = models.CharField(
        max_length=16, choices=VerificationMethod.choices, default=VerificationMethod.LOCAL
    )
    search_from_block = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Chain head when first seen: where to look for the authorization's use"
    )

    # What it paid for.
    resource = models.CharField(max_length=512)
    request_fingerprint = models.CharField(
        max_length=64, help_text="sha256 of the resource and input this payment bought"
    )

    # Settlement.
    settle_requested_at = models.DateTimeField(
        null=True, blank=True, help_text="When settlement was asked for (at once, or after a successful run)"
    )
    # Not unique: one transaction may settle several payments (a batch, or a third party's).
    settle_tx_hash = models.CharField(max_length=66, null=True, blank=True, db_index=True)
    #: Our signed transaction carrying this payment (None: settled by someone else, or a facilitator).
    settlement_tx = models.ForeignKey(
        "SettlementTx", null=True, blank=True, on_delete=models.PROTECT, related_name="payments"
    )
    #: Position of this payment among the items of ``settlement_tx`` (0 for a single settlement).
    settlement_index = models.PositiveIntegerField(null=True, blank=True)
    block_number = models.PositiveBigIntegerField(null=True, blank=True)
    block_hash = models.CharField(max_length=66, blank=True)
    confirmations = models.PositiveIntegerField(default=0)
    #: This payment's share of our settlement transaction's gas (the transaction's / its items).
    gas_used = models.PositiveBigIntegerField(null=True, blank=True)
    gas_cost_wei = models.DecimalField(max_digits=78, decimal_places=0, null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    unpaid_reason = models.CharField(max_length=32, choices=UnpaidReason.choices, blank=True)
    # The reconciler's per-row backoff: a row that raised is retried later, the others go on.
    reconcile_failures = models.PositiveIntegerField(default=0)
    reconcile_after = models.DateTimeField(null=True, blank=True)

    objects = PaymentQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("export_payment", "Can export the ledger")]
        constraints = [
            models.UniqueConstraint(
                fields=["network", "asset", "payer", "nonce"], name="payment_authorization_once"
            ),
            models.CheckConstraint(condition=models.Q(amount__gt=0), name="payment_amount_positive"),
            models.CheckConstraint(
                condition=models.Q(maximum=None) | models.Q(amount__lte=models.F("maximum")),
                name="payment_amount_within_maximum",
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=PaymentStatus.values), name="payment_status_valid"
            ),
        ]
        indexes = [
            models.Index(fields=["status", "created_at"]),
            # The settlement backlog: ready payments in the order batches take them, and the
            # oldest unsettled one (backpressure), without scanning the settled ledger.
            models.Index(
                fields=["settle_requested_at"],
                condition=models.Q(status__in=["verified", "settling"], settle_requested_at__isnull=False),
                name="payment_unsettled",
            ),
            # Keyset pages of exports and reports walk (created_at, id).
            models.Index(fields=["created_at", "id"], name="payment_created_id"),
        ]

    def __str__(self) -> str:
        return f"{self.amount_decimal} from {self.payer} ({self.status})"

    @property
    def amount_decimal(self) -> Decimal:
        return Decimal(self.amount).scaleb(-self.decimals)

    @property
    def maximum_decimal(self) -> Decimal | None:
        return None if self.maximum is None else Decimal(self.maximum).scaleb(-self.decimals)

    @property
    def charged_atomic(self) -> int:
        """What moved (settled, confirmed) or is moving (settling) on chain for this payment; 0
        otherwise (not charged yet, released, failed, expired). ``amount`` is always positive, so
        an upto payment charged nothing keeps its signed maximum there: read this instead."""
        return int(self.amount) if self.status in CHARGED_STATUSES else 0

    @property
    def charged_decimal(self) -> Decimal:
        return Decimal(self.charged_atomic).scaleb(-self.decimals).quantize(Decimal(1).scaleb(-self.decimals))

    @property
    def is_released(self) -> bool:
        """We decided not to settle it (released, or refused before its run): never charged by
        us, whatever the chain says until it lapses (if someone else submits it, it is paid and
        refunded: ``predictions.charges.refund_if_owed``)."""
        return self.unpaid_reason in (UnpaidReason.RELEASED, UnpaidReason.REFUSED_BEFORE_RUN)

    @property
    def is_terminal(self) -> bool:
        return not TRANSITIONS[self.status]

    @property
    def is_paid(self) -> bool:
        return self.status in PAID_STATUSES

    def advance(self, to: str, *, detail: dict[str, Any] | None = None, **fields: Any) -> None:
        """Move to state ``to``, setting ``fields``, and append the event.

        Call inside ``transaction.atomic()`` on a row read with ``select_for_update()``.
        """
        previous = self._apply(to, fields, detail)
        self.save(update_fields=["status", *fields])
        PaymentEvent.objects.create(payment=self, from_status=previous, to_status=to, detail=detail or {})
        payment_advanced.send(sender=Payment, payment=self, previous=previous)

    def _apply(self, to: str, fields: dict[str, Any], detail: dict[str, Any] | None, now: Any = None) -> str:
        """Check the transition and set status, stamp and ``fields`` in memory; the old status."""
        if to not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"{self.status} -> {to} for payment {self.pk}")
        if to in UNPAID_STATUSES and "chain" not in (detail or {}):
            raise IllegalTransition(f"{to} for payment {self.pk} needs the chain's word (detail['chain'])")
        previous = self.status
        self.status = to
        stamp = _STAMPS.get(to)
        if stamp:
            fields.setdefault(stamp, now or timezone.now())
        for name, value in fields.items():
            setattr(self, name, value)
        return previous

    @classmethod
    def update_many(cls, changes: list[tuple[Payment, dict[str, Any]]]) -> None:
        """Write each payment's ``fields``: one UPDATE per distinct set of values (a batch's
        payments mostly share theirs), not Django's bulk_update (a CASE per row and field)."""
        groups: dict[str, tuple[list[Any], dict[str, Any]]] = {}
        for p, fields in changes:
            key = repr(sorted((name, getattr(v, "pk", v)) for name, v in fields.items()))
            groups.setdefault(key, ([], fields))[0].append(p.pk)
        for pks, fields in groups.values():
            cls.objects.filter(pk__in=pks).update(**fields)

    @classmethod
    def advance_many(
        cls, changes: list[tuple[Payment, dict[str, Any]]], to: str, *, detail: dict[str, Any] | None = None
    ) -> None:
        """:meth:`advance` for many locked payments (a batch) at once: each transition checked and
        evented as one, written with one UPDATE and one INSERT; one ``payments_advanced`` signal."""
        if not changes:
            return
        now = timezone.now()  # one stamp for the batch: its rows share one UPDATE
        previous = [p._apply(to, fields, detail, now) for p, fields in changes]
        cls.update_many([(p, {"status": to, **fields}) for p, fields in changes])
        PaymentEvent.objects.bulk_create(
            [
                PaymentEvent(payment=p, from_status=before, to_status=to, detail=detail or {})
                for (p, _), before in zip(changes, previous, strict=True)
            ]
        )
        payments_advanced.send(sender=Payment, payments=[p for p, _ in changes], previous=previous)


class PaymentEvent(models.Model):
    """Append-only: one row per state change, never updated or deleted by the application."""

    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="events")
    created_at = models.DateTimeField(default=timezone.now)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["payment", "id"]

    def __str__(self) -> str:
        return f"{self.from_status or '-'} -> {self.to_status}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise IllegalTransition("payment events are append-only")
        super().save(*args, **kwargs)


class PaymentIdentifier(models.Model):
    """An agent's idempotency key (x402 ``payment-identifier`` extension), kept until it expires.

    Scoped to the payer: the same id from another wallet is another key.
    """

    payer = models.CharField(max_length=42)
    identifier = models.CharField(max_length=128)
    payload_sha256 = models.CharField(max_length=64)
    payment = models.ForeignKey(Payment, on_delete=models.CASCADE, related_name="identifiers")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["payer", "identifier"], name="payment_identifier_unique")
        ]

    def __str__(self) -> str:
        return self.identifier
