"""The Cog runner against a real Cog server (cog + coglet), paid end to end."""

from __future__ import annotations

import time

import pytest
import requests

from predictions.models import Model, ModelVersion, Prediction
from predictions.runners import cog
from tests.conftest import free_port, poll_until_done, token_balance
from tests.payers import v2_header_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PRICE = 10_000
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "seconds": {"type": "number", "minimum": 0, "maximum": 30}},
    "required": ["text"],
    "additionalProperties": False,
}


def shout_model(cog_url: str) -> Model:
    model = Model.objects.create(owner="demo", name="shout", price="0.01")
    ModelVersion.objects.create(id="c" * 64, model=model, runner="cog", cog_url=cog_url, input_schema=SCHEMA)
    cog._health.clear()
    return model


def pay(chain, payer: int, url: str, body: dict, **headers) -> requests.Response:
    """Ask for the challenge, then pay it as the official clients do."""
    challenge = requests.post(url, json=body, headers=headers, timeout=30)
    assert challenge.status_code == 402, challenge.text
    header = v2_header_for(chain.payers[payer]["private_key"], challenge.headers["PAYMENT-REQUIRED"])
    return requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": header, **headers}, timeout=30)


def test_paid_prediction_runs_on_the_cog_server(
    chain_settings, cog_server, live_server, celery_worker_process
) -> None:
    shout_model(cog_server["url"])
    payer = chain_settings.payers[0]
    before = token_balance(chain_settings, payer["address"])
    url = f"{live_server.url}/v1/models/demo/shout/predictions"
    created = pay(chain_settings, 0, url, {"input": {"text": "hello cog"}})
    assert created.status_code == 201, created.text
    done = poll_until_done(created.json()["urls"]["get"])
    assert done["status"] == "succeeded" and done["output"] == "HELLO COG", done
    assert "shouting 'hello cog'" in done["logs"]
    assert done["metrics"]["predict_time"] >= 0
    assert token_balance(chain_settings, payer["address"]) == before - PRICE


def test_cog_down_or_bad_input_is_refused_before_any_payment(chain_settings, live_server) -> None:
    shout_model(f"http://127.0.0.1:{free_port()}")
    url = f"{live_server.url}/v1/models/demo/shout/predictions"
    down = requests.post(url, json={"input": {"text": "x"}}, timeout=10)
    assert down.status_code == 503 and "PAYMENT-REQUIRED" not in down.headers
    assert "unreachable" in down.json()["detail"]
    bad = requests.post(url, json={"input": {"text": "x", "seconds": "long"}}, timeout=10)
    assert bad.status_code == 422 and "seconds" in bad.json()["invalid_fields"]


def test_cancel_during_a_cog_run_is_final_and_free(
    chain_settings, cog_server, live_server, celery_worker_process
) -> None:
    model = shout_model(cog_server["url"])
    model.settlement_policy = "after_success"  # canceled mid-run: not charged
    model.save()
    payer = chain_settings.payers[1]
    before = token_balance(chain_settings, payer["address"])
    url = f"{live_server.url}/v1/models/demo/shout/predictions"
    created = pay(chain_settings, 1, url, {"input": {"text": "slow", "seconds": 4}}).json()
    deadline = time.monotonic() + 15
    while Prediction.objects.get(pk=created["id"]).status != "processing" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the PUT reached Cog
    canceled = requests.post(created["urls"]["cancel"], timeout=10).json()
    assert canceled["status"] == "canceled"
    time.sleep(0.5)
    cog_log = cog_server["log"].read_text().splitlines()
    assert any("Cancelling prediction" in line and created["id"] in line for line in cog_log)  # Cog was told
    # A sync predictor finishes its sleep anyway; its late "succeeded" must change nothing.
    deadline = time.monotonic() + 15
    while requests.get(f"{cog_server['url']}/health-check", timeout=5).json()["status"] != "READY":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)
    final = requests.get(created["urls"]["get"], timeout=5).json()
    assert final["status"] == "canceled" and final["output"] is None
    assert final["payment"]["status"] == "lapsing"  # released unsettled; expires once it lapses
    assert token_balance(chain_settings, payer["address"]) == before
