"""What one run costs: pricing rules evaluated on a snapshot, cached, with old quotes honoured.

A rule is a plain dict (its *snapshot*) so the same function prices the current rule, an old
one from the audit history, and the admin's preview:

- ``flat``: ``price`` per run;
- ``per_second``: the hardware tier's per-second price times ``expected_seconds``;

then ``+ unit_price * input[unit_field]`` when the rule prices by an input (e.g. per requested
output), ``* (1 + markup_percent/100)``, and at least ``minimum``. A free model costs 0; a paid
one never rounds to 0 atomic units (amounts round up).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

from django.core.cache import cache
from django.utils import timezone

FLAT = "flat"
PER_SECOND = "per_second"
CACHE_SECONDS = 300


class PricingError(ValueError):
    pass


def _dec(value: Any) -> Decimal:
    return Decimal(str(value)) if value not in (None, "") else Decimal(0)


def quote(rule: dict[str, Any], inputs: dict[str, Any] | None = None) -> Decimal:
    """Price in USD(C) of one run under ``rule`` for ``inputs``."""
    if rule.get("is_free"):
        return Decimal(0)
    if rule.get("mode") == PER_SECOND:
        price = _dec(rule.get("tier_price_per_second")) * _dec(rule.get("expected_seconds"))
    else:
        price = _dec(rule.get("price"))
    unit_field = rule.get("unit_field")
    if unit_field:
        value = (inputs or {}).get(unit_field, rule.get("unit_default", 1))
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or value < 0:
            raise PricingError(f"`{unit_field}` must be a non-negative integer to price this run")
        price += _dec(rule.get("unit_price")) * Decimal(value)
    price *= 1 + _dec(rule.get("markup_percent")) / 100
    return max(price, _dec(rule.get("minimum")))


def atomic_amount(price: Decimal, decimals: int) -> int:
    """Price in token units, rounded up: a paid price never rounds to zero."""
    return int(price.scaleb(decimals).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class PricingState:
    """A model's current rule and the rules still honoured for challenges already issued."""

    current: dict[str, Any]
    honoured: tuple[dict[str, Any], ...]


def _cache_key(model_id: int) -> str:
    return f"x402:pricing:{model_id}"


def pricing_state(model: Any, honour_seconds: int) -> PricingState:
    """The model's pricing, from the cache (invalidated on every save that can change it)."""
    key = _cache_key(model.pk)
    state = cache.get(key)
    if state is None:
        from .models import PriceChange

        since = timezone.now() - timedelta(seconds=honour_seconds)
        old = PriceChange.objects.filter(model_id=model.pk, changed_at__gte=since).values_list(
            "old_rule", "changed_at"
        )
        state = PricingState(current=model.pricing_rule(), honoured=tuple(rule for rule, _ in old))
        # Expire no later than the oldest honoured quote's window.
        ttl = CACHE_SECONDS
        for _, changed_at in old:
            left = (changed_at + timedelta(seconds=honour_seconds) - timezone.now()).total_seconds()
            ttl = max(1, min(ttl, int(left)))
        cache.set(key, state, ttl)
    return state


def invalidate(model_ids: list[int]) -> None:
    cache.delete_many([_cache_key(pk) for pk in model_ids])
