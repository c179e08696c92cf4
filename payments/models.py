"""The payment ledger: one row per accepted payment proof, and its append-only event log.

State changes go through :meth:`Payment.advance` only, which checks the transition against
:data:`TRANSITIONS` and writes the event in the same transaction.
"""

from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from payments.pricing import PER_SECOND, PriceRule, PricingError
from payments.signals import payment_advanced
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
        evented as one, written with one UPDATE and one INSERT; signals sent per payment."""
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
        for (p, _), before in zip(changes, previous, strict=True):
            payment_advanced.send(sender=Payment, payment=p, previous=before)


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


class SettlementTxQuerySet(models.QuerySet["SettlementTx"]):
    def holding_nonce(self) -> SettlementTxQuerySet:
        """Signed, not (yet) mined, and still waited for (by a SETTLING payment, or by the SENT
        refund it pays): its nonce is taken (it is rebroadcast or replaced until mined)."""
        waited = (
            models.Q(payments__status=PaymentStatus.SETTLING)
            | models.Q(refunds__status=RefundStatus.SENT)
            | models.Q(channel_txs__status=ChannelTxStatus.SENT)
        )
        return self.filter(waited, block_number=None).distinct()


class SettlementTx(models.Model):
    """The outbox: one transaction we signed (a relayer lane settling payments, single or in a
    batch; the refund wallet paying a refund back; a lane sending a channel's deposit, claim,
    settle or refund). Stored before it is broadcast (see
    ``chain.relayer``); the payments it carries, or the refund it pays, point to it. Replaced
    (same nonce, higher fees) while stuck: every hash it ever had may be mined, so all are kept."""

    class Kind(models.TextChoices):
        SINGLE = "single", "One payment (the token's transferWithAuthorization)"
        BATCH = "batch", "A batch (BatchSettler.settle)"
        REFUND = "refund", "A refund (the token's transfer from the refund wallet)"
        CHANNEL_DEPOSIT = "ch_deposit", "A channel deposit (X402BatchSettlement.deposit)"
        CHANNEL_CLAIM = "ch_claim", "A claim of channels' vouchers (claimWithSignature)"
        CHANNEL_SETTLE = "ch_settle", "Claimed channel funds sent to pay-to (settle)"
        CHANNEL_REFUND = "ch_refund", "A channel's cooperative refund (refundWithSignature)"

    network = models.CharField(max_length=64)
    #: The signer: a relayer lane, or the refund wallet.
    relayer = models.CharField(max_length=42)
    nonce = models.PositiveBigIntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    #: The contract called: the token (single, refund), the batch settler, or the channels' contract.
    to = models.CharField(max_length=42)
    items = models.PositiveIntegerField(help_text="Payments carried (the gas is shared among them); 1 for a refund")
    tx_hash = models.CharField(max_length=66, unique=True, help_text="The current (or the mined) hash")
    raw_tx = models.TextField(help_text="Signed before broadcast, for rebroadcast")
    replaced_hashes = models.JSONField(
        default=list, blank=True, help_text="Earlier signatures of this nonce that may still be mined"
    )
    gas_limit = models.PositiveBigIntegerField()
    max_fee_per_gas = models.DecimalField(max_digits=78, decimal_places=0)
    max_priority_fee_per_gas = models.DecimalField(max_digits=78, decimal_places=0)
    created_at = models.DateTimeField(default=timezone.now)
    #: Last (re)signing: a transaction unmined X402_STUCK_AFTER_SECONDS after it is replaced.
    signed_at = models.DateTimeField(default=timezone.now)
    broadcast_at = models.DateTimeField(null=True, blank=True)
    block_number = models.PositiveBigIntegerField(null=True, blank=True)
    gas_used = models.PositiveBigIntegerField(null=True, blank=True)
    gas_cost_wei = models.DecimalField(max_digits=78, decimal_places=0, null=True, blank=True)

    objects = SettlementTxQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["network", "relayer", "nonce"], name="settlementtx_lane_nonce"),
            models.Index(fields=["relayer"], condition=models.Q(block_number=None), name="settlementtx_unmined"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.tx_hash} ({self.items} payments, nonce {self.nonce})"

    @property
    def hashes(self) -> list[str]:
        """Every signature of this transaction: any of them may be the one mined."""
        return [self.tx_hash, *self.replaced_hashes]

    def share(self, index: int) -> tuple[int | None, int | None]:
        """(gas, cost in wei) of item ``index``: the transaction's divided by its items, the
        remainder wei spread over the first items so that the shares add up exactly."""
        if self.gas_used is None or self.gas_cost_wei is None:
            return None, None
        cost, items = int(self.gas_cost_wei), max(self.items, 1)
        return self.gas_used // items, cost // items + (1 if index < cost % items else 0)


class RelayerNonce(models.Model):
    """A relayer account (a lane) on a chain: the row workers lock while they allocate a nonce
    and sign.

    Several workers share a lane: each takes this row ``FOR UPDATE``, picks the nonce (see
    ``relayer.allocate_nonce``), stores the signed transaction and commits, so nonces neither
    collide nor skip. With several lanes, a worker takes the least loaded row it can lock
    (``SKIP LOCKED``), so workers sign in parallel. ``next_nonce`` records the last allocation,
    for operators.
    """

    network = models.CharField(max_length=64)
    address = models.CharField(max_length=42)
    next_nonce = models.PositiveBigIntegerField()
    #: Set when the node refused one of the lane's transactions for lack of gas money; the lane
    #: then takes no new transactions (its stored ones are rebroadcast as they are, never
    #: re-signed with higher fees) until a balance check shows funds (``relayer.recheck_unfunded``).
    unfunded_since = models.DateTimeField(null=True, blank=True)
    unfunded_reason = models.TextField(blank=True, help_text="The node's refusal that flagged the lane")

    class Meta:
        verbose_name = "relayer lane"
        constraints = [models.UniqueConstraint(fields=["network", "address"], name="relayer_nonce_unique")]

    def __str__(self) -> str:
        return f"{self.address}@{self.network}: {self.next_nonce}"


class HardwareTier(models.Model):
    """Hardware a model runs on, priced by the second (operators edit these in admin)."""

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=128)
    price_per_second = models.DecimalField(
        max_digits=20,
        decimal_places=9,
        validators=[MinValueValidator(Decimal(0))],
        help_text="USDC per second of run time",
    )
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["price_per_second", "slug"]
        permissions = [("view_payment_options", "Can view the accepted payment options")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(price_per_second__gte=0), name="tier_price_not_negative"
            )
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:

        previous = HardwareTier.objects.filter(pk=self.pk).first() if self.pk else None
        super().save(*args, **kwargs)
        if previous is None or previous.price_per_second == self.price_per_second:
            return
        # Every per-second model on this tier changed price: audit each and drop its cache.
        changed_by = getattr(self, "_changed_by", None)
        affected = []
        for model in self.models.all():
            new_rule = model.pricing_rule()
            if new_rule.mode != PER_SECOND:
                continue
            old_rule = dataclasses.replace(new_rule, tier_price_per_second=previous.price_per_second)
            PriceChange.objects.create(
                model=model,
                tier=self,
                changed_by=changed_by,
                old_rule=old_rule.snapshot(),
                new_rule=new_rule.snapshot(),
            )
            affected.append(model.pk)
        self.models.model.objects.bump_price_version(affected)


class PriceChange(models.Model):
    """Audit history of prices: who changed what, when, from which rule to which."""

    model = models.ForeignKey("predictions.Model", on_delete=models.CASCADE, related_name="price_changes")
    tier = models.ForeignKey(HardwareTier, null=True, blank=True, on_delete=models.SET_NULL)
    changed_at = models.DateTimeField(default=timezone.now, db_index=True)
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    old_rule = models.JSONField()
    new_rule = models.JSONField()

    class Meta:
        ordering = ["-changed_at"]

    def __str__(self) -> str:
        return f"{self.model}: {self.old_price} -> {self.new_price}"

    @property
    def old_price(self) -> Decimal | None:
        return _price_of(self.old_rule)

    @property
    def new_price(self) -> Decimal | None:
        return _price_of(self.new_rule)


def _price_of(snapshot: dict[str, Any]) -> Decimal | None:
    """A snapshot's price per run with default inputs (None if it prices nothing)."""
    try:
        return PriceRule.from_snapshot(snapshot).quote()
    except PricingError:
        return None


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


class ExportStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    DONE = "done", "Ready"
    FAILED = "failed", "Failed"
    EXPIRED = "expired", "Expired (file deleted)"


class ExportJob(models.Model):
    """One ledger export and its audit record: who, when, which filters, how many rows, the
    file's checksum. The admin's run in the background (a Celery task) and their files expire;
    the command's are written where the user says and recorded here as well."""

    class Source(models.TextChoices):
        ADMIN = "admin", "Admin"
        COMMAND = "command", "Command line"

    class Format(models.TextChoices):
        CSV = "csv", "CSV (a zip: data.csv, summary.csv, rates.csv, export.json)"
        XLSX = "xlsx", "XLSX (sheets Data and Summary)"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    source = models.CharField(max_length=16, choices=Source.choices)
    format = models.CharField(max_length=8, choices=Format.choices)
    filters = models.JSONField(default=dict)
    status = models.CharField(max_length=8, choices=ExportStatus.choices, default=ExportStatus.QUEUED)
    rows = models.PositiveBigIntegerField(default=0, help_text="Data rows written")
    rows_total = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    #: sha256 of the file handed out (the zip or the workbook); data.csv's own is in export.json.
    checksum = models.CharField(max_length=64, blank=True)
    file_name = models.CharField(max_length=255, blank=True, help_text="Under X402_EXPORT_DIR")
    size = models.PositiveBigIntegerField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        # Without it a user downloads only the exports they made (superusers: all).
        permissions = [("download_any_export", "Can download another user's export")]

    def __str__(self) -> str:
        return f"{self.format} export by {self.user or self.source} at {self.created_at:%Y-%m-%d %H:%M}"


class ExportDownload(models.Model):
    """Append-only audit: who downloaded which export file, and when (the files hold every
    payer's address and amounts, and leave the building with accountants)."""

    job = models.ForeignKey(ExportJob, on_delete=models.PROTECT, related_name="downloads")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["job", "id"]

    def __str__(self) -> str:
        return f"{self.user} at {self.at:%Y-%m-%d %H:%M:%S}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise IllegalTransition("export downloads are append-only")
        super().save(*args, **kwargs)


class NativeTokenRate(models.Model):
    """What one unit of a chain's native token (gas) is worth in USD, as finance sets it: no
    price feed is reachable, so every rate says where it came from. The newest row of a network
    applies; rows are never edited (the history stays)."""

    network = models.CharField(max_length=64, help_text="CAIP-2, e.g. eip155:8453")
    symbol = models.CharField(max_length=16, default="ETH")
    usd_per_token = models.DecimalField(
        max_digits=30, decimal_places=8, validators=[MinValueValidator(Decimal(0))]
    )
    source = models.CharField(max_length=255, help_text="Where the rate came from, e.g. 'Coinbase close 2026-11-30'")
    set_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    set_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["network", "-set_at"]
        constraints = [
            models.CheckConstraint(condition=models.Q(usd_per_token__gte=0), name="nativerate_not_negative")
        ]

    def __str__(self) -> str:
        return f"{self.symbol} on {self.network}: {self.usd_per_token} USD ({self.source})"


class TransferDirection(models.TextChoices):
    """Which side of a Transfer the watched address is on."""

    TO = "to", "Received (our pay-to)"
    FROM = "from", "Sent (our refund wallet)"


class ScannedRange(models.Model):
    """A block range whose token Transfer logs to (or from) an address were read and stored as
    :class:`ChainTransfer` rows: the reconciliation report reads each final block once.

    Only blocks with the option's confirmations are recorded (a reorg can still change the
    others; those are read afresh every time)."""

    network = models.CharField(max_length=64)
    asset = models.CharField(max_length=42)
    address = models.CharField(max_length=42)
    direction = models.CharField(max_length=4, choices=TransferDirection.choices)
    from_block = models.PositiveBigIntegerField()
    to_block = models.PositiveBigIntegerField()
    scanned_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["network", "asset", "address", "from_block"]
        indexes = [
            models.Index(fields=["network", "asset", "address", "direction", "from_block"], name="scannedrange_lookup")
        ]
        constraints = [
            models.CheckConstraint(condition=models.Q(to_block__gte=models.F("from_block")), name="scannedrange_order")
        ]

    def __str__(self) -> str:
        return f"{self.direction} {self.address} blocks {self.from_block}-{self.to_block}"


class ChainTransfer(models.Model):
    """A token Transfer log read from the chain (a final block): the chain side of reconciliation."""

    network = models.CharField(max_length=64)
    asset = models.CharField(max_length=42)
    tx_hash = models.CharField(max_length=66)
    log_index = models.PositiveIntegerField()
    block_number = models.PositiveBigIntegerField()
    block_time = models.DateTimeField()
    sender = models.CharField(max_length=42)
    recipient = models.CharField(max_length=42)
    amount = models.DecimalField(max_digits=78, decimal_places=0, help_text="Atomic units")

    class Meta:
        ordering = ["block_number", "log_index"]
        constraints = [
            models.UniqueConstraint(fields=["network", "tx_hash", "log_index"], name="chaintransfer_once")
        ]
        indexes = [
            models.Index(fields=["network", "asset", "recipient", "block_number"], name="chaintransfer_to"),
            models.Index(fields=["network", "asset", "sender", "block_number"], name="chaintransfer_from"),
        ]

    def __str__(self) -> str:
        return f"{self.amount} {self.sender} -> {self.recipient} ({self.tx_hash}#{self.log_index})"


class ReconciliationNote(models.Model):
    """Finance's word on a reconciliation line that did not match: who looked, and why it is so.

    A chain line is named by its log (network, transaction, log index), a ledger line by its
    payment or refund: the notes survive any re-reading of the chain."""

    network = models.CharField(max_length=64, blank=True)
    tx_hash = models.CharField(max_length=66, blank=True)
    log_index = models.PositiveIntegerField(null=True, blank=True)
    payment = models.ForeignKey(
        Payment, null=True, blank=True, on_delete=models.PROTECT, related_name="reconciliation_notes"
    )
    refund = models.ForeignKey(
        "Refund", null=True, blank=True, on_delete=models.PROTECT, related_name="reconciliation_notes"
    )
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(payment__isnull=False, refund=None, log_index=None)
                | models.Q(payment=None, refund__isnull=False, log_index=None)
                | models.Q(payment=None, refund=None, log_index__isnull=False),
                name="reconciliationnote_one_subject",
            )
        ]
        indexes = [models.Index(fields=["network", "tx_hash"], name="reconciliationnote_log")]

    def __str__(self) -> str:
        return f"{self.author or 'command'}: {self.reason[:60]}"


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
        SettlementTx, null=True, blank=True, on_delete=models.PROTECT, related_name="refunds"
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


# The channels' models live in their own package; imported here so that Django registers them.
from payments.channels.models import Channel, ChannelCharge, ChannelStatus, ChannelTx, ChannelTxStatus  # noqa: E402,F401
