"""Pricing rules, rounding, audit history, quotes across a price change, admin and roles."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.test import Client

from payments.models import HardwareTier, PriceChange
from payments.options import payment_options
from payments.pricing import PriceRule, PricingError, atomic_amount, honoured_cache
from payments.x402.codec import decode_header
from payments.x402.types import Requirement
from predictions.models import Model
from tests.payers import v2_header

URL = "/v1/models/demo/echo-text/predictions"
D = Decimal


@pytest.mark.parametrize(
    "rule, inputs, expected",
    [
        ({"mode": "flat", "price": "0.01"}, {}, D("0.01")),
        ({"is_free": True, "mode": "flat", "price": "5"}, {}, D(0)),
        (
            {"mode": "per_second", "tier_price_per_second": "0.001400", "expected_seconds": "7.5"},
            {},
            D("0.0105"),
        ),
        ({"mode": "flat", "price": "0.001", "minimum": "0.005"}, {}, D("0.005")),
        ({"mode": "flat", "price": "0.01", "markup_percent": "20"}, {}, D("0.012")),
        (
            {"mode": "flat", "price": "0.01", "unit_field": "num_outputs", "unit_price": "0.02"},
            {"num_outputs": 3},
            D("0.07"),
        ),
        ({"mode": "flat", "price": "0", "unit_field": "n", "unit_price": "0.5"}, {}, D("0.5")),
    ],
)
def test_rules(rule, inputs, expected) -> None:
    parsed = PriceRule.from_snapshot(rule)
    assert parsed.quote(inputs) == expected
    assert PriceRule.from_snapshot(parsed.snapshot()) == parsed  # the history's JSON round-trips


@pytest.mark.parametrize("value", [-1, "3", 1.5, True, 10**5000], ids=["neg", "str", "float", "bool", "huge"])
def test_unit_pricing_refuses_bad_counts(value) -> None:
    with pytest.raises(PricingError):
        PriceRule.from_snapshot({"mode": "flat", "price": "0", "unit_field": "n", "unit_price": "1"}).quote(
            {"n": value}
        )


def test_a_paid_rule_never_quotes_zero() -> None:
    rule = PriceRule.from_snapshot({"mode": "flat", "price": "0", "unit_field": "n", "unit_price": "0.5"})
    with pytest.raises(PricingError):
        rule.quote({"n": 0})
    assert PriceRule(is_free=True).quote({"n": 0}) == 0


def _unit_priced(model, default: int | None) -> None:
    """Price the demo model per ``n`` (0.01 USDC each, nothing flat), ``n`` defaulting to ``default``."""
    version = model.latest_version
    spec: dict = {"type": "integer", "minimum": 0}
    if default is not None:
        spec["default"] = default
    version.input_schema = {**version.input_schema, "properties": {**version.input_schema["properties"], "n": spec}}
    version.save()
    model.price, model.unit_field, model.unit_price = D(0), "n", D("0.01")
    model.save()


@pytest.mark.django_db(transaction=True)
def test_an_omitted_unit_field_is_priced_at_its_schema_default(offline_options, demo_model) -> None:
    """The run gets the schema's default (4 outputs): the price must be for 4, not 1."""
    _unit_priced(demo_model, default=4)
    challenge = Client().post(URL, data={"input": {"text": "x"}}, content_type="application/json")
    assert challenge.status_code == 402
    assert decode_header(challenge["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "40000"
    explicit = Client().post(URL, data={"input": {"text": "x", "n": 2}}, content_type="application/json")
    assert decode_header(explicit["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "20000"


@pytest.mark.django_db(transaction=True)
def test_a_zero_unit_count_never_makes_a_paid_model_free(offline_options, demo_model, eager_celery) -> None:
    """0 outputs on a model priced only per output used to price at 0, and the gate then ran it
    without asking for payment."""
    from predictions.models import Prediction

    _unit_priced(demo_model, default=1)
    response = Client().post(URL, data={"input": {"text": "free?", "n": 0}}, content_type="application/json")
    assert response.status_code == 422, response.content
    assert "n" in response.json()["invalid_fields"]
    assert Prediction.objects.count() == 0


@pytest.mark.parametrize(
    "price, decimals, atomic",
    [
        (D("0.01"), 6, 10_000),
        (D("0.0000001"), 6, 1),
        (D("0.0000011"), 6, 2),
        (D("1.5"), 6, 1_500_000),
        (D("0.0105"), 6, 10_500),
        (D("0.01"), 18, 10**16),
    ],
)
def test_rounding_is_up_and_never_zero_for_a_paid_price(price, decimals, atomic) -> None:
    assert atomic_amount(price, decimals) == atomic


def test_validation_messages(db, demo_model) -> None:
    gpu = HardwareTier.objects.create(slug="gpu-test", name="Test GPU", price_per_second=D("0.001"))
    cases = [
        ({"price": D("-1")}, "price"),
        ({"pricing_mode": "per_second", "hardware": None}, "hardware"),
        ({"price": D(0)}, "price"),
        ({"is_free": True, "hardware": gpu}, "is_free"),
        ({"unit_field": "n", "unit_price": D(0)}, "unit_price"),
    ]
    for changes, field in cases:
        demo_model.refresh_from_db()
        for k, v in changes.items():
            setattr(demo_model, k, v)
        with pytest.raises(ValidationError) as info:
            demo_model.full_clean()
        assert field in info.value.message_dict, (changes, info.value.message_dict)


def _change_form(model, **changes) -> dict:
    data = {
        "owner": model.owner,
        "name": model.name,
        "description": model.description,
        "hardware": model.hardware_id or "",
        "settlement_policy": model.settlement_policy,
        "pricing_mode": model.pricing_mode,
        "price": str(model.price),
        "expected_seconds": str(model.expected_seconds),
        "minimum_price": str(model.minimum_price),
        "markup_percent": str(model.markup_percent),
        "unit_field": model.unit_field,
        "unit_price": str(model.unit_price),
        "upto_order": model.upto_order,
        "upto_failure_charge": model.upto_failure_charge,
        "versions-TOTAL_FORMS": "0",
        "versions-INITIAL_FORMS": "0",
        "price_changes-TOTAL_FORMS": "0",
        "price_changes-INITIAL_FORMS": "0",
    }
    data.update(changes)
    return data


@pytest.mark.django_db(transaction=True)
def test_price_changed_in_admin_shows_in_the_very_next_402(offline_options, demo_model, staff) -> None:
    first = Client().post(URL, data={"input": {"text": "x"}}, content_type="application/json")
    assert decode_header(first["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "10000"
    change_url = f"/admin/predictions/model/{demo_model.pk}/change/"
    response = staff["operator"].post(change_url, data=_change_form(demo_model, price="0.25"))
    assert response.status_code == 302, response.content[:2000]
    second = Client().post(URL, data={"input": {"text": "x"}}, content_type="application/json")
    assert decode_header(second["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "250000"
    change = PriceChange.objects.get()
    assert change.changed_by.username == "olga"
    assert (change.old_price, change.new_price) == (D("0.01"), D("0.25"))
    # The history is visible in admin.
    assert b"0.25" in staff["operator"].get("/admin/payments/pricechange/").content


@pytest.mark.django_db(transaction=True)
def test_who_may_edit_prices_and_see_the_ledger(offline_options, demo_model, staff) -> None:
    change_url = f"/admin/predictions/model/{demo_model.pk}/change/"
    assert staff["operator"].get(change_url).status_code == 200
    assert staff["operator"].get("/admin/payments/hardwaretier/").status_code == 200
    assert staff["operator"].get("/admin/payments/payment/").status_code == 403
    assert staff["operator"].get("/admin/payments/hardwaretier/payment-options/").status_code == 200

    assert staff["finance"].get(change_url).status_code == 403
    assert staff["finance"].post(change_url, data=_change_form(demo_model, price="9")).status_code == 403
    assert staff["finance"].get("/admin/payments/payment/").status_code == 200
    assert staff["finance"].get("/admin/payments/hardwaretier/payment-options/").status_code == 403

    anon = staff["anonymous"].post(change_url, data=_change_form(demo_model, price="9"))
    assert anon.status_code == 302 and "/admin/login/" in anon["Location"]
    demo_model.refresh_from_db()
    assert demo_model.price == D("0.01")


@pytest.mark.django_db(transaction=True)
def test_a_quote_is_honoured_through_its_window_then_refused(
    chain_settings, demo_model, eager_celery
) -> None:
    old_req = Requirement(payment_options()[0], 10_000)
    payer = chain_settings.payers[6]["private_key"]
    demo_model.price = D("0.02")
    demo_model.save()

    # Signed against the challenge issued before the change: honoured.
    ok = Client().post(
        URL,
        data={"input": {"text": "old quote"}},
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": v2_header(payer, old_req)},
    )
    assert ok.status_code == 201, ok.content
    # The challenge itself now asks for the new price.
    fresh = Client().post(URL, data={"input": {"text": "x"}}, content_type="application/json")
    assert decode_header(fresh["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "20000"

    # Once the old challenge's maxTimeoutSeconds has run out, the old price is refused.
    PriceChange.objects.update(changed_at=PriceChange.objects.get().changed_at - timedelta(seconds=400))
    honoured_cache.clear()  # what the end of its window does to this process's copy
    late = Client().post(
        URL,
        data={"input": {"text": "too late"}},
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": v2_header(payer, old_req)},
    )
    assert late.status_code == 402
    assert late.json()["error"] == "invalid_exact_evm_payload_authorization_value_mismatch"
    assert decode_header(late["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "20000"


@pytest.mark.django_db(transaction=True)
def test_the_honoured_rules_a_process_keeps_follow_the_price_version(offline_options, demo_model) -> None:
    """Each process keeps the honoured rules under the model's price_version: a change made
    anywhere is seen at once (nothing to invalidate), the copy lives no longer than its window,
    and a stale copy of the model saved later never takes the version back."""
    from payments.pricing import pricing_state

    stale = Model.objects.get(pk=demo_model.pk)
    assert pricing_state(stale, 330).honoured == ()
    tier = HardwareTier.objects.create(slug="gpu-v", name="GPU V", price_per_second=D("0.001"))
    demo_model.hardware, demo_model.pricing_mode, demo_model.expected_seconds = tier, "per_second", D(10)
    demo_model.save()
    assert demo_model.price_version == 1
    tier.price_per_second = D("0.003")
    tier.save()  # another process's change, as far as ``stale`` knows
    fresh = Model.objects.select_related("hardware").get(pk=demo_model.pk)
    assert fresh.price_version == 2
    state = pricing_state(fresh, 330)
    assert state.current.quote({"text": "x"}) == D("0.03")
    assert sorted(rule.mode for rule in state.honoured) == ["flat", "per_second"]  # both earlier rules
    stale.description = "edited from a page opened before the changes"
    stale.hardware, stale.pricing_mode, stale.expected_seconds = tier, "per_second", D(10)
    stale.save()  # no price change against the row: no new version, and none taken back
    assert Model.objects.get(pk=demo_model.pk).price_version == 2


@pytest.mark.django_db(transaction=True)
def test_tier_price_change_reprices_its_models_and_is_audited(offline_options, demo_model) -> None:
    tier = HardwareTier.objects.create(slug="gpu-x", name="GPU X", price_per_second=D("0.001"))
    demo_model.hardware, demo_model.pricing_mode, demo_model.expected_seconds = tier, "per_second", D(10)
    demo_model.save()
    assert (
        decode_header(
            Client().post(URL, data={"input": {"text": "x"}}, content_type="application/json")[
                "PAYMENT-REQUIRED"
            ]
        )["accepts"][0]["amount"]
        == "10000"
    )
    tier.price_per_second = D("0.002")
    tier.save()
    assert (
        decode_header(
            Client().post(URL, data={"input": {"text": "x"}}, content_type="application/json")[
                "PAYMENT-REQUIRED"
            ]
        )["accepts"][0]["amount"]
        == "20000"
    )
    assert PriceChange.objects.filter(tier=tier).first().new_price == D("0.02")


@pytest.mark.django_db(transaction=True)
def test_models_api_lists_prices_per_option(offline_options, demo_model) -> None:
    listing = Client().get("/v1/models").json()
    [model] = [m for m in listing["results"] if m["name"] == "echo-text"]
    assert model["owner"] == "demo" and model["name"] == "echo-text"
    assert model["pricing"]["price_per_run"] == "0.01"
    assert model["pricing"]["accepts"] == [
        {
            "scheme": "exact",
            "network": "eip155:31337",
            "asset": offline_options.asset,
            "amount": "10000",
            "payTo": offline_options.pay_to,
        }
    ]
    latest = Client().get("/v1/models/demo/echo-text").json()["latest_version"]
    assert latest["openapi_schema"]["components"]["schemas"]["Input"]["required"] == ["text"]
    assert Client().get("/v1/models/demo/none").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_admin_preview_shows_the_exact_challenge(offline_options, demo_model, staff) -> None:
    page = staff["operator"].post(
        f"/admin/predictions/model/{demo_model.pk}/preview/", data={"input": json.dumps({"text": "hi"})}
    )
    assert page.status_code == 200
    assert b"&quot;amount&quot;: &quot;10000&quot;" in page.content
    bad = staff["operator"].post(f"/admin/predictions/model/{demo_model.pk}/preview/", data={"input": "{}"})
    assert b"text" in bad.content and b"errornote" in bad.content


def test_payment_option_checks(chain, settings) -> None:
    from payments.checks import check_assets_on_chain, check_payment_options
    from tests.conftest import option_settings

    good = option_settings(chain)["X402_PAYMENT_OPTIONS"][0]
    settings.X402_PAYMENT_OPTIONS = [good]
    settings.X402_RELAYER_KEY = chain.relayer_private_key
    assert check_payment_options() == [] and check_assets_on_chain() == []

    settings.X402_PAYMENT_OPTIONS = [{**good, "pay_to": "0x" + good["pay_to"][2:].swapcase()}]
    assert [e.id for e in check_payment_options()] == ["payments.E003"]
    settings.X402_PAYMENT_OPTIONS = [{**good, "asset": chain.pay_to}]  # an account, not a contract
    assert [e.id for e in check_assets_on_chain()] == ["payments.E006"]
    settings.X402_PAYMENT_OPTIONS = [{**good, "network": "base"}]
    assert [e.id for e in check_payment_options()] == ["payments.E004"]


@pytest.mark.django_db(transaction=True)
def test_the_run_gets_the_default_it_was_priced_for(chain_settings, demo_model, eager_celery) -> None:
    """Priced at the schema's default, the run must get that default too, not its predictor's own."""
    from predictions.models import ModelVersion

    schema = {
        "type": "object",
        "properties": {"text": {"type": "string"}, "n": {"type": "integer", "minimum": 0, "default": 1}},
        "required": ["text"],
    }
    ModelVersion.objects.create(id="d" * 64, model=demo_model, predictor="tests.predictors.Units", input_schema=schema)
    demo_model.price, demo_model.unit_field, demo_model.unit_price = D(0), "n", D("0.01")
    demo_model.save()
    req = Requirement(payment_options()[0], 10_000)  # one unit, as the schema default says
    created = Client().post(
        URL,
        data={"input": {"text": "x"}},
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": v2_header(chain_settings.payers[5]["private_key"], req)},
    )
    assert created.status_code == 201, created.content
    body = Client().get(f"/v1/predictions/{created.json()['id']}").json()
    assert body["output"] == 1 and body["input"] == {"text": "x", "n": 1}
