"""An operator adds a model from the command line (docs/deploy.md), the path the demo seed takes."""

from __future__ import annotations

import importlib
import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from predictions.models import Model

pytestmark = pytest.mark.django_db

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


@pytest.fixture(autouse=True)
def seeded_tiers(db: None) -> None:
    """The hardware tiers the migrations seed (add_model refuses an unknown tier): a
    transactional test run earlier in the same process flushed them."""
    from django.apps import apps

    importlib.import_module("payments.migrations.0003_seed_hardware_tiers").seed(apps, None)


def add(*args: str) -> str:
    out = StringIO()
    call_command("add_model", *args, stdout=out)
    return out.getvalue()


def test_add_model_publishes_a_priced_model_whose_402_carries_the_price(offline_options) -> None:
    said = add(
        "acme/echo",
        "--predictor",
        "predictions.runners.demo.EchoText",
        "--input-schema",
        json.dumps(SCHEMA),
        "--output-schema",
        '{"type": "string"}',
        "--price",
        "0.25",
    )
    assert "acme/echo at 0.25 USDC per run" in said
    model = Model.objects.get(owner="acme", name="echo")
    assert model.versions.count() == 1 and model.hardware.slug == "cpu"
    challenge = Client().post(
        "/v1/models/acme/echo/predictions", data={"input": {"text": "x"}}, content_type="application/json"
    )
    assert challenge.status_code == 402
    assert challenge.json()["accepts"][0]["maxAmountRequired"] == "250000"
    # Again with a new price and the same version: updated in place, no second version.
    add(
        "acme/echo",
        "--predictor",
        "predictions.runners.demo.EchoText",
        "--input-schema",
        json.dumps(SCHEMA),
        "--output-schema",
        '{"type": "string"}',
        "--price",
        "0.5",
    )
    model.refresh_from_db()
    assert model.price_per_run == 0.5 and model.versions.count() == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["acme", "--predictor", "x.Y", "--input-schema", "{}", "--price", "1"], "owner/name"),
        (["acme/x", "--predictor", "x.Y", "--price", "1"], "input schema"),
        (
            ["acme/x", "--predictor", "x.Y", "--input-schema", "[1]", "--price", "1"],
            "JSON Schema is an object",
        ),
        (["acme/x", "--predictor", "x.Y", "--input-schema", "{", "--price", "1"], "not JSON"),
        (["acme/x", "--predictor", "x.Y", "--input-schema", "{}", "--price", "cheap"], "not a price"),
        (
            ["acme/x", "--predictor", "x.Y", "--input-schema", "{}", "--price", "1", "--hardware", "tpu"],
            "no hardware tier",
        ),
        (["acme/x", "--cog-url", "http://127.0.0.1:9", "--price", "1"], "cannot reach http://127.0.0.1:9"),
    ],
)
def test_add_model_refuses_what_it_cannot_publish(args: list[str], says: str) -> None:
    with pytest.raises(CommandError, match=says):
        add(*args)
    assert not Model.objects.filter(owner="acme").exists()
