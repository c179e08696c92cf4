"""Operable in production: OpenAPI, paywall page, discovery, health, metrics, deploy checks,
and two Celery workers on separate queues against one database and broker."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from django.test import Client, override_settings

from payments.options import payment_options
from payments.x402.codec import decode_header
from payments.x402.types import Requirement
from tests.conftest import free_port, option_settings
from tests.payers import v2_header

pytestmark = [pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parent.parent
URL = "/v1/models/demo/echo-text/predictions"


def test_openapi_documents_the_402_and_the_payment_headers(db) -> None:
    schema = Client().get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    create = schema["paths"]["/v1/models/{owner}/{name}/predictions"]["post"]
    assert {"201", "402", "422", "503"} <= set(create["responses"])
    assert "PAYMENT-REQUIRED" in create["responses"]["402"]["description"]
    headers = {p["name"] for p in create["parameters"] if p["in"] == "header"}
    assert {"PAYMENT-SIGNATURE", "X-PAYMENT", "Prefer", "Cancel-After"} <= headers
    assert "payment" in json.dumps(create["responses"]["201"])
    for path in ("/v1/predictions", "/v1/predictions/{prediction_id}", "/v1/models", "/facilitator/verify"):
        assert path in schema["paths"], path
    docs = Client().get("/docs").content.decode()
    assert "drf_spectacular_sidecar" in docs and "cdn." not in docs  # assets ship with the project
    assert Client().get("/redoc").status_code == 200


def test_browsers_get_a_paywall_page_and_agents_json(chain_settings, demo_model) -> None:
    body = json.dumps({"input": {"text": "hi"}})
    page = Client().post(
        URL,
        data=body,
        content_type="application/json",
        headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
    )
    assert page.status_code == 402 and page["Content-Type"].startswith("text/html")
    html = page.content.decode()
    assert "0.01 USDC" in html and "eip155:31337" in html and "PAYMENT-SIGNATURE" in html
    assert decode_header(page["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "10000"
    agent = Client().post(
        URL, data=body, content_type="application/json", headers={"Accept": "application/json"}
    )
    assert agent.status_code == 402 and agent.json()["x402Version"] == 1
    assert Client().post(URL, data=body, content_type="application/json").json()["x402Version"] == 1


def test_discovery_lists_paid_resources_with_their_prices(chain_settings, demo_model) -> None:
    listing = Client().get("/discovery/resources").json()
    item = next(i for i in listing["items"] if i["resource"].endswith(URL))
    models = {m["name"]: m for m in Client().get("/v1/models").json()["results"]}
    assert item["accepts"][0]["amount"] == models["echo-text"]["pricing"]["accepts"][0]["amount"] == "10000"
    assert item["extensions"]["bazaar"]["info"]["input"]["method"] == "POST"
    assert item["metadata"]["inputSchema"]["required"] == ["text"]
    challenge = decode_header(
        Client().post(URL, data=json.dumps({"input": {"text": "x"}}), content_type="application/json")[
            "PAYMENT-REQUIRED"
        ]
    )
    assert challenge["extensions"]["bazaar"]["info"]["input"]["body"] == {"input": {"text": "hello"}}


def test_readiness_fails_when_the_rpc_is_down(chain, db) -> None:
    with override_settings(**option_settings(chain)):
        ready = Client().get("/readyz")
        assert ready.status_code == 200, ready.json()
        assert ready.json()["checks"]["chain"]["latest_blocks"]["eip155:31337"] > 0
    dead = option_settings(chain, rpc_url=f"http://127.0.0.1:{free_port()}")
    with override_settings(**dead):
        down = Client().get("/readyz")
    assert down.status_code == 503 and down.json()["checks"]["chain"]["ok"] is False
    assert down.json()["checks"]["database"]["ok"] is True
    assert Client().get("/healthz").json() == {"status": "ok"}
    assert Client().get("/healthz")["X-Request-ID"]


def _metric(name: str) -> float:
    for line in Client().get("/metrics").content.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_a_paid_request(chain_settings, demo_model, eager_celery) -> None:
    accepted = 'x402_payments_accepted_total{network="eip155:31337"}'
    before, challenges = _metric(accepted), _metric("x402_challenges_total")
    Client().post(URL, data=json.dumps({"input": {"text": "x"}}), content_type="application/json")
    header = v2_header(chain_settings.payers[0]["private_key"], Requirement(payment_options()[0], 10_000))
    paid = Client().post(
        URL,
        data=json.dumps({"input": {"text": "metered"}}),
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": header},
    )
    assert paid.status_code == 201
    assert _metric(accepted) == before + 1
    assert _metric("x402_challenges_total") == challenges + 1
    text = Client().get("/metrics").content.decode()
    assert 'x402_payments{status="confirmed"}' in text and "x402_settlement_seconds_count" in text
    assert 'x402_prediction_seconds_count{model="demo/echo-text"}' in text


def test_check_deploy_is_clean_with_production_settings(chain) -> None:
    env = {
        **os.environ,
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
        "DJANGO_ALLOWED_HOSTS": "api.example.com",
        "X402_DEVCHAIN_FILE": str(chain.path),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


@pytest.mark.e2e
def test_two_workers_on_separate_queues(chain_settings, demo_model, live_server, tmp_path, settings) -> None:
    """Settlement on one worker, the GPU-tier prediction on another, one database and broker."""
    from payments.models import HardwareTier
    from tests.conftest import TEST_QUEUE, start_worker
    from x402site.celery import app

    gpu_queue = f"{TEST_QUEUE}-gpu"
    routing = {"X402_TIER_QUEUES": f"gpu={gpu_queue}", "X402_PUBLIC_URL": live_server.url}
    settings.X402_TIER_QUEUES = {"gpu": gpu_queue}
    tier = HardwareTier.objects.create(slug="gpu-t4-test", name="T4", price_per_second="0.000225")
    demo_model.hardware = tier
    demo_model.save()
    # Tasks an earlier test on this session's queue left for no worker would be the main
    # worker's to run (a leftover run_prediction among them): this test counts only its own.
    app.control.purge()
    main = start_worker(chain_settings, tmp_path / "main.log", TEST_QUEUE, beat=True, env=routing)
    gpu = start_worker(chain_settings, tmp_path / "gpu.log", gpu_queue, beat=False, env=routing, settlement=False)
    try:
        header = v2_header(chain_settings.payers[1]["private_key"], Requirement(payment_options()[0], 10_000))
        created = requests.post(
            f"{live_server.url}{URL}",
            json={"input": {"text": "routed"}},
            headers={"PAYMENT-SIGNATURE": header},
            timeout=30,
        ).json()
        deadline = time.monotonic() + 30
        body = created
        while body["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            body = requests.get(created["urls"]["get"], timeout=5).json()
    finally:
        from payments.chain import devchain

        devchain.stop(main)
        devchain.stop(gpu)
    assert body["status"] == "succeeded" and body["output"] == "routed"
    main_log, gpu_log = (tmp_path / "main.log").read_text(), (tmp_path / "gpu.log").read_text()
    assert "Task payments.tasks.settle_batches[" in main_log
    assert "Task predictions.tasks.run_prediction[" not in main_log
    assert "Task predictions.tasks.run_prediction[" in gpu_log
    assert "Task payments.tasks." not in gpu_log


def test_a_browser_opening_the_endpoint_gets_the_paywall(chain_settings, demo_model) -> None:
    page = Client().get(URL, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 402 and b"0.01 USDC" in page.content and page["PAYMENT-REQUIRED"]
    assert Client().get(URL, headers={"Accept": "application/json"}).status_code == 405


def test_models_and_migrations_agree() -> None:
    """Every model change has its migration (a missing one would fail the deploy's migrate)."""
    from io import StringIO

    from django.core.management import call_command

    call_command("makemigrations", "--check", "--dry-run", stdout=StringIO())
