"""Issue 25, the run clock: a payer pays only for a run its runner confirmed, driven through a
real Celery worker (with beat, the start backstop and the watchdog) on anvil.

A Cog server that answers 409 (busy) forever, and one that answers 500 to the PUT, never start
the run: whatever the payment (``before_run``, ``after_success``, ``upto``), the payer ends with
exactly what it had (the refund confirmed on chain, or nothing settled), within
``X402_RUN_START_TIMEOUT``, not at the time limit. A payer's cancel while the runner is busy is
not billed the wait. A worker SIGKILLed mid-run is found by the watchdog without a heartbeat:
lost on our side, refunded. Refunds come back without a human under
``X402_REFUND_AUTO_APPROVE_MAX``. The ledger invariant is checked after each (conftest)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from django.test import Client

from payments.chain import devchain
from payments.ledger import RunEnd
from payments.models import HardwareTier, Payment, PaymentStatus, Refund, RefundStatus
from predictions.models import Model, ModelVersion, Prediction, PredictionStatus
from tests.conftest import TEST_QUEUE, fresh_payer, start_worker, token_balance
from tests.payers import v2_header_for
from tests.test_upto_e2e import MAXIMUM, approved_payer, upto_session

pytestmark = [pytest.mark.e2e, pytest.mark.chain, pytest.mark.django_db(transaction=True)]

START_TIMEOUT = 6
AUTO_APPROVE_MAX = 50_000
PRICE = 10_000
#: Runs of the "doomed" tier go to this queue (a worker of their own, killed mid-run).
DOOMED = f"{TEST_QUEUE}-doomed"
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}


class _CogThatNeverRuns(BaseHTTPRequestHandler):
    """Healthy to the paywall (READY), but every PUT is answered ``server.put_status``."""

    server: Any

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200, {"status": "READY"})

    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.puts.append(self.path)
        self._answer(self.server.put_status, {"detail": "busy" if self.server.put_status == 409 else "boom"})

    def do_POST(self) -> None:  # noqa: N802
        self.server.cancels.append(self.path)
        self._answer(200, {})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def cogs() -> Iterator[dict[str, Any]]:
    """Two Cog servers that never start a run: ``busy`` (409 to every PUT), ``broken`` (500)."""
    servers: dict[str, Any] = {}
    for name, status in (("busy", 409), ("broken", 500)):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _CogThatNeverRuns)
        server.put_status, server.puts, server.cancels = status, [], []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield servers
    for server in servers.values():
        server.shutdown()


@pytest.fixture(scope="module")
def clock_worker(chain, django_db_setup, django_db_blocker, live_server, tmp_path_factory) -> Iterator[None]:
    """A real worker with beat, a short start timeout and automatic refunds (this module's)."""
    log_path = tmp_path_factory.mktemp("clock") / "worker.log"
    proc = start_worker(chain, log_path, TEST_QUEUE, beat=True, env=_worker_env(live_server.url))
    try:
        yield
    finally:
        devchain.stop(proc)


def _worker_env(public_url: str) -> dict[str, str]:
    return {
        "X402_PUBLIC_URL": public_url,
        "X402_RUN_START_TIMEOUT": str(START_TIMEOUT),
        "X402_REFUND_AUTO_APPROVE_MAX": str(AUTO_APPROVE_MAX),
        "X402_TIER_QUEUES": f"doomed={DOOMED}",
    }


@pytest.fixture
def clock(chain_settings, settings, clock_worker) -> Any:
    settings.X402_RUN_START_TIMEOUT = START_TIMEOUT
    settings.X402_REFUND_AUTO_APPROVE_MAX = AUTO_APPROVE_MAX
    settings.X402_TIER_QUEUES = {"doomed": DOOMED}
    return chain_settings


def _cog_model(name: str, cog_url: str, policy: str) -> Model:
    """A Cog model: flat 0.01 under ``policy``, or per second with upto first (``upto``)."""
    if policy == "upto":
        tier, _ = HardwareTier.objects.get_or_create(
            slug="gpu-a100-80gb", defaults={"name": "A100", "price_per_second": Decimal("0.0014")}
        )
        model = Model.objects.create(
            owner="clock",
            name=name,
            price="0.01",
            pricing_mode="per_second",
            hardware=tier,
            expected_seconds=5,
            upto_order="upto_first",
        )
    else:
        model = Model.objects.create(owner="clock", name=name, price="0.01", settlement_policy=policy)
    ModelVersion.objects.create(
        id=name[:1] * 64, model=model, runner="cog", cog_url=cog_url, input_schema=SCHEMA
    )
    return model


def _pay(chain: Any, url: str, policy: str) -> tuple[dict[str, str], dict[str, Any]]:
    """A fresh payer pays one prediction at ``url``: (the payer, the prediction's JSON)."""
    body = {"input": {"text": "never runs"}}
    if policy == "upto":
        payer = approved_payer(chain)
        created = upto_session(payer, chain).post(url, json=body, timeout=30)
    else:
        payer = fresh_payer(chain, 10**8)
        challenge = requests.post(url, json=body, timeout=30)
        assert challenge.status_code == 402, challenge.text
        header = v2_header_for(payer["private_key"], challenge.headers["PAYMENT-REQUIRED"])
        created = requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": header}, timeout=30)
    assert created.status_code == 201, created.text
    return payer, created.json()


def _ended(prediction_id: str, timeout: float) -> Prediction:
    deadline = time.monotonic() + timeout
    while True:
        prediction = Prediction.objects.select_related("payment").get(pk=prediction_id)
        if prediction.is_terminal or time.monotonic() > deadline:
            return prediction
        time.sleep(0.2)


def _refund_confirmed(payment: Payment, timeout: float = 60) -> Refund:
    """The payment's refund, once confirmed on chain (approved by the policy, not a human)."""
    deadline = time.monotonic() + timeout
    while True:
        refund = Refund.objects.filter(payment=payment).first()
        if (refund is not None and refund.status == RefundStatus.CONFIRMED) or time.monotonic() > deadline:
            assert refund is not None, f"no refund owed for {payment.pk}"
            assert refund.status == RefundStatus.CONFIRMED, (refund.status, refund.failure_reason)
            return refund
        time.sleep(0.3)


def _nothing_settled(payment: Payment, timeout: float = 30) -> Payment:
    """The payment, released (never settled): nothing of it ever reaches the chain."""
    deadline = time.monotonic() + timeout
    while payment.status != PaymentStatus.LAPSING and time.monotonic() < deadline:
        time.sleep(0.2)
        payment.refresh_from_db()
    assert payment.status == PaymentStatus.LAPSING and payment.settle_tx_hash is None, payment.status
    return payment


@pytest.mark.parametrize("policy", ["before_run", "after_success", "upto"])
@pytest.mark.parametrize("cog", ["busy", "broken"])
def test_a_run_the_runner_never_starts_costs_the_payer_nothing(clock, cogs, live_server, cog, policy) -> None:
    """Cog answers 409 to every PUT (the task retries while busy), or 500 (it waits for a callback
    that never comes): the run never starts. Within the start timeout (not at the time limit)
    it fails on our side; ``before_run`` is refunded on chain without a human, ``after_success``
    and ``upto`` settle nothing."""
    chain = clock
    model = _cog_model(
        f"{cog}-{policy.replace('_', '-')}", f"http://127.0.0.1:{cogs[cog].server_port}", policy
    )
    url = f"{live_server.url}/v1/models/{model.owner}/{model.name}/predictions"
    payer, created = _pay(chain, url, policy)
    prediction = _ended(created["id"], timeout=40)
    assert prediction.status == PredictionStatus.FAILED, prediction.status
    assert "never started the run" in prediction.error, prediction.error
    assert prediction.run_started_at is None
    ended = prediction.events.get(to_status=PredictionStatus.FAILED)
    assert ended.detail["run_end"] == RunEnd.FAILED
    waited = (prediction.completed_at - prediction.started_at).total_seconds()
    assert START_TIMEOUT <= waited < START_TIMEOUT + 10  # the start backstop, not the time limit
    assert any(created["id"] in put for put in cogs[cog].puts)
    payment = prediction.payment
    if policy == "before_run":
        refund = _refund_confirmed(payment)
        assert int(refund.amount) == PRICE and refund.events.filter(detail__cause="failed").exists()
        assert token_balance(chain, payer["address"]) == 10**8  # paid 0.01, refunded 0.01
    else:
        _nothing_settled(payment)
        assert token_balance(chain, payer["address"]) == 10**8
        if policy == "upto":
            assert int(payment.maximum) == MAXIMUM and payment.run_seconds == 0


def test_a_payers_cancel_while_the_runner_is_busy_is_not_billed_the_wait(clock, cogs, live_server) -> None:
    """Pay per second on a Cog server busy for good; the payer gives up after a while: the
    wait for the runner is no run, nothing is charged."""
    chain = clock
    model = _cog_model("impatient", f"http://127.0.0.1:{cogs['busy'].server_port}", "upto")
    url = f"{live_server.url}/v1/models/{model.owner}/{model.name}/predictions"
    payer, created = _pay(chain, url, "upto")
    deadline = time.monotonic() + 10
    while Prediction.objects.get(pk=created["id"]).status != PredictionStatus.PROCESSING:
        assert time.monotonic() < deadline, "never claimed"
        time.sleep(0.1)
    time.sleep(START_TIMEOUT / 2)  # retrying the busy runner
    canceled = requests.post(created["urls"]["cancel"], timeout=10).json()
    assert canceled["status"] == "canceled", canceled
    payment = _nothing_settled(Payment.objects.get(prediction__pk=created["id"]))
    assert payment.run_seconds == 0
    assert token_balance(chain, payer["address"]) == 10**8


def test_a_worker_killed_mid_run_is_lost_on_our_side_and_refunded(clock, tmp_path, settings) -> None:
    """SIGKILL the worker while a paid (before_run) python prediction runs: it is never run
    again; its heartbeat stops, so the watchdog (armed when the run started) finds no sign of
    life at the limit: lost on our side (not "stopped at its time limit"), refunded on chain."""
    from predictions.tasks import run_prediction

    settings.X402_PREDICTION_TIME_LIMIT = 6
    runs = tmp_path / "runs.txt"
    runs.touch()
    tier, _ = HardwareTier.objects.get_or_create(
        slug="doomed-cpu", defaults={"name": "Doomed", "price_per_second": Decimal("0.0001")}
    )
    model = Model.objects.create(owner="clock", name="doomed", price="0.01", hardware=tier)
    ModelVersion.objects.create(
        id="d" * 64, model=model, predictor="tests.predictors.Slow", input_schema=SCHEMA
    )
    payer = fresh_payer(clock, 10**8)
    doomed = start_worker(
        clock,
        tmp_path / "doomed.log",
        DOOMED,
        beat=False,
        settlement=False,
        env={**_worker_env(settings.X402_PUBLIC_URL), "SLOW_RUNS_FILE": str(runs)},
    )
    try:
        path = "/v1/models/clock/doomed/predictions"
        body = {"input": {"text": "once"}}
        challenge = Client().post(path, body, content_type="application/json")
        header = v2_header_for(payer["private_key"], challenge["PAYMENT-REQUIRED"])
        created = Client().post(path, body, content_type="application/json", HTTP_PAYMENT_SIGNATURE=header)
        assert created.status_code == 201, created.content
        prediction_id = created.json()["id"]
        deadline = time.monotonic() + 30  # settled and confirmed first, then run on the doomed worker
        while not runs.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runs.read_text() == "once\n"
        os.killpg(doomed.pid, signal.SIGKILL)
    finally:
        doomed.wait(10)
    assert run_prediction(prediction_id) == "skipped"  # a redelivered task runs nothing
    prediction = _ended(prediction_id, timeout=30)
    assert prediction.status == PredictionStatus.FAILED and "lost on our side" in prediction.error, (
        prediction.error
    )
    assert prediction.run_started_at is not None  # its runner had confirmed the run
    assert prediction.events.get(to_status=PredictionStatus.FAILED).detail["run_end"] == RunEnd.FAILED
    _refund_confirmed(prediction.payment)
    assert token_balance(clock, payer["address"]) == 10**8
    assert runs.read_text().splitlines() == ["once"]


def test_loading_the_model_is_never_billed_nor_stopped(clock, live_server) -> None:
    """Issue 25 (2): a cold worker loads a predictor whose ``setup()`` takes 2 s, twice its
    model's 1 s time limit, then runs it in 0.2 s. Loading happens before the run clock and the
    limit: the run succeeds and the upto payer is charged for the run's seconds only."""
    from tests.test_upto_e2e import charge_of

    tier, _ = HardwareTier.objects.get_or_create(
        slug="gpu-a100-80gb", defaults={"name": "A100", "price_per_second": Decimal("0.0014")}
    )
    model = Model.objects.create(
        owner="clock",
        name="cold-start",
        price="0.01",
        pricing_mode="per_second",
        hardware=tier,
        expected_seconds=Decimal("0.5"),  # a 1 s time limit
        upto_order="upto_first",
    )
    ModelVersion.objects.create(
        id="e" * 64, model=model, predictor="tests.predictors.SlowSetup", input_schema=SCHEMA
    )
    url = f"{live_server.url}/v1/models/clock/cold-start/predictions"
    payer, created = _pay(clock, url, "upto")
    prediction = _ended(created["id"], timeout=30)
    while prediction.status == PredictionStatus.PROCESSING:  # succeeded, waiting for its settlement
        prediction = _ended(created["id"], timeout=30)
    assert prediction.status == PredictionStatus.SUCCEEDED, prediction.error
    assert prediction.time_limit_seconds == 1 and prediction.predict_time < 1
    payment = prediction.payment
    assert Decimal("0.2") <= payment.run_seconds < 1
    assert payment.status == PaymentStatus.CONFIRMED and int(payment.amount) == charge_of(payment.run_seconds)
    assert token_balance(clock, payer["address"]) == 10**8 - int(payment.amount)
