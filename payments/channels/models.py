"""Channels of the ``batch-settlement`` scheme: our mirror of each, the ledger of what we charged
on it, and the link from each to the outbox transactions sent for it.

Registered with Django through ``payments.models`` (one import at its end). The outbox row is
named by its label (``payments.SettlementTx``), so this module imports nothing of the ledger.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import models
from django.utils import timezone

from payments.x402 import batch_settlement as bs

#: uint128/uint256 amounts: base units, as the token counts them.
AMOUNT = {"max_digits": 78, "decimal_places": 0}


class ChannelStatus(models.TextChoices):
    OPEN = "open", "Open"
    #: The payer started a timed withdrawal: what we charged must be claimed before it finalizes.
    WITHDRAWING = "withdrawing", "Timed withdrawal pending"
    #: Nothing left in escrow beyond what was claimed (refunded or withdrawn).
    CLOSED = "closed", "Closed"


class ChannelTxStatus(models.TextChoices):
    #: Signed and stored (then broadcast): its signer's nonce is held until it is mined or dropped.
    SENT = "sent", "Sent"
    #: Mined with status 1 at the network's confirmation depth.
    MINED = "mined", "Mined"
    #: Mined with status 0 at depth: nothing changed on chain (the sweep tries again).
    REVERTED = "reverted", "Reverted"
    #: Never mined: another transaction of the signer used its nonce.
    DROPPED = "dropped", "Dropped"


class Channel(models.Model):
    """Our mirror of one channel of the settlement contract.

    The chain's fields (``balance``, ``total_claimed``, ``refund_nonce``, the pending
    withdrawal) are as last read (:func:`payments.channels.state.refresh_from_chain`); ours are
    what we charged in total and the highest voucher the payer signed, which is what we claim
    with. Charges lock the row (``select_for_update``): one request at a time per channel;
    ``version`` counts the changes to our fields.
    """

    channel_id = models.CharField(max_length=66, unique=True, help_text="0x-prefixed, lower case")
    network = models.CharField(max_length=64)
    #: The settlement contract (the channel id is bound to it).
    contract = models.CharField(max_length=42, default=bs.BATCH_SETTLEMENT_ADDRESS)
    # The ChannelConfig (checksummed addresses).
    payer = models.CharField(max_length=42)
    payer_authorizer = models.CharField(max_length=42)
    receiver = models.CharField(max_length=42)
    receiver_authorizer = models.CharField(max_length=42)
    asset = models.CharField(max_length=42, help_text="The token (ChannelConfig.token)")
    withdraw_delay = models.PositiveIntegerField()
    salt = models.CharField(max_length=66)
    status = models.CharField(max_length=16, choices=ChannelStatus.choices, default=ChannelStatus.OPEN)
    # The chain's, as last read.
    balance = models.DecimalField(**AMOUNT, default=Decimal(0))
    total_claimed = models.DecimalField(**AMOUNT, default=Decimal(0))
    refund_nonce = models.DecimalField(**AMOUNT, default=Decimal(0))
    withdraw_amount = models.DecimalField(**AMOUNT, default=Decimal(0))
    #: When the payer's timed withdrawal started, and when it may be finalized (None: none pending).
    withdraw_initiated_at = models.DateTimeField(null=True, blank=True)
    withdraw_finalize_after = models.DateTimeField(null=True, blank=True)
    chain_read_at = models.DateTimeField(null=True, blank=True)
    # Ours.
    charged_cumulative = models.DecimalField(**AMOUNT, default=Decimal(0), help_text="What we charged in total")
    signed_max_claimable = models.DecimalField(
        **AMOUNT, default=Decimal(0), help_text="The ceiling of the highest voucher we hold"
    )
    voucher_signature = models.CharField(max_length=2 + 2 * bs.MAX_SIGNATURE_BYTES, blank=True)
    refunded = models.DecimalField(**AMOUNT, default=Decimal(0), help_text="Returned by cooperative refunds")
    # The request in flight (one per channel): admitted on a voucher, charged when it ends.
    held_by = models.CharField(max_length=64, blank=True, help_text="The request the channel is held for")
    held_price = models.DecimalField(**AMOUNT, default=Decimal(0), help_text="Its price: the most it is charged")
    #: Its voucher's signature (its ceiling is our charged total + the price); ours once charged.
    held_signature = models.CharField(max_length=2 + 2 * bs.MAX_SIGNATURE_BYTES, blank=True)
    held_at = models.DateTimeField(null=True, blank=True)
    #: Paid per second: its usage price (``UsagePrice.snapshot``; the price is then the ceiling).
    held_usage = models.JSONField(default=dict, blank=True)
    version = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["network", "asset", "receiver_authorizer"], name="channel_claim_group")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(charged_cumulative__lte=models.F("signed_max_claimable")),
                name="channel_charged_within_signed",
            ),
        ]

    def __str__(self) -> str:
        return f"channel {self.channel_id[:10]}… of {self.payer}"

    @classmethod
    def fields_of(cls, config: bs.ChannelConfig) -> dict[str, object]:
        """The model fields of ``config``."""
        return {
            "payer": bs.checksum(config.payer),
            "payer_authorizer": bs.checksum(config.payer_authorizer),
            "receiver": bs.checksum(config.receiver),
            "receiver_authorizer": bs.checksum(config.receiver_authorizer),
            "asset": bs.checksum(config.token),
            "withdraw_delay": config.withdraw_delay,
            "salt": bs.hex_of(config.salt),
        }

    @property
    def config(self) -> bs.ChannelConfig:
        return bs.ChannelConfig(
            payer=bytes.fromhex(self.payer[2:]),
            payer_authorizer=bytes.fromhex(self.payer_authorizer[2:]),
            receiver=bytes.fromhex(self.receiver[2:]),
            receiver_authorizer=bytes.fromhex(self.receiver_authorizer[2:]),
            token=bytes.fromhex(self.asset[2:]),
            withdraw_delay=self.withdraw_delay,
            salt=bytes.fromhex(self.salt[2:]),
        )

    @property
    def id_bytes(self) -> bytes:
        return bytes.fromhex(self.channel_id[2:])

    @property
    def mirror(self) -> bs.ChannelMirror:
        started = self.withdraw_initiated_at
        return bs.ChannelMirror(
            balance=int(self.balance),
            total_claimed=int(self.total_claimed),
            charged_cumulative=int(self.charged_cumulative),
            signed_max_claimable=int(self.signed_max_claimable),
            signature=bytes.fromhex(self.voucher_signature[2:]) if self.voucher_signature else b"",
            withdraw_requested_at=int(started.timestamp()) if started else 0,
            refund_nonce=int(self.refund_nonce),
        )

    @property
    def unclaimed(self) -> int:
        """Charged and not yet claimed on chain (what a withdrawal could take from us)."""
        return max(int(self.charged_cumulative) - int(self.total_claimed), 0)

    def voucher_claim(self) -> bs.VoucherClaim:
        """The claim row raising the chain's claimed total to what we charged, on our best voucher."""
        return bs.VoucherClaim(
            self.config,
            int(self.signed_max_claimable),
            bytes.fromhex(self.voucher_signature[2:]),
            int(self.charged_cumulative),
        )


class ChannelCharge(models.Model):
    """One paid request on a channel: what it was charged and the cumulative total after it.
    Append-only; ``(channel, cumulative)`` is unique, so no voucher is ever charged twice."""

    channel = models.ForeignKey(Channel, on_delete=models.PROTECT, related_name="charges")
    amount = models.DecimalField(**AMOUNT)
    cumulative = models.DecimalField(**AMOUNT, help_text="The channel's charged total after this charge")
    max_claimable = models.DecimalField(**AMOUNT, help_text="The ceiling of the voucher that paid it")
    resource = models.CharField(max_length=2000, blank=True)
    fingerprint = models.CharField(max_length=64, blank=True, help_text="The request's payment fingerprint")
    reference = models.CharField(max_length=64, blank=True, help_text="What it paid for (a prediction's id)")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["channel", "cumulative"]
        constraints = [
            models.UniqueConstraint(fields=["channel", "cumulative"], name="channel_charge_cumulative_unique"),
            models.CheckConstraint(condition=models.Q(amount__gt=0), name="channel_charge_positive"),
            models.CheckConstraint(
                condition=models.Q(cumulative__lte=models.F("max_claimable")), name="channel_charge_within_voucher"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.amount} on {self.channel_id} (cumulative {self.cumulative})"


class ChannelTx(models.Model):
    """An outbox transaction (``SettlementTx``) sent for channels: a deposit, a claim (one row per
    channel it claims), a settle to pay-to (no channel), a cooperative refund. Its status is the
    transaction's outcome; while SENT the signer's nonce is held (``holding_nonce``)."""

    tx = models.ForeignKey("payments.SettlementTx", on_delete=models.PROTECT, related_name="channel_txs")
    channel = models.ForeignKey(Channel, on_delete=models.PROTECT, related_name="txs", null=True, blank=True)
    #: A deposit's or a refund's amount; a claim's target claimed total; a settle's amount.
    amount = models.DecimalField(**AMOUNT)
    status = models.CharField(max_length=16, choices=ChannelTxStatus.choices, default=ChannelTxStatus.SENT)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tx", "channel"], name="channel_tx_unique")]
        indexes = [models.Index(fields=["status"], condition=models.Q(status="sent"), name="channel_tx_open")]

    def __str__(self) -> str:
        return f"{self.tx_id} for {self.channel_id or 'pay-to'} ({self.status})"
