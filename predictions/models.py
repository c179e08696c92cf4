"""Models, their versions, and the predictions agents buy."""

from __future__ import annotations

import base64
import copy
import functools
import math
import secrets
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import jsonschema
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import connections, models
from django.utils import timezone
from django.utils.crypto import salted_hmac

from payments.models import FailureCharge, HardwareTier, Payment, PriceChange, UptoOrder
from payments.pricing import PriceRule, PricingError
from x402site.conf import x402

from . import runners

_slug = RegexValidator(r"^[a-z0-9][a-z0-9_.-]*$", "lowercase letters, digits, '-', '_' and '.'")


def validate_server_url(value: str) -> None:
    """An http(s) base URL with a host; internal names without a domain (``http://gpu-1:5000``)
    are fine, unlike Django's URLValidator."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValidationError("Enter an http(s) URL such as http://gpu-1:5000.")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValidationError("The port must be a number from 0 to 65535.") from None


def new_prediction_id() -> str:
    """160 random bits in lowercase base32: unguessable, so the id is the capability to read."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()


class SettlementPolicy(models.TextChoices):
    BEFORE_RUN = "before_run", "Settle and confirm, then run"
    AFTER_SUCCESS = "after_success", "Run, then settle only if it succeeded"

    @property
    def refunds_unserved(self) -> bool:
        """A run paid for up front that ends without its output is refunded; ``after_success``
        never charges for one (its authorization is released instead)."""
        return self == SettlementPolicy.BEFORE_RUN


class PricingMode(models.TextChoices):
    FLAT = "flat", "Flat price per run"
    PER_SECOND = "per_second", "Tier price per second x expected seconds"


#: The fields of a model that make up its pricing rule (changes to them are audited).
PRICING_FIELDS = (
    "is_free",
    "pricing_mode",
    "price",
    "hardware_id",
    "expected_seconds",
    "minimum_price",
    "markup_percent",
    "unit_field",
    "unit_price",
)
_money = {"max_digits": 20, "decimal_places": 6, "validators": [MinValueValidator(Decimal(0))]}


class ModelQuerySet(models.QuerySet["Model"]):
    def bump_price_version(self, pks: list[int]) -> dict[int, int]:
        """Mark these models' prices changed (each process's cache of honoured rules is keyed by
        the version); their new versions."""
        self.filter(pk__in=pks).update(price_version=models.F("price_version") + 1)
        return dict(self.filter(pk__in=pks).values_list("pk", "price_version"))


class Model(models.Model):
    owner = models.CharField(max_length=64, validators=[_slug])
    name = models.CharField(max_length=128, validators=[_slug])
    description = models.TextField(blank=True)
    hardware = models.ForeignKey(
        HardwareTier, null=True, blank=True, on_delete=models.PROTECT, related_name="models"
    )
    is_free = models.BooleanField(default=False, help_text="Runs without payment")
    settlement_policy = models.CharField(
        max_length=16,
        choices=SettlementPolicy.choices,
        default=SettlementPolicy.BEFORE_RUN,
        help_text="before_run: no compute before the money is confirmed (the default: an agent can "
        "never get work it did not pay for). after_success: the agent pays only for successful runs; "
        "we bear the compute of runs whose payment then fails.",
    )
    pricing_mode = models.CharField(max_length=16, choices=PricingMode.choices, default=PricingMode.FLAT)
    price = models.DecimalField(**_money, default=Decimal("0.01"), help_text="Flat USDC per run")
    expected_seconds = models.DecimalField(
        max_digits=12,
        decimal_places=3,
        default=Decimal(1),
        validators=[MinValueValidator(Decimal(0))],
        help_text="Per-second pricing: expected run time",
    )
    minimum_price = models.DecimalField(**_money, default=Decimal(0), help_text="USDC floor per run")
    markup_percent = models.DecimalField(
        max_digits=7, decimal_places=2, default=Decimal(0), validators=[MinValueValidator(Decimal(0))]
    )
    unit_field = models.CharField(
        max_length=64, blank=True, help_text="Input field that multiplies unit_price (e.g. num_outputs)"
    )
    unit_price = models.DecimalField(**_money, default=Decimal(0), help_text="USDC per unit of unit_field")
    upto_order = models.CharField(
        max_length=16,
        choices=UptoOrder.choices,
        default=UptoOrder.OFF,
        help_text="Per-second models: also offer pay-per-second (x402 upto: the agent permits the price "
        "of the whole time limit and is charged for the seconds the run took), and in which order.",
    )
    upto_failure_charge = models.CharField(
        max_length=16,
        choices=FailureCharge.choices,
        default=FailureCharge.NOTHING,
        help_text="Pay-per-second runs that fail on our side (the model raised, the runner was lost) or that an "
        "operator cancels are charged this (a run stopped at its time limit or canceled by its payer is "
        "charged its seconds).",
    )
    offers_channels = models.BooleanField(
        default=True,
        help_text="Fixed-price models: also offer x402 batch-settlement (the agent deposits once into a "
        "payment channel and pays each run with an off-chain voucher), where the server enables channels.",
    )
    created_at = models.DateTimeField(default=timezone.now)
    price_version = models.PositiveIntegerField(
        default=0, editable=False, help_text="Bumped with every price change (the pricing cache's key)"
    )
    # Replicate's model metadata (shown as is in the API; empty is null).
    github_url = models.URLField(max_length=500, blank=True, help_text="The model's source code")
    paper_url = models.URLField(max_length=500, blank=True)
    license_url = models.URLField(max_length=500, blank=True)
    cover_image_url = models.URLField(max_length=500, blank=True)

    objects = ModelQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="model_owner_name_unique"),
            models.CheckConstraint(condition=models.Q(price__gte=0), name="model_price_not_negative"),
            models.CheckConstraint(
                condition=models.Q(minimum_price__gte=0, unit_price__gte=0, markup_percent__gte=0),
                name="model_pricing_not_negative",
            ),
        ]
        ordering = ["owner", "name"]

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        previous = Model.objects.select_related("hardware").filter(pk=self.pk).first() if self.pk else None
        if previous is not None:
            self.price_version = previous.price_version  # never written back older by a stale copy
        super().save(*args, **kwargs)
        if previous is None:
            return
        old_rule, new_rule = previous.pricing_rule(), self.pricing_rule()
        if old_rule != new_rule:
            PriceChange.objects.create(
                model=self,
                tier=self.hardware,
                changed_by=getattr(self, "_changed_by", None),
                old_rule=old_rule.snapshot(),
                new_rule=new_rule.snapshot(),
            )
            self.price_version = Model.objects.bump_price_version([self.pk])[self.pk]

    def pricing_rule(self) -> PriceRule:
        """The model's pricing rule (see payments.pricing)."""
        return PriceRule(
            is_free=self.is_free,
            mode=self.pricing_mode,
            price=Decimal(self.price),
            tier=self.hardware.slug if self.hardware else None,
            tier_price_per_second=Decimal(self.hardware.price_per_second) if self.hardware else Decimal(0),
            expected_seconds=Decimal(self.expected_seconds),
            minimum=Decimal(self.minimum_price),
            markup_percent=Decimal(self.markup_percent),
            unit_field=self.unit_field,
            unit_price=Decimal(self.unit_price),
        )

    @property
    def offers_upto(self) -> bool:
        return self.upto_order != UptoOrder.OFF and self.pricing_mode == PricingMode.PER_SECOND and not self.is_free

    @property
    def time_limit_seconds(self) -> int:
        """How long one run may take: what a per-second price paid for (expected seconds times
        ``X402_PER_SECOND_OVERRUN_FACTOR``), and never more than ``X402_PREDICTION_TIME_LIMIT``."""
        cap = x402.runs.time_limit_seconds
        if self.pricing_mode != PricingMode.PER_SECOND or self.is_free:
            return cap
        paid_for = self.expected_seconds * Decimal(str(x402.runs.per_second_overrun_factor))
        return max(1, min(cap, math.ceil(paid_for)))

    @property
    def price_per_run(self) -> Decimal:
        """The price of a run with the latest version's default inputs (0 if it cannot be priced)."""
        version = self.latest_version
        try:
            return self.pricing_rule().quote(version.defaults() if version else {})
        except PricingError:
            return Decimal(0)

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.pricing_mode == PricingMode.PER_SECOND and self.hardware is None:
            errors["hardware"] = "Per-second pricing needs a hardware tier."
        if not self.is_free and self.price_per_run <= 0:
            errors["price"] = "A paid model must cost more than 0; tick 'is free' to make it free."
        if self.is_free and self.hardware and self.hardware.price_per_second > 0:
            # Giving away paid hardware is almost always a slip: say so rather than guess.
            errors["is_free"] = (
                f"Marked free but runs on {self.hardware}, which costs "
                f"{self.hardware.price_per_second} USDC/s: untick 'is free' or pick a free tier."
            )
        if self.unit_field and self.unit_price <= 0:
            errors["unit_price"] = "Set a price per unit, or clear the unit field."
        if self.upto_order != UptoOrder.OFF and self.pricing_mode != PricingMode.PER_SECOND:
            errors["upto_order"] = "Pay-per-second (upto) needs per-second pricing."
        if errors:
            raise ValidationError(errors)

    @property
    def latest_version(self) -> ModelVersion | None:
        """None for a model not saved yet (the admin validates one before it has versions)."""
        return self.versions.order_by("-created_at").first() if self.pk else None


#: ``latest_of``'s last build per (database, owner, name): the rows' versions and the objects.
_latest_built: dict[tuple[str, str, str], tuple[tuple[Any, ...], ModelVersion]] = {}


class ModelVersionQuerySet(models.QuerySet["ModelVersion"]):
    def latest_of(self, owner: str, name: str) -> ModelVersion | None:
        """The latest version of model ``owner/name``, with its model and tier (None when there
        is no such model or it has no version): what every create and 402 prices and runs.

        One small query reads which rows are current: the version's id and the row version of
        the version, its model and its tier (PostgreSQL's ``xmin`` and ``ctid``: any change to
        a row, committed or earlier in this transaction, is a new row version). The ORM builds
        the objects only when one of those changed; otherwise this process copies its last
        build. That saves the ORM's query building and row mapping on the hot path (about
        1.2 ms of 1.45 per call), never a read: a change is seen by the next request.
        """
        with connections[self.db].cursor() as cursor:
            cursor.execute(_latest_stamp_sql(), [owner, name])
            stamp = cursor.fetchone()
        if stamp is None:
            return None
        key = (self.db, owner, name)
        built = _latest_built.get(key)
        if built is None or built[0] != stamp:
            version = self.select_related("model__hardware").filter(pk=stamp[0]).first()
            if version is None:  # deleted since
                return None
            _latest_built[key] = built = (stamp, version)
        # Copies: a request's objects are its own (the cached ones are shared between threads).
        version, model = copy.copy(built[1]), copy.copy(built[1].model)
        if model.hardware is not None:
            model.hardware = copy.copy(model.hardware)
        version.model = model
        return version


@functools.cache
def _latest_stamp_sql() -> str:
    versions, models_, tiers = (m._meta.db_table for m in (ModelVersion, Model, HardwareTier))
    of_model, tier = ModelVersion._meta.get_field("model").column, Model._meta.get_field("hardware").column
    return (
        "SELECT v.id, v.xmin::text, v.ctid::text, m.xmin::text, m.ctid::text, t.xmin::text, t.ctid::text "
        f'FROM "{versions}" v JOIN "{models_}" m ON m.id = v."{of_model}" '
        f'LEFT JOIN "{tiers}" t ON t.id = m."{tier}" '
        "WHERE m.owner = %s AND m.name = %s ORDER BY v.created_at DESC LIMIT 1"
    )


class ModelVersion(models.Model):
    id = models.CharField(max_length=64, primary_key=True)
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="versions")
    runner = models.CharField(max_length=16, choices=runners.choices, default="python")
    predictor = models.CharField(
        max_length=255,
        blank=True,
        help_text="python: dotted path of a predictor class, e.g. predictions.runners.demo.EchoText",
    )
    cog_url = models.CharField(
        max_length=200,
        blank=True,
        validators=[validate_server_url],
        help_text="cog: base URL of the Cog server, e.g. http://gpu-1:5000",
    )
    input_schema = models.JSONField(default=dict, help_text="JSON Schema of the input object")
    output_schema = models.JSONField(default=dict, blank=True)
    cog_version = models.CharField(
        max_length=32,
        blank=True,
        help_text="The Cog version the model was built with, if it is a Cog model (shown in the API)",
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = ModelVersionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.model}:{self.id[:12]}"

    def defaults(self) -> dict[str, Any]:
        """The input schema's defaults: what a run gets for the fields its input leaves out."""
        props = self.input_schema.get("properties") if isinstance(self.input_schema, dict) else None
        if not isinstance(props, dict):
            return {}
        return {name: spec["default"] for name, spec in props.items() if isinstance(spec, dict) and "default" in spec}

    @property
    def runner_impl(self) -> runners.Runner:
        return runners.get(self.runner)

    def clean(self) -> None:
        """The schemas must be JSON Schemas, the input's an object. (Whether the runner accepts
        the configuration, e.g. a Cog server answers, is asked by the admin when it changes:
        ``runner_impl.validate``.)"""
        errors: dict[str, str] = {}
        for name in ("input_schema", "output_schema"):
            schema = getattr(self, name)
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                errors[name] = f"Not a valid JSON Schema: {exc.message}"
        if "input_schema" not in errors and (
            not isinstance(self.input_schema, dict) or self.input_schema.get("type", "object") != "object"
        ):
            errors["input_schema"] = "The input schema must describe an object."
        if errors:
            raise ValidationError(errors)


class PredictionStatus(models.TextChoices):
    """Replicate's statuses. Only ``predictions.lifecycle`` moves a prediction between them."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    #: Its Cancel-After deadline passed before it started (Replicate's word; not charged).
    ABORTED = "aborted"


#: Statuses a prediction never leaves.
TERMINAL = frozenset(
    {PredictionStatus.SUCCEEDED, PredictionStatus.FAILED, PredictionStatus.CANCELED, PredictionStatus.ABORTED}
)


def default_time_limit() -> int:
    """The longest any run may take (lifecycle.create records the model's own limit)."""
    return x402.runs.time_limit_seconds


class PredictionQuerySet(models.QuerySet):
    def running(self) -> PredictionQuerySet:
        """Claimed and not yet reported back by its runner."""
        return self.filter(status=PredictionStatus.PROCESSING, run_ended_at=None)

    def overdue(self, grace: float = 0) -> PredictionQuerySet:
        """Running more than ``grace`` seconds past its own time limit, counted from when its
        runner confirmed the run (:attr:`Prediction.run_started_at`)."""
        limit = models.ExpressionWrapper(
            models.F("time_limit_seconds") * timedelta(seconds=1), output_field=models.DurationField()
        )
        deadline = models.ExpressionWrapper(
            models.F("run_started_at") + limit, output_field=models.DateTimeField()
        )
        return (
            self.running()
            .alias(deadline=deadline)
            .filter(deadline__lt=timezone.now() - timedelta(seconds=grace))
        )

    def unstarted(self, timeout: float) -> PredictionQuerySet:
        """Claimed more than ``timeout`` seconds ago and its runner never confirmed the run."""
        return self.running().filter(run_started_at=None, started_at__lt=timezone.now() - timedelta(seconds=timeout))

    def awaiting_payment(self) -> PredictionQuerySet:
        """Ran successfully (``after_success``); its output is released once the payment is confirmed."""
        return self.filter(status=PredictionStatus.PROCESSING, run_ended_at__isnull=False)


def prediction_ref(prediction_id: str) -> str:
    """The prediction's pseudonym for finance (exports, accountants): the id is a bearer
    capability (GET and cancel its prediction), the ref is not. HMAC-SHA256 of the id under a
    purpose-keyed secret derived from SECRET_KEY; stored at creation, so a later SECRET_KEY
    rotation leaves the refs already handed out valid."""
    return salted_hmac("predictions.prediction_ref", prediction_id, algorithm="sha256").hexdigest()[:32]


class Prediction(models.Model):
    id = models.CharField(max_length=40, primary_key=True, default=new_prediction_id, editable=False)
    ref = models.CharField(
        max_length=32, db_index=True, editable=False, blank=True, help_text="Pseudonym in exports (not a capability)"
    )
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
    #: When it was claimed for a run (Replicate's ``started_at``); its runner may not have it yet.
    started_at = models.DateTimeField(null=True, blank=True)
    #: When its runner confirmed it has the run (Cog accepted the PUT, the python runner entered
    #: ``predict``): the billable run clock and the time-limit watchdog start here.
    run_started_at = models.DateTimeField(null=True, blank=True)
    #: The run's last sign of life (a heartbeat of the python runner, a report of Cog's): the
    #: evidence that a run found at its time limit was alive, hence "stopped", not lost.
    alive_at = models.DateTimeField(null=True, blank=True)
    #: When the runner reported the outcome (a success under after_success then waits for payment).
    run_ended_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    predict_time = models.FloatField(null=True, blank=True)
    #: Its input, output and logs were removed after the retention period (X402_DATA_RETENTION_DAYS).
    data_removed = models.BooleanField(default=False)
    webhook = models.URLField(max_length=2000, blank=True)
    webhook_events_filter = models.JSONField(default=list, blank=True, help_text="Empty: every event")
    cancel_after_at = models.DateTimeField(null=True, blank=True, help_text="Cancel-After deadline")
    # Fixed at creation from the model, so what was agreed holds whatever the model says later.
    settlement_policy = models.CharField(
        max_length=16, choices=SettlementPolicy.choices, default=SettlementPolicy.BEFORE_RUN
    )
    time_limit_seconds = models.PositiveIntegerField(
        default=default_time_limit, help_text="How long the run may take (what was paid for)"
    )
    # One payment buys exactly one prediction (OneToOne), and a payment is never deleted.
    payment = models.OneToOneField(
        Payment, null=True, blank=True, on_delete=models.PROTECT, related_name="prediction"
    )
    #: Paid with a voucher on this ``batch-settlement`` channel (held for it until it ends,
    #: then charged: payments.channels.charges).
    channel = models.ForeignKey(
        "payments.Channel", null=True, blank=True, on_delete=models.PROTECT, related_name="predictions"
    )
    #: What its channel was charged for it (none while it runs, or when it was charged nothing).
    channel_charge = models.OneToOneField(
        "payments.ChannelCharge", null=True, blank=True, on_delete=models.PROTECT, related_name="prediction"
    )

    objects = PredictionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("cancel_prediction", "Can cancel a prediction")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=PredictionStatus.values), name="prediction_status_valid"
            )
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.assign_ref()
        super().save(*args, **kwargs)

    def assign_ref(self) -> None:
        """The export pseudonym, from the id (before the row's first insert, however made)."""
        if not self.ref:
            self.ref = prediction_ref(self.id)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def output_released(self) -> bool:
        """A paid output leaves only once its prediction succeeded (after_success: once paid),
        or while it runs under ``before_run`` (a streaming run's pieces: it runs only once its
        payment is confirmed)."""
        return (
            self.status == PredictionStatus.SUCCEEDED
            or self.payment_id is None
            or (self.status == PredictionStatus.PROCESSING and self.settlement_policy == SettlementPolicy.BEFORE_RUN)
        )

    @property
    def logs_released(self) -> bool:
        """Its logs may be shown: not while its payment is held for after the run
        (``after_success``, and every ``upto`` run), as its output is not (a model that prints
        its result would hand it out before payment), and never when such a run ended unserved
        (canceled or failed: the authorization released, or only a failure charge taken; its
        logs were not paid for, and a cancel just before the end would hand them out free).
        Its ``error`` says what went wrong."""
        return (
            self.payment_id is None
            or self.settlement_policy != SettlementPolicy.AFTER_SUCCESS
            or self.status in (PredictionStatus.SUCCEEDED, PredictionStatus.STARTING)
        )


class PredictionEvent(models.Model):
    """Append-only: one row per status change, with what caused it."""

    class Cause(models.TextChoices):
        API = "api", "API request"
        TASK = "task", "Run task"
        CALLBACK = "callback", "Runner callback"
        ADMIN = "admin", "Admin"
        CANCEL = "cancel", "API cancel"
        SWEEP = "sweep", "Sweep"
        PAYMENT = "payment", "Payment"

    prediction = models.ForeignKey(Prediction, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(default=timezone.now)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16)
    cause = models.CharField(max_length=16, choices=Cause.choices)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["prediction", "id"]

    def __str__(self) -> str:
        return f"{self.from_status or '-'} -> {self.to_status} ({self.cause})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValueError("prediction events are append-only")
        super().save(*args, **kwargs)
