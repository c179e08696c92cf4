"""The outbox: every transaction our relayer signs (settlements, batches, refunds, channel
transactions) stored before it is broadcast, and the lanes' nonces."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from payments.channels.models import ChannelTxStatus
from payments.models.ledger import PaymentStatus
from payments.models.refunds import RefundStatus


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
