"""Progress while a prediction runs: the in-process runner's logs (its own prints and logging,
no other thread's) reported as they come, and generator predictors whose pieces are recorded
one by one (output stored as a list, as Replicate's iterator outputs)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from predictions import lifecycle
from predictions.models import Model, ModelVersion, Prediction
from predictions.runners import capture
from predictions.runners.python import PythonRunner
from predictions.serializers import prediction_json
from tests.receiver import Receiver

TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "seconds": {"type": "number"}},
    "required": ["text"],
}
COUNT = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "seconds": {"type": "number"}, "fail": {"type": "boolean"}},
}


def test_a_capture_takes_only_its_own_threads_prints_and_log_records(capsys) -> None:
    """Two runs at once in two threads, and a thread outside any run: nothing crosses over."""
    log = logging.getLogger("tests.capture")
    log.setLevel(logging.INFO)
    captures = {name: capture.Capture() for name in ("a", "b")}
    barrier = threading.Barrier(3)

    def run(name: str) -> None:
        with capture.capturing(captures[name]):
            for i in range(50):
                print(f"{name}{i}")
                log.info("%s-logged-%d", name, i)
                if i == 10:
                    barrier.wait()

    def bystander() -> None:
        barrier.wait()
        print("bystander")

    threads = [threading.Thread(target=run, args=(n,)) for n in captures] + [threading.Thread(target=bystander)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, other in (("a", "b"), ("b", "a")):
        text = captures[name].text()
        assert text.count(f"\n{name}") >= 49 and f"{other}1" not in text and "bystander" not in text
        assert f"INFO tests.capture: {name}-logged-49\n" in text
    assert "bystander" in capsys.readouterr().out  # outside a run, output goes where it went
    sys.stdout.flush()


def test_outside_a_run_an_unhandled_warning_still_reaches_stderr(capsys, monkeypatch) -> None:
    with capture.capturing(capture.Capture()):
        pass  # installs the handler on the root logger
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [capture._handler])  # as in a worker: no other handler
    logging.getLogger("tests.nobody.handles.this").warning("still shown")
    assert "still shown" in capsys.readouterr().err


# --- The python runner, run as the worker runs it (claim, start, finish), in a thread --------


def free_model(name: str, predictor: str, schema: dict) -> ModelVersion:
    model = Model.objects.create(owner="test", name=name, price="0", is_free=True)
    return ModelVersion.objects.create(
        id=f"{name}-v1", model=model, runner="python", predictor=predictor, input_schema=schema
    )


def run_in_background(version: ModelVersion, inputs: dict, **options: Any) -> tuple[str, threading.Thread]:
    prediction = lifecycle.create(version, inputs, payment=None, settlement_policy="before_run", options=options)
    claimed = lifecycle.claim(prediction.id)
    assert claimed is not None

    def work() -> None:
        try:
            outcome = PythonRunner().start(claimed)
            lifecycle.finish(claimed.id, outcome, cause=lifecycle.Cause.TASK)
        finally:
            connection.close()

    thread = threading.Thread(target=work)
    thread.start()
    return prediction.id, thread


def seen_while_running(prediction_id: str, check: Callable[[Prediction], bool], timeout: float = 10) -> Prediction:
    """The prediction, still processing, once ``check`` holds (fails if it ended first)."""
    deadline = time.monotonic() + timeout
    while True:
        prediction = Prediction.objects.get(pk=prediction_id)
        assert prediction.status == "processing", (prediction.status, prediction.logs, prediction.output)
        if check(prediction):
            return prediction
        assert time.monotonic() < deadline, (prediction.logs, prediction.output)
        time.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_the_python_runner_reports_its_logs_while_it_runs(eager_celery, settings) -> None:
    settings.X402_WEBHOOK_ALLOW_PRIVATE = True
    version = free_model("talk", "tests.predictors.Talkative", TEXT)
    logs_hook, completed_hook = Receiver(), Receiver()
    quiet_id, quiet = run_in_background(
        version, {"text": "hush", "seconds": 0.1}, webhook=completed_hook.url, webhook_events_filter=["completed"]
    )
    prediction_id, thread = run_in_background(
        version, {"text": "hello", "seconds": 2}, webhook=logs_hook.url, webhook_events_filter=["logs"]
    )
    running = seen_while_running(prediction_id, lambda p: "warning about hello" in p.logs)
    assert "printed hello\n" in running.logs and "to stderr\n" in running.logs
    assert "INFO tests.predictors.talkative: info about hello\n" in running.logs
    assert "WARNING tests.predictors.talkative: warning about hello\n" in running.logs
    assert prediction_json(running, "http://x")["logs"] == running.logs
    hooks = logs_hook.wait(lambda bodies: any(b["status"] == "processing" and b["logs"] for b in bodies))
    assert any(b["status"] == "processing" and "printed hello" in b["logs"] for b in hooks), hooks
    thread.join(10)
    quiet.join(10)
    done = Prediction.objects.get(pk=prediction_id)
    assert done.status == "succeeded" and done.logs.endswith("done\n")
    assert "from another thread" not in done.logs and "hush" not in done.logs
    assert "hello" not in Prediction.objects.get(pk=quiet_id).logs
    # The filter holds: the "completed" receiver got the completed event and nothing else.
    assert [b["status"] for b in completed_hook.wait(lambda b: len(b) >= 1)] == ["succeeded"]
    time.sleep(0.3)
    assert len(completed_hook.bodies) == 1
    assert all(b["logs"] for b in logs_hook.bodies)


@pytest.mark.django_db(transaction=True)
def test_a_generator_predictor_records_each_piece_as_it_comes(eager_celery, settings) -> None:
    settings.X402_WEBHOOK_ALLOW_PRIVATE = True
    version = free_model("count", "tests.predictors.Countdown", COUNT)
    hook = Receiver()
    prediction_id, thread = run_in_background(
        version, {"n": 3, "seconds": 0.6}, webhook=hook.url, webhook_events_filter=["output"]
    )
    first = seen_while_running(prediction_id, lambda p: p.output is not None)
    assert first.output == [3] and "counting 3\n" in first.logs  # the logs before the piece came first
    seen_while_running(prediction_id, lambda p: p.output == [3, 2])
    thread.join(10)
    done = Prediction.objects.get(pk=prediction_id)
    assert done.status == "succeeded" and done.output == [3, 2, 1]
    assert done.logs == "counting 3\ncounting 2\ncounting 1\n"
    bodies = hook.wait(lambda b: len(b) >= 4)
    assert [b["output"] for b in bodies] == [[3], [3, 2], [3, 2, 1], [3, 2, 1]]  # pieces, then the end
    assert [b["status"] for b in bodies] == ["processing"] * 3 + ["succeeded"]


@pytest.mark.django_db(transaction=True)
def test_a_fast_generators_output_webhooks_are_throttled(eager_celery, settings) -> None:
    """Forty pieces in a few hundred ms: each is recorded, but output webhooks go out at most
    every 500 ms (as Replicate's); the completed webhook carries them all."""
    settings.X402_WEBHOOK_ALLOW_PRIVATE = True
    version = free_model("fast-count", "tests.predictors.Countdown", COUNT)
    hook = Receiver()
    prediction_id, thread = run_in_background(
        version, {"n": 40, "seconds": 0.01}, webhook=hook.url, webhook_events_filter=["output", "completed"]
    )
    thread.join(20)
    done = Prediction.objects.get(pk=prediction_id)
    assert done.status == "succeeded" and done.output == list(range(40, 0, -1))
    bodies = hook.wait(lambda b: b and b[-1]["status"] == "succeeded")
    running = [b["output"] for b in bodies if b["status"] == "processing"]
    assert running[0] == [40] and len(running) <= 1 + done.predict_time / 0.5, running  # not forty
    assert len(running) < 10
    assert bodies[-1]["output"] == list(range(40, 0, -1))


@pytest.mark.django_db(transaction=True)
def test_a_generator_that_fails_midway_fails_without_output() -> None:
    version = free_model("broken-count", "tests.predictors.Countdown", COUNT)
    prediction_id, thread = run_in_background(version, {"n": 4, "fail": True})
    thread.join(10)
    done = Prediction.objects.get(pk=prediction_id)
    assert done.status == "failed" and done.output is None
    assert done.error == "ValueError: lost count"
    assert done.logs.startswith("counting 4\ncounting 3\ncounting 2\n") and "Traceback" in done.logs


def test_output_shows_while_running_only_when_the_run_was_paid_before_it_started() -> None:
    """Streamed pieces are shown during the run under before_run (paid before it started), kept
    back under after_success until the payment confirms, and shown for a free run."""
    running = Prediction(status="processing", settlement_policy="before_run", payment_id=1)
    assert running.output_released
    running.settlement_policy = "after_success"
    assert not running.output_released
    running.payment_id = None
    assert running.output_released


# --- The Cog runner relays Cog's progress reports (its callback's ``logs`` and ``output``) ----


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("iterator", [True, False])
def test_cog_progress_callbacks_relay_logs_and_a_streaming_models_pieces(
    iterator, eager_celery, settings
) -> None:
    """The bodies are what Cog POSTs to a run's webhook while it runs (status ``processing``,
    the logs so far; a streaming model's output pieces so far; a plain model's output appears
    as a one-item list just before the end, and is not taken for a stream)."""
    from django.test import Client

    from predictions.runners import cog

    settings.X402_WEBHOOK_ALLOW_PRIVATE = True
    output_schema = {"type": "array", "items": {"type": "string"}, "x-cog-array-type": "iterator"}
    model = Model.objects.create(owner="test", name="cog-progress", price="0", is_free=True)
    version = ModelVersion.objects.create(
        id="cog-progress-v1",
        model=model,
        runner="cog",
        cog_url="http://127.0.0.1:9",
        input_schema=TEXT,
        output_schema=output_schema if iterator else {"type": "string"},
    )
    hook = Receiver()
    prediction = lifecycle.create(
        version, {"text": "x"}, payment=None, settlement_policy="before_run",
        options={"webhook": hook.url, "webhook_events_filter": ["logs", "output"]},
    )
    assert lifecycle.claim(prediction.id) is not None
    url = f"/internal/cog/{prediction.id}/{cog.callback_token(prediction.id)}"

    def report(body: dict) -> None:
        response = Client().post(url, data=body, content_type="application/json")
        assert response.status_code == 204

    report({"status": "processing", "logs": "loading\n", "output": None})
    report({"status": "processing", "logs": "loading\nword 1\n", "output": ["a "]})
    report({"status": "processing", "logs": "loading\n", "output": []})  # a late, older report
    running = Client().get(f"/v1/predictions/{prediction.id}").json()
    assert running["status"] == "processing" and running["logs"] == "loading\nword 1\n"
    assert running["output"] == (["a "] if iterator else None)
    report({"status": "succeeded", "logs": "loading\nword 1\nword 2\n", "output": ["a ", "b"] if iterator else "ab"})
    done = Client().get(f"/v1/predictions/{prediction.id}").json()
    assert done["status"] == "succeeded" and done["logs"].endswith("word 2\n")
    bodies = hook.wait(lambda b: len(b) >= (5 if iterator else 4))
    logs_seen = [b["logs"] for b in bodies if b["status"] == "processing"]
    assert logs_seen[:2] == ["loading\n", "loading\nword 1\n"]
    if iterator:
        assert [b["output"] for b in bodies if b["status"] == "processing"][-1] == ["a "]
    assert bodies[-1]["status"] == "succeeded"


# --- What a stream listener does with the messages it gets (predictions.streams) -------------


def test_a_listener_takes_messages_that_follow_on_and_reads_the_database_otherwise() -> None:
    from predictions.streams import Snapshot, StreamCursor

    snapshot = Snapshot(status="processing", logs="a\n", output=["x"], error="")
    assert snapshot.apply({"kind": "logs", "at": 2, "text": "b\npart"})
    assert snapshot.apply({"kind": "logs", "at": 0, "text": "a\n"})  # already known: nothing to do
    assert not snapshot.apply({"kind": "logs", "at": 20, "text": "z"})  # a gap: read the database
    assert not snapshot.apply({"kind": "logs"})  # a rewrite, said without text
    assert snapshot.apply({"kind": "output", "at": 1, "pieces": ["y", "z"]})
    assert not snapshot.apply({"kind": "output", "at": 5, "pieces": ["w"]})
    assert not snapshot.apply({"kind": "end"})
    assert (snapshot.logs, snapshot.output) == ("a\nb\npart", ["x", "y", "z"])
    cursor = StreamCursor()
    frames = b"".join(cursor.advance(snapshot)).decode()
    assert frames.count("event: logs") == 2 and "part" not in frames  # whole lines only, until the end
    assert [line for line in frames.splitlines() if line.startswith("data:")] == [
        "data: a", "data: b", "data: x", "data: y", "data: z"
    ]
    assert cursor.advance(snapshot) == []  # nothing new, nothing sent
    snapshot.status, snapshot.error = "failed", "it broke\nbadly"
    end = b"".join(cursor.advance(snapshot)).decode()
    assert "event: logs\n" in end and "data: part\n" in end
    assert 'event: error\n' in end and 'data: {"detail": "it broke\\nbadly"}\n' in end
    assert end.endswith('data: {"reason": "error"}\n\n') and cursor.advance(snapshot) == []
    ids = [line for line in (frames + end).splitlines() if line.startswith("id: ")]
    assert len(ids) == len(set(ids)) == 8
