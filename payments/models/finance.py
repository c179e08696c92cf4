"""Finance's own records: ledger export jobs and downloads, native token rates, the chain's
transfers scanned for reconciliation and the notes on them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from payments.models.ledger import IllegalTransition, Payment


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
