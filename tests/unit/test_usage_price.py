"""The pay-per-second (upto) price: maximum, charge by the second, failure charge, rounding."""

from decimal import Decimal as D

import pytest

from payments.pricing import (
    FAILURE_CHARGES_MINIMUM,
    FAILURE_CHARGES_NOTHING,
    PER_SECOND,
    PriceRule,
    PricingError,
    UsagePrice,
    atomic_amount,
    usage_price,
)

RULE = PriceRule(mode=PER_SECOND, tier_price_per_second=D("0.0014"), expected_seconds=D(5))


def test_the_maximum_is_the_time_limits_price() -> None:
    usage = usage_price(RULE, 10, {}, FAILURE_CHARGES_NOTHING)
    assert usage is not None and usage.maximum == D("0.0140") and usage.per_second == D("0.0014")
    assert atomic_amount(usage.maximum, 6) == 14_000


def test_the_charge_is_the_seconds_price_rounded_up_and_capped() -> None:
    usage = usage_price(RULE, 10, {}, FAILURE_CHARGES_NOTHING)
    assert atomic_amount(usage.charge(D("2.014")), 6) == 2_820  # 2819.6 rounds up
    assert usage.charge(D(25)) == usage.maximum  # never above the maximum
    assert usage.charge(D(-1)) == 0


def test_markup_minimum_and_units_apply() -> None:
    rule = PriceRule(
        mode=PER_SECOND,
        tier_price_per_second=D("0.001"),
        markup_percent=D(50),
        minimum=D("0.002"),
        unit_field="n",
        unit_price=D("0.01"),
    )
    usage = usage_price(rule, 10, {"n": 2}, FAILURE_CHARGES_MINIMUM)
    assert usage.per_second == D("0.0015") and usage.fixed == D("0.030")
    assert usage.maximum == D("0.045")
    assert usage.charge(D(0)) == D("0.030")
    assert usage.failure_charge() == D("0.002")


def test_failure_charges_nothing_by_default() -> None:
    assert usage_price(RULE, 10, {}, FAILURE_CHARGES_NOTHING).failure_charge() == 0


def test_flat_and_free_rules_have_no_usage_price() -> None:
    assert usage_price(PriceRule(price=D(1)), 10, {}, FAILURE_CHARGES_NOTHING) is None
    assert usage_price(PriceRule(is_free=True, mode=PER_SECOND), 10, {}, FAILURE_CHARGES_NOTHING) is None


def test_a_usage_price_that_is_always_zero_is_refused() -> None:
    with pytest.raises(PricingError):
        usage_price(PriceRule(mode=PER_SECOND), 10, {}, FAILURE_CHARGES_NOTHING)


def test_the_snapshot_round_trips() -> None:
    usage = usage_price(RULE, 10, {}, FAILURE_CHARGES_MINIMUM)
    assert UsagePrice.from_snapshot(usage.snapshot()) == usage


# --- What a run is charged (payments.ledger.usage_charge) ------------------------------------------

PER_SECOND_A100_MARKED_UP = UsagePrice(D("0.01464"), D(0), D(0), D("0.1464"), FAILURE_CHARGES_MINIMUM)


@pytest.mark.parametrize(
    "seconds, atomic",
    [
        (D("2.0005"), 29_288),  # 29,287.32 rounded up once (not 2.000 s x price = 29,280)
        (D("2.0015"), 29_302),  # 29,301.96 (not 2.002 s x price = 29,309.28 -> 29,310)
        (D("2.000512345"), 29_288),  # 29,287.5007... to the nanosecond
    ],
)
def test_the_charge_is_the_exact_product_rounded_up_once(seconds, atomic) -> None:
    from payments.ledger import RunEnd, usage_charge

    charge = usage_charge(PER_SECOND_A100_MARKED_UP, seconds, RunEnd.SUCCEEDED, maximum=146_400, decimals=6)
    assert charge == atomic


def test_a_run_stopped_at_its_limit_or_by_the_payer_is_charged_its_seconds_not_the_failure_charge() -> None:
    from payments.ledger import RunEnd, usage_charge

    price = UsagePrice(D("0.0014"), D(0), D("0.001"), D("0.014"), FAILURE_CHARGES_MINIMUM)
    # Past the 10 s limit: the whole maximum, never more.
    assert usage_charge(price, D("10.02"), RunEnd.STOPPED, maximum=14_000, decimals=6) == 14_000
    assert usage_charge(price, D("4.5"), RunEnd.STOPPED, maximum=14_000, decimals=6) == 6_300
    # Failed on our side: the policy (here the minimum), whatever the seconds.
    assert usage_charge(price, D("10.02"), RunEnd.FAILED, maximum=14_000, decimals=6) == 1_000
    nothing = UsagePrice(D("0.0014"), D(0), D(0), D("0.014"), FAILURE_CHARGES_NOTHING)
    assert usage_charge(nothing, D("9"), RunEnd.FAILED, maximum=14_000, decimals=6) == 0
    assert usage_charge(nothing, D("9"), RunEnd.STOPPED, maximum=14_000, decimals=6) == 12_600
    # A success is never free; a stop at 0 s may be (nothing ran).
    assert usage_charge(nothing, D(0), RunEnd.SUCCEEDED, maximum=14_000, decimals=6) == 1
    assert usage_charge(nothing, D(0), RunEnd.STOPPED, maximum=14_000, decimals=6) == 0
