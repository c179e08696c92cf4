"""What one run costs: typed pricing rules, with old quotes honoured.

A :class:`PriceRule` is a frozen value. The same rule prices the current model, an old one from
the audit history (``PriceChange`` keeps rules as JSON snapshots) and the admin's preview:

- ``flat``: ``price`` per run;
- ``per_second``: the hardware tier's per-second price times ``expected_seconds``;

then ``+ unit_price * input[unit_field]`` when the rule prices by an input (e.g. per requested
output), ``* (1 + markup_percent/100)``, and at least ``minimum``. A per-second rule can also be
paid by usage (the x402 ``upto`` scheme, :class:`UsagePrice`): the payer permits a maximum (the
price of the model's whole time limit) and is charged for the seconds the run took. The caller prices the input
the run will get (schema defaults filled in). A free model costs 0; a paid one never costs 0
(a quote of 0 is refused as a PricingError, never run unpaid) and never rounds to 0 atomic
units (amounts round up).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from django.utils import timezone

FLAT = "flat"
PER_SECOND = "per_second"
#: How long a process keeps a model's honoured rules at most (sooner when one's window ends).
CACHE_SECONDS = 300
#: Models whose honoured rules a process keeps (least recently used dropped first).
CACHE_MODELS = 1024
#: The largest unit count a request may ask for (a bound on what a hostile input can make us price).
MAX_UNITS = 10**6
_DECIMALS = ("price", "tier_price_per_second", "expected_seconds", "minimum", "markup_percent", "unit_price")


class PricingError(ValueError):
    pass


def _dec(value: Any) -> Decimal:
    try:
        return Decimal(str(value)) if value not in (None, "") else Decimal(0)
    except InvalidOperation:
        raise PricingError(f"not a number: {value!r}") from None


@dataclass(frozen=True, slots=True)
class PriceRule:
    """How one model is priced; see the module docstring for the formula."""

    is_free: bool = False
    mode: str = FLAT
    price: Decimal = Decimal(0)
    tier: str | None = None
    tier_price_per_second: Decimal = Decimal(0)
    expected_seconds: Decimal = Decimal(1)
    minimum: Decimal = Decimal(0)
    markup_percent: Decimal = Decimal(0)
    unit_field: str = ""
    unit_price: Decimal = Decimal(0)

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> PriceRule:
        """A rule from its JSON snapshot (as stored in the price history); unknown keys ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in _DECIMALS:
            if name in values:
                values[name] = _dec(values[name])
        return cls(**values)

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe form, for the price history."""
        return {k: str(v) if isinstance(v, Decimal) else v for k, v in asdict(self).items()}

    def units(self, inputs: dict[str, Any]) -> int:
        """The count the unit field asks for (1 when the input and its schema say nothing)."""
        value = inputs.get(self.unit_field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_UNITS:
            raise PricingError(f"`{self.unit_field}` must be an integer from 0 to {MAX_UNITS} to price this run")
        return value

    def quote(self, inputs: dict[str, Any] | None = None) -> Decimal:
        """Price in USD(C) of one run on ``inputs``; a paid rule that comes to 0 is a PricingError."""
        if self.is_free:
            return Decimal(0)
        price = self.tier_price_per_second * self.expected_seconds if self.mode == PER_SECOND else self.price
        if self.unit_field:
            price += self.unit_price * self.units(inputs or {})
        price *= 1 + self.markup_percent / 100
        price = max(price, self.minimum)
        if price <= 0:
            field = f"`{self.unit_field}`" if self.unit_field else "this input"
            raise PricingError(f"{field} would make this paid run cost nothing; ask for at least one unit")
        return price


#: What a usage-priced run that failed (or was canceled once running) is charged.
FAILURE_CHARGES_NOTHING = "nothing"
FAILURE_CHARGES_MINIMUM = "minimum"


@dataclass(frozen=True, slots=True)
class UsagePrice:
    """A per-second price paid by usage (``upto``): kept with the payment it prices, so that a
    price change during a run changes nothing about its charge.

    ``charge(seconds) = min(maximum, max(minimum, per_second * seconds + fixed))``; ``maximum``
    is that formula for the model's time limit, the most a run can cost. A run that failed is
    charged ``minimum`` or nothing, per ``on_failure``.
    """

    per_second: Decimal
    fixed: Decimal
    minimum: Decimal
    maximum: Decimal
    on_failure: str = FAILURE_CHARGES_NOTHING

    def charge(self, seconds: Decimal) -> Decimal:
        return min(self.maximum, max(self.minimum, self.per_second * max(seconds, Decimal(0)) + self.fixed))

    def failure_charge(self) -> Decimal:
        return self.minimum if self.on_failure == FAILURE_CHARGES_MINIMUM else Decimal(0)

    def charge_atomic(self, seconds: Decimal, decimals: int) -> int:
        """The seconds' charge in atomic units: the exact product, rounded up once (never the
        seconds rounded first: 2.0005 s at 0.01464/s is 29,287.32 units, charged 29,288)."""
        return atomic_amount(self.charge(seconds), decimals)

    def snapshot(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> UsagePrice:
        return cls(
            per_second=_dec(data["per_second"]),
            fixed=_dec(data["fixed"]),
            minimum=_dec(data["minimum"]),
            maximum=_dec(data["maximum"]),
            on_failure=str(data.get("on_failure", FAILURE_CHARGES_NOTHING)),
        )


def usage_price(rule: PriceRule, time_limit_seconds: int, inputs: dict[str, Any], on_failure: str) -> UsagePrice | None:
    """The usage price of a paid per-second rule (None for a free or flat one): the tier's price
    per second and any per-unit part, both marked up; the maximum is the time limit's price."""
    if rule.is_free or rule.mode != PER_SECOND:
        return None
    factor = 1 + rule.markup_percent / 100
    per_second = rule.tier_price_per_second * factor
    fixed = rule.unit_price * rule.units(inputs) * factor if rule.unit_field else Decimal(0)
    maximum = max(rule.minimum, per_second * time_limit_seconds + fixed)
    if maximum <= 0:
        raise PricingError("this per-second model would cost nothing even for its whole time limit")
    return UsagePrice(per_second, fixed, rule.minimum, maximum, on_failure)


def atomic_amount(price: Decimal, decimals: int) -> int:
    """Price in token units, rounded up: a paid price never rounds to zero."""
    return int(price.scaleb(decimals).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class PricingState:
    """A model's current rule and the rules still honoured for challenges already issued."""

    current: PriceRule
    honoured: tuple[PriceRule, ...]


class _HonouredCache:
    """Each process's copy of the rules still honoured per model, keyed by the model's
    ``price_version`` (bumped in the same transaction as every price change): the model row the
    request already read says whether the copy is current, so the hot path asks neither Redis
    nor the database, and a change is seen by every process as soon as it commits."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[int, int, int], tuple[float, tuple[PriceRule, ...]]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[int, int, int]) -> tuple[PriceRule, ...] | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry[0] <= time.monotonic():
                return None
            self.entries.move_to_end(key)
            return entry[1]

    def put(self, key: tuple[int, int, int], rules: tuple[PriceRule, ...], ttl: float) -> None:
        with self.lock:
            self.entries[key] = (time.monotonic() + ttl, rules)
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


honoured_cache = _HonouredCache(CACHE_MODELS)


def pricing_state(model: Any, honour_seconds: int) -> PricingState:
    """The model's pricing: its current rule from the row itself (with its hardware tier,
    selected with it), and the rules still honoured for challenges issued within
    ``honour_seconds``, from this process's cache (:class:`_HonouredCache`)."""
    key = (model.pk, model.price_version, honour_seconds)
    honoured = honoured_cache.get(key)
    if honoured is None:
        since = timezone.now() - timedelta(seconds=honour_seconds)
        old = list(model.price_changes.filter(changed_at__gte=since).values_list("old_rule", "changed_at"))
        honoured = tuple(PriceRule.from_snapshot(rule) for rule, _ in old)
        # Kept no longer than the oldest honoured quote's window.
        ttl = float(CACHE_SECONDS)
        for _, changed_at in old:
            left = (changed_at + timedelta(seconds=honour_seconds) - timezone.now()).total_seconds()
            ttl = max(0.0, min(ttl, left))
        honoured_cache.put(key, honoured, ttl)
    return PricingState(current=model.pricing_rule(), honoured=honoured)
