"""The X402_* settings as one typed, namespaced object (x402site.conf): its values are typed,
grouped, follow an override at once and come back after it, and a bad value is refused by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from x402site.conf import NAMESPACES, RateLimit, RunSettings, build, x402


def test_every_x402_setting_is_read_into_a_namespace() -> None:
    built = build()
    assert {f.name for f in dataclasses.fields(built)} == NAMESPACES
    read = sum(len(dataclasses.fields(getattr(built, n))) for n in NAMESPACES)
    flat = {n for n in dir(settings) if n.startswith("X402_")}
    assert read == len(flat)  # one field per flat setting (the rate limits: one field of three)


def test_values_are_typed_and_grouped() -> None:
    assert isinstance(x402.runs, RunSettings)
    assert isinstance(x402.runs.time_limit_seconds, int)
    assert isinstance(x402.settlement.batch, bool)
    assert isinstance(x402.settlement.batch_max_age_seconds, float)
    assert isinstance(x402.chain.devchain_file, Path) and isinstance(x402.finance.export_dir, Path)
    assert isinstance(x402.tokens.operator, tuple)
    assert x402.http.rate_limits.challenge == RateLimit(600, 60)
    with pytest.raises(dataclasses.FrozenInstanceError):
        x402.runs.time_limit_seconds = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        _ = x402.nothing  # type: ignore[attr-defined]


def test_secrets_stay_out_of_the_repr() -> None:
    with override_settings(X402_REFUND_KEY="0x" + "ab" * 32, X402_WEBHOOK_SECRET="whsec_hidden"):
        assert "ab" * 32 not in repr(x402.refunds) and "hidden" not in repr(x402.webhooks)


def test_a_read_is_an_attribute_of_the_object_built_once() -> None:
    first = x402.runs
    assert x402.runs is first and x402.__dict__["runs"] is first


def test_an_override_changes_the_object_at_once_and_its_end_restores_it() -> None:
    before = x402.runs.time_limit_seconds
    with override_settings(X402_PREDICTION_TIME_LIMIT=before + 7, X402_RATE_LIMITS={"challenge": "3/10"}):
        assert x402.runs.time_limit_seconds == before + 7
        assert x402.http.rate_limits.challenge == RateLimit(3, 10)
        assert x402.http.rate_limits.failed is None  # a kind left out: no limit
    assert x402.runs.time_limit_seconds == before
    assert x402.http.rate_limits.challenge == RateLimit(600, 60)


def test_the_settings_fixture_changes_it_too(settings) -> None:  # type: ignore[no-untyped-def]
    settings.X402_TIER_QUEUES = {"gpu": "gpu-queue"}
    assert dict(x402.runs.tier_queues) == {"gpu": "gpu-queue"}


@pytest.mark.parametrize(
    ("name", "value", "refused"),
    [
        ("X402_BATCH_MAX", "many", "X402_BATCH_MAX must be an integer, not 'many'"),
        ("X402_BATCH_MAX", 0, "X402_BATCH_MAX must be at least 1, not 0"),
        ("X402_BATCH_SETTLEMENT", "false", "X402_BATCH_SETTLEMENT must be true or false, not 'false'"),
        ("X402_PREDICTION_TIME_LIMIT", True, "X402_PREDICTION_TIME_LIMIT must be an integer"),
        ("X402_OPS_TOKENS", "one-token", "X402_OPS_TOKENS must be a list of strings"),
        ("X402_RATE_LIMITS", {"challenge": "fast"}, "X402_RATE_LIMITS['challenge'] must be \"count/seconds\""),
        ("X402_RATE_LIMITS", {"challenges": "1/60"}, "X402_RATE_LIMITS must be a mapping with keys among"),
        ("X402_PAYMENT_OPTIONS", "base", "X402_PAYMENT_OPTIONS must be a list of payment options"),
    ],
)
def test_a_bad_value_is_refused_by_name(name: str, value: object, refused: str) -> None:
    with override_settings(**{name: value}), pytest.raises(ImproperlyConfigured) as error:
        _ = x402.settlement
    assert refused in str(error.value)
    assert x402.settlement.batch_max >= 1  # the override over, the settings read again
