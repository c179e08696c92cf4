"""The Replicate-compatible API: list, cancel, Prefer: wait, Cancel-After, webhooks, the
official replicate client (operator token, and an agent paying through an httpx transport)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.test import Client, override_settings
from django.utils import timezone
from eth_account import Account

from payments.models import Payment
from payments.options import payment_options
from payments.x402.types import Requirement
from predictions.models import Prediction
from predictions.webhooks import sign
from tests.conftest import token_balance
from tests.payers import v2_header, v2_header_for
from tests.receiver import Receiver
from tests.siwx import siwx_header

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

pytestmark = [pytest.mark.django_db(transaction=True)]
URL = "/v1/models/demo/echo-text/predictions"
PRICE = 10_000
TOKEN = "operator-test-token"


def post(body: dict, **headers: str):
    return Client().post(URL, data=json.dumps(body), content_type="application/json", headers=headers)


def paid(chain, payer: int, body: dict, **headers: str):
    """Ask for the challenge, then pay it as the official clients do."""
    challenge = post(body, **headers)
    assert challenge.status_code == 402, challenge.content
    key = chain.payers[payer]["private_key"]
    return post(body, **{"PAYMENT-SIGNATURE": v2_header_for(key, challenge["PAYMENT-REQUIRED"]), **headers})


@pytest.fixture
def no_tasks(monkeypatch):
    """Record predictions without settling or running them."""
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)


def payer_headers(key: str, origin: str = "http://127.0.0.1:8000", **overrides) -> dict[str, str]:
    """A sign-in-with-x proof for ``origin`` (X402_PUBLIC_URL's default)."""
    return {"SIGN-IN-WITH-X": siwx_header(key, origin, **overrides)}


def test_list_by_operator_token_or_payer_proof(chain_settings, demo_model, no_tasks, settings) -> None:
    settings.X402_OPERATOR_TOKENS = [TOKEN]
    mine = [paid(chain_settings, 0, {"input": {"text": f"a{i}"}}).json()["id"] for i in range(3)]
    theirs = paid(chain_settings, 1, {"input": {"text": "b"}}).json()["id"]
    challenge = Client().get("/v1/predictions")
    assert challenge.status_code == 401
    info = challenge.json()["extensions"]["sign-in-with-x"]["info"]
    assert info["domain"] == "127.0.0.1:8000" and len(info["nonce"]) >= 16
    key = chain_settings.payers[0]["private_key"]
    listed = Client().get("/v1/predictions", headers=payer_headers(key, nonce=info["nonce"])).json()
    assert [p["id"] for p in listed["results"]] == mine[::-1]
    assert listed["next"] is None
    stale = payer_headers(key, issued_at=datetime.now(UTC) - timedelta(hours=1))
    assert Client().get("/v1/predictions", headers=stale).status_code == 403
    forged = payer_headers(chain_settings.payers[1]["private_key"], address=Account.from_key(key).address)
    assert Client().get("/v1/predictions", headers=forged).status_code == 403
    everything = Client().get("/v1/predictions", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert {p["id"] for p in everything["results"]} == {*mine, theirs}


def test_cancel_before_the_run_releases_the_payment(chain_settings, demo_model, no_tasks) -> None:
    created = paid(chain_settings, 2, {"input": {"text": "never"}}).json()
    canceled = Client().post(created["urls"]["cancel"].replace("http://testserver", "")).json()
    assert canceled["status"] == "canceled" and canceled["payment"]["status"] == "lapsing"  # released
    from predictions.tasks import run_prediction

    assert run_prediction(created["id"]) == "skipped"  # a late task runs nothing
    again = Client().post(f"/v1/predictions/{created['id']}/cancel").json()
    assert again["status"] == "canceled"
    assert Client().post("/v1/predictions/nope/cancel").status_code == 404


def test_cancel_after_aborts_a_prediction_that_has_not_started(chain_settings, demo_model, no_tasks) -> None:
    created = paid(chain_settings, 3, {"input": {"text": "late"}}, **{"Cancel-After": "1ms"}).json()
    time.sleep(0.01)
    from predictions.tasks import run_prediction

    run_prediction(created["id"])
    aborted = Client().get(f"/v1/predictions/{created['id']}").json()
    assert aborted["status"] == "aborted" and aborted["error"].startswith("aborted")
    assert Payment.objects.get().status == "lapsing"  # released: not charged
    assert post({"input": {"text": "x"}}, **{"Cancel-After": "soon"}).status_code == 400


def test_sweep_fails_a_run_whose_worker_died(chain_settings, demo_model, no_tasks, settings) -> None:
    demo_model.settlement_policy = "after_success"
    demo_model.save()
    created = paid(chain_settings, 4, {"input": {"text": "lost"}}).json()
    from predictions import lifecycle
    from predictions.tasks import sweep

    assert lifecycle.claim(created["id"]) is not None  # claimed; its worker then dies
    limit = Prediction.objects.get(pk=created["id"]).time_limit_seconds
    Prediction.objects.filter(pk=created["id"]).update(
        started_at=timezone.now() - timedelta(seconds=limit + settings.X402_PREDICTION_LOST_GRACE + 1)
    )

    assert sweep()["lost"] == 1
    body = Client().get(f"/v1/predictions/{created['id']}").json()
    assert body["status"] == "failed" and "lost" in body["error"]
    assert body["payment"]["status"] == "lapsing"  # after_success: no success, released


def test_one_prediction_whose_end_fails_does_not_stall_the_sweep(
    chain_settings, demo_model, no_tasks, settings, monkeypatch
) -> None:
    """Two lost runs; giving up on the first raises (a bug, a database hiccup): the second is
    still given up on, and the first is left for the next pass."""
    from predictions import lifecycle
    from predictions.tasks import sweep

    demo_model.settlement_policy = "after_success"
    demo_model.save()
    ids = [paid(chain_settings, 4 + i, {"input": {"text": f"lost {i}"}}).json()["id"] for i in range(2)]
    for pk in ids:
        assert lifecycle.claim(pk) is not None
    limit = Prediction.objects.get(pk=ids[0]).time_limit_seconds
    Prediction.objects.filter(pk__in=ids).update(
        started_at=timezone.now() - timedelta(seconds=limit + settings.X402_PREDICTION_LOST_GRACE + 1)
    )
    real = {name: getattr(lifecycle, name) for name in ("fail_overdue", "fail_unstarted")}

    def flaky(name: str) -> Callable[..., int]:
        def step(prediction_id: str, **kwargs: object) -> int:
            if prediction_id == ids[0]:
                raise RuntimeError("boom")
            return real[name](prediction_id, **kwargs)

        return step

    for name in real:
        monkeypatch.setattr(lifecycle, name, flaky(name))
    assert sweep()["lost"] == 1
    assert [Prediction.objects.get(pk=pk).status for pk in ids] == ["processing", "failed"]
    for name, step in real.items():
        monkeypatch.setattr(lifecycle, name, step)
    assert sweep()["lost"] == 1  # the next pass gives up on the first
    assert Prediction.objects.get(pk=ids[0]).status == "failed"


@pytest.mark.parametrize(
    "hook",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/x",
        "http://10.1.2.3/",
        "http://[::1]/",
        "ftp://example.com/",
        "http://169.254.169.254/latest",
        "http://user:pw@example.com/",
    ],
)
def test_webhooks_to_private_addresses_are_refused_before_payment(chain_settings, demo_model, hook) -> None:
    response = post({"input": {"text": "x"}, "webhook": hook})
    assert response.status_code == 422 and "webhook" in response.json()["invalid_fields"]
    assert "PAYMENT-REQUIRED" not in response


def test_webhooks_are_signed_filtered_and_retried(chain_settings, demo_model, eager_celery, settings) -> None:
    from x402site.celery import app

    app.conf.task_eager_propagates = False  # an eager retry runs at once, then raises Retry
    settings.X402_WEBHOOK_ALLOW_PRIVATE = True
    settings.X402_OPERATOR_TOKENS = [TOKEN]
    receiver = Receiver(fail_first=1)
    created = paid(chain_settings, 5, {"input": {"text": "hooked"}, "webhook": receiver.url})
    assert created.status_code == 201
    secret = (
        Client()
        .get("/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {TOKEN}"})
        .json()["key"]
    )
    assert Client().get("/v1/webhooks/default/secret").status_code == 401
    assert [body["status"] for _, body in receiver.events] == ["processing", "succeeded", "succeeded"]
    for headers, body in receiver.events:
        expected = sign(
            headers["webhook-id"], int(headers["webhook-timestamp"]), body["_raw"].encode(), secret
        )
        assert headers["webhook-signature"] == expected
    assert receiver.events[-1][1]["output"] == "hooked"

    only_completed = Receiver()
    paid(
        chain_settings,
        5,
        {
            "input": {"text": "filtered"},
            "webhook": only_completed.url,
            "webhook_events_filter": ["completed"],
        },
    )
    assert [body["status"] for _, body in only_completed.events] == ["succeeded"]
    with override_settings(X402_WEBHOOK_ALLOW_PRIVATE=False):
        assert post({"input": {"text": "x"}, "webhook_events_filter": ["bogus"]}).status_code == 422


@pytest.mark.e2e
def test_prefer_wait_and_the_official_replicate_client(
    chain_settings, demo_model, live_server, celery_worker_process, settings
) -> None:
    import replicate
    import requests
    from replicate_agent import agent_client

    settings.X402_OPERATOR_TOKENS = [TOKEN]
    chain = chain_settings
    # Prefer: wait holds the create until the prediction finished.
    header = v2_header(chain.payers[6]["private_key"], Requirement(payment_options()[0], PRICE))
    waited = requests.post(
        f"{live_server.url}{URL}",
        json={"input": {"text": "waited"}},
        headers={"PAYMENT-SIGNATURE": header, "Prefer": "wait=20"},
        timeout=30,
    ).json()
    assert waited["status"] == "succeeded" and waited["output"] == "waited"

    # An operator, with an API token.
    operator = replicate.Client(api_token=TOKEN, base_url=live_server.url)
    prediction = operator.models.predictions.create(model="demo/echo-text", input={"text": "op"})
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.output == "op"
    assert operator.predictions.get(prediction.id).output == "op"
    by_version = operator.predictions.create(version=demo_model.latest_version.id, input={"text": "v"})
    assert operator.predictions.get(by_version.id).id == by_version.id
    listed = [p.id for p in operator.predictions.list()]
    assert prediction.id in listed and waited["id"] in listed
    by_version.wait()
    assert operator.predictions.cancel(by_version.id).status == "succeeded"  # finished: cancel is a no-op

    # An agent, paying each challenge through the transport.
    payer = chain.payers[7]
    before = token_balance(chain, payer["address"])
    agent = agent_client(
        live_server.url, {"network": chain.network, "asset": chain.asset, "payers": chain.payers}, 7
    )
    bought = agent.models.predictions.create(model="demo/echo-text", input={"text": "agent"})
    bought.wait()
    assert bought.status == "succeeded" and bought.output == "agent"
    assert token_balance(chain, payer["address"]) == before - PRICE


def test_list_pages_with_cursors(chain_settings, demo_model, settings) -> None:
    settings.X402_OPERATOR_TOKENS = [TOKEN]
    version = demo_model.latest_version
    made = {
        Prediction.objects.create(model=demo_model, version=version, input={"text": str(i)}).id
        for i in range(57)
    }
    seen: list[str] = []
    url = "/v1/predictions"
    while url:
        page = Client().get(url, headers={"Authorization": f"Bearer {TOKEN}"}).json()
        seen += [p["id"] for p in page["results"]]
        url = page["next"] and page["next"].replace("http://testserver", "")
    assert len(seen) == 57 and set(seen) == made  # two pages (50 + 7), no duplicates


@pytest.mark.e2e
def test_worker_killed_mid_run_never_runs_twice(
    chain_settings, demo_model, celery_worker_process, tmp_path, settings, no_tasks
):
    """SIGKILL the worker while a paid (after_success) prediction runs: it is not run again;
    its heartbeat stops, so the watchdog (armed when the run started, run by the other worker)
    finds it lost on our side at its limit, fails it and releases the payment: the agent is not
    charged. (tests/test_run_clock.py: the same for a payment settled before the run, refunded.)"""
    import os
    import signal

    from predictions.models import ModelVersion
    from predictions.tasks import run_prediction
    from tests.conftest import start_worker

    settings.X402_PREDICTION_TIME_LIMIT = 5
    runs = tmp_path / "runs.txt"
    runs.touch()
    demo_model.settlement_policy = "after_success"
    demo_model.save()
    ModelVersion.objects.create(
        id="5" * 64,
        model=demo_model,
        predictor="tests.predictors.Slow",
        input_schema=demo_model.latest_version.input_schema,
    )
    response = paid(chain_settings, 0, {"input": {"text": "once"}})
    prediction_id = response.json()["id"]
    queue = f"{celery_worker_process['queue']}-doomed-run"
    doomed = start_worker(
        chain_settings, tmp_path / "doomed.log", queue, beat=False, env={"SLOW_RUNS_FILE": str(runs)}
    )
    try:
        run_prediction.apply_async(args=[prediction_id], queue=queue)
        deadline = time.monotonic() + 20
        while not runs.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(doomed.pid, signal.SIGKILL)
    finally:
        doomed.wait(10)
    assert Prediction.objects.get(pk=prediction_id).status == "processing"
    assert run_prediction(prediction_id) == "skipped"  # a redelivered task runs nothing
    deadline = time.monotonic() + 20  # the watchdog: the limit (5 s) and its slack after the run started
    while Prediction.objects.get(pk=prediction_id).status == "processing" and time.monotonic() < deadline:
        time.sleep(0.2)
    body = Client().get(f"/v1/predictions/{prediction_id}").json()
    assert body["status"] == "failed" and "lost on our side" in body["error"], body["error"]
    assert body["payment"]["status"] == "lapsing"
    ended = Prediction.objects.get(pk=prediction_id).events.get(to_status="failed")
    assert ended.cause == "task" and ended.detail["run_end"] == "failed"  # the watchdog: lost, not stopped
    assert runs.read_text().splitlines() == ["once"]
