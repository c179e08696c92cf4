"""The prediction lifecycle: one writer of the status, the webhooks every path owes, runners as
plug-ins, time limits, and the settlement policy fixed on the prediction.

Paid runs go through the real API (live server), a real Celery worker process, the real anvil
chain and a real Cog server; the Cog callbacks reach the live server.
"""

from __future__ import annotations

import ast
import threading
import time
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from django.utils import timezone

from payments.models import Payment
from predictions.models import Model, ModelVersion, Prediction
from predictions.runners import cog
from tests.conftest import TEST_QUEUE, poll_until_done, start_worker, token_balance
from tests.payers import v2_header_for
from tests.receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
PRICE = 10_000
TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
SLOW_TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "seconds": {"type": "number", "minimum": 0}},
    "required": ["text"],
}
#: Cog answers within this in the worker (a PUT held longer is a lost answer).
COG_TIMEOUT = 1.0


# --- No module but the lifecycle writes Prediction.status ------------------------------------

#: Calls whose keyword ``status=`` writes a row (``filter(status=...)`` only reads).
_WRITING_CALLS = {"update", "create", "get_or_create", "update_or_create", "bulk_create", "Prediction"}
#: The payment ledger's own state machine (payments/models/ledger.py) writes Payment.status, and the
#: ledger records a new payment as VERIFIED: neither touches a prediction.
_ALLOWED = {
    "predictions/lifecycle.py": None,  # the whole module
    "payments/models/ledger.py": {"advance", "_apply"},  # the ledger's state machine (one payment, or a batch)
    "payments/models/refunds.py": {"advance"},  # a refund's own state machine
    "payments/ledger.py": {"record"},
    # An export job's own status (ExportJob): no payment, no prediction.
    "payments/finance/export_jobs.py": {"run", "expire", "record_command"},
    # A channel transaction's own outcome (ChannelTx): no payment, no prediction.
    "payments/channels/outbox.py": {"_finish"},
    # A development script that stages a ledger row without its transaction for a screenshot.
    "scripts/finance_screenshots.py": {"seed"},
}


def _names_status(node: ast.expr) -> bool:
    """The expression holds the string "status" (a field list or defaults naming it)."""
    return any(isinstance(n, ast.Constant) and n.value == "status" for n in ast.walk(node))


def status_writes(source: str) -> list[tuple[int, str]]:
    """(line, function) of every statement in ``source`` that may write a ``status`` field."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr == "status":
                found.append((node.lineno, function))
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            named_fields = [k.value for k in node.keywords if k.arg in ("update_fields", "defaults")]
            if name == "bulk_update":
                named_fields += node.args[1:] + [k.value for k in node.keywords if k.arg == "fields"]
            if name == "setattr":
                named_fields += node.args[1:2]
            if (any(k.arg == "status" for k in node.keywords) and name in _WRITING_CALLS) or any(
                _names_status(value) for value in named_fields
            ):
                found.append((node.lineno, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), "")
    return found


def test_the_scan_finds_every_way_of_writing_a_status() -> None:
    offending = """
def a(p):
    p.status = "failed"
def b():
    Prediction.objects.filter(pk=1).update(status="failed", error="x")
def c(p):
    p.save(update_fields=["status"])
def d():
    Prediction(status="succeeded").save()
def e(p):
    setattr(p, "status", "canceled")
def f():
    Prediction.objects.bulk_update([], ["status"])
def g():
    Prediction.objects.filter(status="processing").count()  # a read
"""
    assert [function for _, function in status_writes(offending)] == ["a", "b", "c", "d", "e", "f"]


def test_no_module_but_the_lifecycle_writes_a_status() -> None:
    offenders = []
    packages = [
        d
        for d in ROOT.iterdir()
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and d.name != "tests"
    ]
    paths = sorted(p for d in packages for p in d.rglob("*.py") if "migrations" not in p.parts)
    assert any(p.name == "lifecycle.py" for p in paths) and len(paths) > 50
    for path in paths:
        relative = path.relative_to(ROOT).as_posix()
        allowed = _ALLOWED.get(relative, set())
        if allowed is None:
            continue
        for line, function in status_writes(path.read_text()):
            if function not in allowed:
                offenders.append(f"{relative}:{line} ({function})")
    assert offenders == []


# --- Fixtures: a worker that reaches the live server, models, a paid request ----------------


@pytest.fixture(scope="module")
def worker(chain, django_db_setup, django_db_blocker, live_server, tmp_path_factory) -> dict[str, Any]:
    """A real Celery worker (no beat: the tests call the sweep themselves)."""
    log_path = tmp_path_factory.mktemp("lifecycle-worker") / "worker.log"
    env = {
        "X402_PUBLIC_URL": live_server.url,
        "X402_COG_TIMEOUT": str(COG_TIMEOUT),
        "X402_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    proc = start_worker(chain, log_path, TEST_QUEUE, beat=False, env=env)
    try:
        yield {"log": log_path}
    finally:
        from payments.chain import devchain

        devchain.stop(proc)


@pytest.fixture
def paid_api(chain_settings, live_server, settings):
    settings.X402_WEBHOOK_ALLOW_PRIVATE = True
    settings.X402_PUBLIC_URL = live_server.url
    cog._health.clear()

    def pay(model: Model, body: dict, payer: int = 0, **headers: str) -> dict:
        """Ask for the challenge, then pay it as the official clients do."""
        url = f"{live_server.url}/v1/models/{model}/predictions"
        challenge = requests.post(url, json=body, headers=headers, timeout=30)
        assert challenge.status_code == 402, challenge.text
        header = v2_header_for(
            chain_settings.payers[payer]["private_key"], challenge.headers["PAYMENT-REQUIRED"]
        )
        response = requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": header, **headers}, timeout=30)
        assert response.status_code == 201, response.text
        return response.json()

    return pay


def pay_in_process(chain, model: Model, body: dict, payer: int) -> dict:
    """Through Django's test client: ask for the challenge, pay it as the official clients do."""
    from django.test import Client

    url = f"/v1/models/{model}/predictions"
    challenge = Client().post(url, data=body, content_type="application/json")
    assert challenge.status_code == 402, challenge.content
    header = v2_header_for(chain.payers[payer]["private_key"], challenge["PAYMENT-REQUIRED"])
    response = Client().post(
        url, data=body, content_type="application/json", headers={"PAYMENT-SIGNATURE": header}
    )
    assert response.status_code == 201, response.content
    return response.json()


def python_model(
    name: str, predictor: str, policy: str = "before_run", schema: dict = TEXT, **fields
) -> Model:
    model = Model.objects.create(owner="test", name=name, price="0.01", settlement_policy=policy, **fields)
    ModelVersion.objects.create(
        id=f"{name}-v1", model=model, runner="python", predictor=predictor, input_schema=schema
    )
    return model


def cog_model(name: str, url: str, policy: str = "before_run", **fields) -> Model:
    model = Model.objects.create(owner="test", name=name, price="0.01", settlement_policy=policy, **fields)
    ModelVersion.objects.create(
        id=f"{name}-v1", model=model, runner="cog", cog_url=url, input_schema=SLOW_TEXT
    )
    return model


def cog_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/health-check", timeout=5).json()["status"] != "READY":
        assert time.monotonic() < deadline, "the Cog server stayed busy"
        time.sleep(0.1)
    cog._health.clear()


def cog_log_lines(cog_server: dict, needle: str) -> list[str]:
    return [line for line in cog_server["log"].read_text().splitlines() if needle in line]


# --- The webhook matrix: runner x policy x event ---------------------------------------------

#: What a prediction whose filter is [event] receives, for a run that succeeds with ``out``.
EXPECTED: dict[str, Any] = {
    "start": lambda got, out: len(got) == 1 and got[0]["status"] == "processing",
    "logs": lambda got, out: len(got) >= 1 and all(b["logs"] for b in got),
    "output": lambda got, out: len(got) == 1 and got[0]["output"] == out and got[0]["status"] == "succeeded",
    "completed": lambda got, out: (
        len(got) == 1
        and got[0]["status"] == "succeeded"
        and got[0]["output"] == out
        and got[0]["payment"]["status"] == "confirmed"
    ),
}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("event", list(EXPECTED))
@pytest.mark.parametrize("policy", ["before_run", "after_success"])
@pytest.mark.parametrize("runner", ["python", "cog"])
def test_every_path_sends_the_webhooks_its_filter_asks_for(
    runner, policy, event, paid_api, cog_server, worker
) -> None:
    if runner == "python":
        model, out = python_model("chatty", "tests.predictors.Chatty", policy), "hello"
    else:
        model, out = cog_model("shout", cog_server["url"], policy), "HELLO"
        cog_ready(cog_server["url"])
    receiver = Receiver()
    created = paid_api(
        model, {"input": {"text": "hello"}, "webhook": receiver.url, "webhook_events_filter": [event]}
    )
    done = poll_until_done(created["urls"]["get"], timeout=60)  # after_success: run, then settle, on a loaded box
    assert done["status"] == "succeeded" and done["output"] == out, done
    got = receiver.wait(lambda bodies: EXPECTED[event](bodies, out))
    time.sleep(0.3)  # nothing more arrives
    assert EXPECTED[event](receiver.bodies, out), (event, got)
    events = Prediction.objects.get(pk=created["id"]).events.values_list("to_status", "cause")
    last = "payment" if policy == "after_success" else ("callback" if runner == "cog" else "task")
    assert list(events) == [("starting", "api"), ("processing", "task"), ("succeeded", last)]


# --- The settlement policy is the prediction's own (issue 13, defect 4) ----------------------


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "bought, flipped_to", [("after_success", "before_run"), ("before_run", "after_success")]
)
def test_a_policy_flipped_mid_run_changes_nothing_about_a_paid_run(
    bought, flipped_to, paid_api, chain_settings, worker
) -> None:
    """The predictor flips the model's policy while it runs (an operator editing the model)."""
    model = python_model("flip", "tests.predictors.FlipPolicy", bought)
    payer = chain_settings.payers[1]
    before = token_balance(chain_settings, payer["address"])
    created = paid_api(model, {"input": {"text": flipped_to}}, payer=1)
    done = poll_until_done(created["urls"]["get"])
    assert Model.objects.get(pk=model.pk).settlement_policy == flipped_to  # the flip happened mid-run
    assert done["status"] == "succeeded" and done["output"] == flipped_to, done
    assert done["payment"]["status"] == "confirmed"  # paid: not given away, not stuck
    assert token_balance(chain_settings, payer["address"]) == before - PRICE


# --- The lost-run sweep (issue 13, defect 4) -------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_sweep_leaves_a_finished_run_waiting_for_its_settlement(chain_settings, monkeypatch) -> None:
    """after_success: the run succeeded, its payment is settling (signed, not yet mined) long
    after the run started. The sweep must neither fail it nor drop its output."""
    from django.test import Client

    from payments.chain import settlement
    from predictions.tasks import run_prediction, sweep

    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    monkeypatch.setattr("payments.tasks.settle_payment.delay", lambda payment_id: None)  # the test drives it
    model = python_model("patient", "predictions.runners.demo.EchoText", "after_success")
    payer = chain_settings.payers[2]
    before = token_balance(chain_settings, payer["address"])
    created = pay_in_process(chain_settings, model, {"input": {"text": "keep me"}}, payer=2)
    run_prediction(created["id"])
    payment = Payment.objects.get()
    assert settlement.prepare(payment.pk).status == "settling"
    two_hours_ago = timezone.now() - timedelta(hours=2)
    Prediction.objects.filter(pk=created["id"]).update(started_at=two_hours_ago, run_started_at=two_hours_ago)

    assert sweep()["lost"] == 0
    kept = Prediction.objects.get(pk=created["id"])
    assert kept.status == "processing" and kept.output == "keep me"

    settlement.broadcast(Payment.objects.get(pk=payment.pk))  # the stored transaction goes out
    assert settlement.settle(payment.pk).status == "confirmed"
    done = Client().get(f"/v1/predictions/{created['id']}").json()
    assert done["status"] == "succeeded" and done["output"] == "keep me"
    assert token_balance(chain_settings, payer["address"]) == before - PRICE


@pytest.mark.chain
@pytest.mark.django_db(transaction=True)
def test_logs_are_kept_back_with_the_output_while_the_payment_is_held(chain_settings, monkeypatch) -> None:
    """Issue 25 (8): a model that prints its result (tests.predictors.Chatty) under
    ``after_success``: until its payment confirms, neither its output nor its logs are shown;
    then both are."""
    from django.test import Client

    from payments.chain import settlement
    from predictions.tasks import run_prediction

    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    monkeypatch.setattr("payments.tasks.settle_payment.delay", lambda payment_id: None)  # the test drives it
    model = python_model("printer", "tests.predictors.Chatty", "after_success")
    created = pay_in_process(chain_settings, model, {"input": {"text": "the answer"}}, payer=2)
    run_prediction(created["id"])
    held = Client().get(f"/v1/predictions/{created['id']}").json()
    assert held["status"] == "processing" and held["output"] is None
    assert held["logs"] == "", held["logs"]
    assert "the answer" in Prediction.objects.get(pk=created["id"]).logs  # kept, not lost
    payment = Payment.objects.get()
    assert settlement.prepare(payment.pk).status == "settling"
    settlement.broadcast(Payment.objects.get(pk=payment.pk))
    assert settlement.settle(payment.pk).status == "confirmed"
    paid = Client().get(f"/v1/predictions/{created['id']}").json()
    assert paid["status"] == "succeeded" and paid["output"] == "the answer"
    assert "chatting about 'the answer'" in paid["logs"]


@pytest.mark.django_db(transaction=True)
def test_a_held_run_canceled_before_it_is_paid_never_shows_its_logs(chain_settings, monkeypatch) -> None:
    """Canceled while it runs (just before it would end), a held run's authorization is
    released (nothing is charged): its logs, which carry its result here, stay withheld for
    good; its error says why."""
    import threading

    from django.test import Client

    from predictions.tasks import run_prediction

    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    model = python_model("talker", "tests.predictors.Talkative", "after_success")
    created = pay_in_process(chain_settings, model, {"input": {"text": "the answer", "seconds": 5}}, payer=2)
    runner = threading.Thread(target=run_prediction, args=[created["id"]])
    runner.start()
    deadline = time.monotonic() + 15
    while "printed the answer" not in (Prediction.objects.get(pk=created["id"]).logs or ""):
        assert time.monotonic() < deadline, "the run never printed"
        time.sleep(0.05)
    assert Client().post(f"/v1/predictions/{created['id']}/cancel").json()["status"] == "canceled"
    runner.join(15)
    ended = Client().get(f"/v1/predictions/{created['id']}").json()
    assert ended["status"] == "canceled" and ended["output"] is None
    assert "the answer" not in (ended["logs"] or ""), ended["logs"]
    assert Payment.objects.get().status not in ("settled", "confirmed")  # nothing was charged


@pytest.mark.django_db(transaction=True)
def test_a_run_that_outlives_its_limit_keeps_beating_until_it_returns(chain_settings, settings, monkeypatch) -> None:
    """Review of issue 25: a run still computing past its limit (here a predictor that swallowed
    the stop) shows signs of life until it returns, so the watchdog calls it stopped at its
    limit (compute used), not lost on our side (refunded)."""
    import threading

    from predictions.tasks import run_prediction

    settings.X402_PREDICTION_TIME_LIMIT = 1
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    model = python_model("stubborn", "tests.predictors.Stubborn", "after_success", schema=SLOW_TEXT)
    created = pay_in_process(chain_settings, model, {"input": {"text": "x", "seconds": 4}}, payer=3)
    runner = threading.Thread(target=run_prediction, args=[created["id"]])
    runner.start()
    time.sleep(3.5)
    running = Prediction.objects.get(pk=created["id"])
    runner.join(15)
    assert running.time_limit_seconds == 1 and running.run_started_at is not None
    assert running.alive_at is not None
    assert running.alive_at >= running.run_started_at + timedelta(seconds=2), (running.run_started_at, running.alive_at)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_the_sweep_cancels_on_cog_a_run_it_gives_up_on(paid_api, cog_server, worker, settings) -> None:
    from predictions.tasks import sweep

    cog_ready(cog_server["url"])
    model = cog_model("forgotten", cog_server["url"], "after_success")
    created = paid_api(model, {"input": {"text": "forgotten", "seconds": 5}}, payer=3)
    deadline = time.monotonic() + 15
    while not cog_log_lines(cog_server, "shouting 'forgotten'"):
        assert time.monotonic() < deadline, "the run never reached Cog"
        time.sleep(0.1)
    limit = Prediction.objects.get(pk=created["id"]).time_limit_seconds
    Prediction.objects.filter(pk=created["id"]).update(
        run_started_at=timezone.now() - timedelta(seconds=limit + settings.X402_PREDICTION_LOST_GRACE + 1)
    )
    assert sweep()["lost"] == 1
    body = requests.get(created["urls"]["get"], timeout=5).json()
    assert body["status"] == "failed" and "lost" in body["error"]
    assert body["payment"]["status"] == "lapsing"  # after_success: no success, released unsettled
    assert any(created["id"] in line for line in cog_log_lines(cog_server, "Cancelling prediction"))
    cog_ready(cog_server["url"])


# --- A Cog run is claimed once and its result accepted whenever it arrives (defect 5) --------


class SlowPutProxy:
    """In front of a Cog server: forwards everything, but holds the answer to each PUT for
    ``hold`` seconds (longer than the worker waits), after Cog has started the run."""

    def __init__(self, target: str, hold: float) -> None:
        self.puts = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                answer = requests.request(
                    self.command, target + self.path, data=body, headers=headers, timeout=30
                )
                if self.command == "PUT":
                    proxy.puts += 1
                    time.sleep(hold)
                try:
                    self.send_response(answer.status_code)
                    self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                    self.send_header("Content-Length", str(len(answer.content)))
                    self.end_headers()
                    self.wfile.write(answer.content)
                except OSError:
                    pass  # the client gave up waiting

            do_GET = do_PUT = do_POST = _forward  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_cog_put_answered_too_late_runs_once_and_its_result_is_accepted(
    paid_api, cog_server, worker, chain_settings
) -> None:
    cog_ready(cog_server["url"])
    proxy = SlowPutProxy(cog_server["url"], hold=COG_TIMEOUT + 2)
    model = cog_model("slowput", proxy.url)
    payer = chain_settings.payers[4]
    before = token_balance(chain_settings, payer["address"])
    # The run outlasts the client's wait: the PUT times out while Cog is still running it.
    created = paid_api(model, {"input": {"text": "only once", "seconds": COG_TIMEOUT + 1}}, payer=4)
    done = poll_until_done(created["urls"]["get"], timeout=30)
    assert done["status"] == "succeeded" and done["output"] == "ONLY ONCE", done
    time.sleep(COG_TIMEOUT + 3)  # a retry, if any, would have reached Cog by now
    assert proxy.puts == 1
    assert len(cog_log_lines(cog_server, "shouting 'only once'")) == 1
    assert token_balance(chain_settings, payer["address"]) == before - PRICE
    proxy.server.shutdown()


# --- Each run has the time limit it paid for --------------------------------------------------


def per_second(model: Model, expected_seconds: Decimal) -> Model:
    """Priced per second on the cpu tier: its runs may take expected x the overrun factor."""
    from payments.models import HardwareTier

    model.pricing_mode = "per_second"
    model.hardware, _ = HardwareTier.objects.get_or_create(
        slug="cpu", defaults={"name": "CPU", "price_per_second": "0.0001"}
    )
    model.expected_seconds = expected_seconds
    model.save()
    return model


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("runner", ["python", "cog"])
def test_a_run_is_stopped_at_the_time_limit_it_paid_for(
    runner, paid_api, cog_server, worker, settings
) -> None:
    settings.X402_PER_SECOND_OVERRUN_FACTOR = 2.0
    if runner == "python":
        model = python_model("sleepy", "tests.predictors.Sleepy", "after_success", schema=SLOW_TEXT)
    else:
        cog_ready(cog_server["url"])
        model = cog_model("sleepy", cog_server["url"], "after_success")
    per_second(model, Decimal("0.5"))
    assert model.time_limit_seconds == 1
    started = time.monotonic()
    created = paid_api(model, {"input": {"text": "overrun", "seconds": 6}}, payer=5)
    assert Prediction.objects.get(pk=created["id"]).time_limit_seconds == 1  # recorded at creation
    done = poll_until_done(created["urls"]["get"], timeout=12)
    assert done["status"] == "failed" and "time limit (1s)" in done["error"], done
    assert time.monotonic() - started < 6  # stopped, not run to its end
    assert done["payment"]["status"] == "lapsing"  # after_success: released, not charged
    if runner == "cog":
        deadline = time.monotonic() + 5
        while not any(created["id"] in line for line in cog_log_lines(cog_server, "Cancelling prediction")):
            assert time.monotonic() < deadline, "the Cog run was not canceled"
            time.sleep(0.1)
        cog_ready(cog_server["url"])


def _sleeping_run(name: str, limit: int) -> Prediction:
    """A python run claimed with ``limit`` (as a claim cut it), asked to sleep 30 s."""
    model = python_model(name, "tests.predictors.Sleepy", schema=SLOW_TEXT)
    return Prediction.objects.create(
        model=model,
        version=model.latest_version,
        input={"text": "long", "seconds": 30},
        status="processing",
        started_at=timezone.now(),
        time_limit_seconds=limit,
    )


@pytest.mark.django_db
def test_the_python_runner_stops_at_the_limit_decided_at_the_claim() -> None:
    """No Celery limit here at all (the task's is the uncut one): the run's own watcher stops it
    at the prediction's limit, out of a blocking sleep."""
    from predictions.runners.python import PythonRunner

    prediction = _sleeping_run("cut", 1)
    started = time.monotonic()
    outcome = PythonRunner().start(prediction)
    assert outcome.timed_out and not outcome.succeeded and "time limit (1s)" in outcome.error
    assert 1 <= time.monotonic() - started < 3
    time.sleep(0.3)  # nothing is left pending to land after the run


@pytest.mark.django_db
def test_a_stop_that_lands_after_the_run_returned_keeps_the_runs_outcome(monkeypatch) -> None:
    """Issue 25 (8): the predictor returns just before its limit and the limit's stop lands
    while the runner is still disarming its watcher (held here in Python code): the run
    finished, so it succeeds with its output; it is not turned into a timed-out run."""
    from predictions.runners import python as runner_module

    prediction = _sleeping_run("photo-finish", 1)
    Prediction.objects.filter(pk=prediction.pk).update(input={"text": "done", "seconds": 0.7})
    prediction.refresh_from_db()
    disarm = runner_module._Stopper.disarm

    def late_disarm(stopper: Any) -> None:
        until = time.monotonic() + 0.8
        while time.monotonic() < until:  # the limit's stop lands here, after predict returned
            pass
        disarm(stopper)

    monkeypatch.setattr(runner_module._Stopper, "disarm", late_disarm)
    outcome = runner_module.PythonRunner().start(prediction)
    assert outcome.succeeded and not outcome.timed_out, outcome.error
    assert outcome.output == "done"
    time.sleep(0.3)  # nothing is left pending to land after the run


@pytest.mark.django_db
def test_a_loaded_predictors_run_starts_its_clock_with_its_claim(monkeypatch, django_capture_on_commit_callbacks) -> None:
    """A run whose predictor this worker has loaded starts the moment it is claimed: its run
    clock starts in the claim's transaction and its time-limit watchdog is armed then; no start
    watchdog is queued (there is nothing to wait for). The first run in a process loads the
    predictor first: the clock starts after the load, with the start watchdog queued meanwhile."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from predictions import runclock, tasks
    from predictions.lifecycle import Cause, create
    from predictions.runners import python as runner_module

    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(tasks.enforce_start, "apply_async", lambda **kw: sent.append(("start", kw["args"][0])))
    monkeypatch.setattr(runclock, "arm_watchdog", lambda pid, limit: sent.append(("limit", pid)))
    monkeypatch.setattr(runner_module, "_loaded", {})
    model = python_model("claimed-at-once", "tests.predictors.Sleepy", schema=SLOW_TEXT)

    def run() -> tuple[Prediction, int]:
        prediction = create(
            model.latest_version,
            {"text": "hi", "seconds": 0},
            payment=None,
            settlement_policy=model.settlement_policy,
            cause=Cause.API,
        )
        with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=True):
            assert tasks.run_prediction.run(prediction.pk) == "succeeded"
        prediction.refresh_from_db()
        assert prediction.output == "hi"
        return prediction, len(queries.captured_queries)

    first, _ = run()  # loads the predictor: started after its claim
    assert sent == [("start", first.pk), ("limit", first.pk)]
    assert first.run_started_at > first.started_at
    sent.clear()
    second, statements = run()
    assert sent == [("limit", second.pk)]
    assert second.run_started_at == second.started_at  # one transaction: claimed and started
    assert statements <= 13, statements  # (19 when the runner confirmed in a transaction of its own)


@pytest.mark.django_db
def test_a_canceled_python_run_stops_computing() -> None:
    """The payer cancels (or Cancel-After, or the watchdog, ends it): the runner's cancel stops
    the run in whichever worker runs it, long before its limit; what it returns is discarded."""
    from predictions.runners.python import STOPPED_ERROR, PythonRunner

    prediction = _sleeping_run("canceled", 60)
    runner = PythonRunner()
    threading.Timer(0.5, runner.cancel, args=[prediction]).start()
    started = time.monotonic()
    outcome = runner.start(prediction)
    assert not outcome.succeeded and not outcome.timed_out and outcome.error == STOPPED_ERROR
    assert time.monotonic() - started < 2
    quick = _sleeping_run("quick", 60)
    Prediction.objects.filter(pk=quick.pk).update(input={"text": "fast", "seconds": 0})
    quick.refresh_from_db()
    assert runner.start(quick).output == "fast"  # another run is not stopped by that cancel


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_python_run_its_payer_cancels_stops_computing_in_the_worker(paid_api, worker) -> None:
    """In a real (prefork) worker: the payer's cancel reaches the run in the worker child, which
    stops sleeping long before its 20 s; the prediction stays canceled."""
    model = python_model("cancelable", "tests.predictors.Sleepy", "after_success", schema=SLOW_TEXT)
    created = paid_api(model, {"input": {"text": "long", "seconds": 20}}, payer=4)
    deadline = time.monotonic() + 15
    while requests.get(created["urls"]["get"], timeout=5).json()["status"] != "processing":
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)
    assert requests.post(created["urls"]["cancel"], timeout=10).status_code == 200
    canceled = time.monotonic()
    stopped = f"prediction {created['id']}: stopped, its prediction ended"
    while stopped not in worker["log"].read_text():
        assert time.monotonic() - canceled < 5, "the canceled run kept computing"
        time.sleep(0.1)
    done = requests.get(created["urls"]["get"], timeout=5).json()
    assert done["status"] == "canceled" and done["output"] is None


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_keeps_its_database_connection_across_tasks(paid_api, worker) -> None:
    """Celery's Django fix-up closed every connection around every task (a new PostgreSQL server
    process per task); CELERY_DB_REUSE_MAX keeps them. Six runs: each worker process that ran
    them used at most two server processes (one renewal when CONN_MAX_AGE, 60 s, passes during
    the test: this module's worker is older), and later runs in a process found the connection
    of an earlier one. Without reuse no run finds one (a process the pool replaced, after an
    earlier test's kill, counts as a process of its own)."""
    model = python_model("backend", "tests.predictors.Backend")
    backends: dict[str, list[str]] = {}
    for n in range(6):
        created = paid_api(model, {"input": {"text": f"run{n}"}}, payer=3)
        done = poll_until_done(created["urls"]["get"], timeout=30)
        assert done["status"] == "succeeded", done
        text, process, backend = done["output"].split(":")
        assert text == f"run{n}"
        backends.setdefault(process, []).append(backend)
    assert all(len(set(seen)) <= 2 for seen in backends.values()), backends
    found = sum(len(seen) - len(set(seen)) for seen in backends.values())
    assert found >= 6 - 2 * len(backends) and found > 0, backends


# --- Runners are plug-ins ------------------------------------------------------------------


class UpperRunner:
    """A third kind of runner, registered by a test: models and tasks need no change."""

    kind = "upper"
    label = "Upper-cases its text (test)"

    def validate(self, version) -> None:
        pass

    def health(self, version) -> str:
        return "READY"

    def task_options(self, prediction) -> dict:
        return {}

    def ready(self, version) -> bool:
        return False

    def start(self, prediction):
        from predictions.runners import Outcome

        return Outcome(succeeded=True, output=prediction.input["text"].upper(), logs="upper-cased\n")

    def cancel(self, prediction) -> None:
        pass

    def alive(self, prediction) -> bool:
        return False

    def handle_callback(self, prediction_id: str, body: dict) -> None:
        pass


@pytest.mark.django_db(transaction=True)
def test_a_third_runner_is_one_class_and_a_registration(chain_settings, eager_celery, monkeypatch) -> None:
    from django.test import Client

    from predictions import runners

    monkeypatch.setattr(runners, "_registry", dict(runners._registry))
    runners.register(UpperRunner())
    assert ("upper", UpperRunner.label) in runners.choices()
    model = Model.objects.create(owner="test", name="upper", price="0.01")
    version = ModelVersion(id="upper-v1", model=model, runner="upper", input_schema=TEXT)
    version.full_clean()
    version.save()
    created = pay_in_process(chain_settings, model, {"input": {"text": "plug-in"}}, payer=6)
    done = Client().get(f"/v1/predictions/{created['id']}").json()
    assert done["status"] == "succeeded" and done["output"] == "PLUG-IN" and done["logs"] == "upper-cased\n"
    assert done["payment"]["status"] == "confirmed"
    with pytest.raises(ValueError):
        runners.register(type("Impostor", (UpperRunner,), {})())  # one implementation per kind
