"""Models, their versions, and the predictions agents buy."""

from __future__ import annotations

import base64
import secrets
from decimal import Decimal

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from payments.models import Payment

_slug = RegexValidator(r"^[a-z0-9][a-z0-9_.-]*$", "lowercase letters, digits, '-', '_' and '.'")


def new_prediction_id() -> str:
    """160 random bits in lowercase base32: unguessable, so the id is the capability to read."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()


class Model(models.Model):
    owner = models.CharField(max_length=64, validators=[_slug])
    name = models.CharField(max_length=128, validators=[_slug])
    description = models.TextField(blank=True)
    price = models.DecimalField(
        max_digits=20,
        decimal_places=6,
        default=Decimal("0.01"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="USDC per run; 0 makes the model free",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="model_owner_name_unique"),
            models.CheckConstraint(condition=models.Q(price__gte=0), name="model_price_not_negative"),
        ]
        ordering = ["owner", "name"]

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def latest_version(self) -> ModelVersion | None:
        return self.versions.order_by("-created_at").first()


class ModelVersion(models.Model):
    id = models.CharField(max_length=64, primary_key=True)
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="versions")
    predictor = models.CharField(
        max_length=255, help_text="Dotted path of a predictor class, e.g. predictions.runners.demo.EchoText"
    )
    input_schema = models.JSONField(default=dict, help_text="JSON Schema of the input object")
    output_schema = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.model}:{self.id[:12]}"


class PredictionStatus(models.TextChoices):
    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class Prediction(models.Model):
    id = models.CharField(max_length=40, primary_key=True, default=new_prediction_id, editable=False)
    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="predictions")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="predictions")
    input = models.JSONField()
    output = models.JSONField(null=True, blank=True)
    logs = models.TextField(blank=True)
    error = models.TextField(blank=True)
    status = models.CharField(
        max_length=16, choices=PredictionStatus.choices, default=PredictionStatus.STARTING
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    predict_time = models.FloatField(null=True, blank=True)
    # One payment buys exactly one prediction (OneToOne), and a payment is never deleted.
    payment = models.OneToOneField(
        Payment, null=True, blank=True, on_delete=models.PROTECT, related_name="prediction"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in (
            PredictionStatus.SUCCEEDED,
            PredictionStatus.FAILED,
            PredictionStatus.CANCELED,
        )
