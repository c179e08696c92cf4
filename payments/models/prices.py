"""Prices as operators set them: hardware tiers and the audit history of price changes."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from payments.pricing import PER_SECOND, PriceRule, PricingError


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
