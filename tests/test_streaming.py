"""Streaming under ASGI (uvicorn): ``stream: true`` and ``urls.stream`` in Replicate's
server-sent-event format, the official ``replicate`` client's ``stream`` paying through its
transport on the real chain, and ``Prefer: wait`` holding no worker while it waits."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from predictions.demo import seed
from predictions.models import Model, ModelVersion, Prediction
from tests.conftest import TEST_QUEUE, start_asgi_server, start_worker, token_balance
from tests.payers import v2_header_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PRICE = 10_000
COUNT = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "seconds": {"type": "number"}, "fail": {"type": "boolean"}},
}
SLEEPY = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "seconds": {"type": "number"}},
    "required": ["text"],
}


@pytest.fixture(scope="module")
def asgi(chain, django_db_setup, django_db_blocker, tmp_path_factory) -> Any:
    """uvicorn serving the project, and a real Celery worker (with beat) reporting to it."""
    from payments.chain import devchain

    logs = tmp_path_factory.mktemp("asgi")
    server, url = start_asgi_server(chain, logs / "uvicorn.log")
    worker = start_worker(chain, logs / "worker.log", TEST_QUEUE, beat=True, env={"X402_PUBLIC_URL": url})
    try:
        yield {"url": url, "pid": server.pid, "log": logs / "uvicorn.log"}
    finally:
        from x402site.celery import app

        devchain.stop(worker)
        devchain.stop(server)
        app.control.purge()  # runs still queued (the waiting test's) are not the next module's


def paid_create(chain, url: str, body: dict, payer: int, **headers: str) -> requests.Response:
    challenge = requests.post(url, json=body, headers=headers, timeout=30)
    assert challenge.status_code == 402, challenge.text
    header = v2_header_for(chain.payers[payer]["private_key"], challenge.headers["PAYMENT-REQUIRED"])
    return requests.post(url, json=body, headers={"PAYMENT-SIGNATURE": header, **headers}, timeout=90)


def read_events(url: str, timeout: float = 30) -> list[tuple[float, str, str, str]]:
    """(arrival time, event, id, data) of each server-sent event, until ``done``."""
    got: list[tuple[float, str, str, str]] = []
    with requests.get(url, headers={"Accept": "text/event-stream"}, stream=True, timeout=timeout) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        fields: dict[str, list[str]] = {}
        for line in response.iter_lines(decode_unicode=True):
            if line:
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value.removeprefix(" "))
                continue
            if "event" in fields:
                got.append((time.monotonic(), fields["event"][0], fields["id"][0], "\n".join(fields["data"])))
                if fields["event"][0] == "done":
                    return got
            fields = {}
    return got


def free_model(name: str, predictor: str, schema: dict) -> Model:
    model = Model.objects.create(owner="test", name=name, price="0", is_free=True)
    ModelVersion.objects.create(id=f"{name}-v1", model=model, predictor=predictor, input_schema=schema)
    return model


def test_the_official_replicate_client_streams_a_paid_generator(chain, asgi, settings) -> None:
    from replicate_agent import agent_client

    seed()
    payer = chain.payers[3]
    before = token_balance(chain, payer["address"])
    client = agent_client(asgi["url"], {"network": chain.network, "asset": chain.asset, "payers": chain.payers}, 3)
    arrivals: list[float] = []
    pieces: list[str] = []
    for event in client.stream("demo/stream-words", input={"text": "one two three four", "delay": 0.4}):
        if event.event.value == "output":
            arrivals.append(time.monotonic())
            pieces.append(str(event))
    assert "".join(pieces) == "one two three four"
    # Pieces arrive as they are made (0.4 s apart), not all at once when the run ends.
    assert arrivals[-1] - arrivals[0] >= 0.8, arrivals
    assert token_balance(chain, payer["address"]) == before - PRICE  # paid once, and got its result
    prediction = Prediction.objects.get()
    assert prediction.status == "succeeded" and prediction.output == ["one ", "two ", "three ", "four"]
    assert prediction.logs.splitlines() == [f"word {i} of 4" for i in range(1, 5)]
    assert prediction.payment.status == "confirmed"
    # By version ("owner/name:version": POST /v1/predictions), as replicate.stream also calls it.
    version = prediction.version_id
    by_version = [str(e) for e in client.stream(f"demo/stream-words:{version}", input={"text": "by version"})]
    assert "".join(by_version) == "by version"
    assert token_balance(chain, payer["address"]) == before - 2 * PRICE


def test_the_stream_speaks_replicates_events(chain, asgi) -> None:
    seed()
    url = f"{asgi['url']}/v1/models/demo/stream-words/predictions"
    created = paid_create(chain, url, {"input": {"text": "alpha beta", "delay": 0.2}, "stream": True}, 4)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["urls"]["stream"] == f"{asgi['url']}/v1/predictions/{body['id']}/stream"
    got = read_events(body["urls"]["stream"])
    kinds = [(event, data) for _, event, _, data in got]
    assert [k for k in kinds if k[0] == "output"] == [("output", "alpha "), ("output", "beta")]
    assert [k for k in kinds if k[0] == "logs"] == [("logs", "word 1 of 2"), ("logs", "word 2 of 2")]
    assert kinds[-1] == ("done", "{}")
    assert kinds.index(("logs", "word 1 of 2")) < kinds.index(("output", "alpha "))  # in the order made
    ids = [event_id for _, _, event_id, _ in got]
    assert len(set(ids)) == len(ids) and all(":" in i for i in ids)
    # A listener that comes after the end gets the whole story (logs first, then output), then done.
    again = [(event, data) for _, event, _, data in read_events(body["urls"]["stream"])]
    assert sorted(again[:-1]) == sorted(kinds[:-1]) and again[-1] == ("done", "{}")


def test_a_run_paid_after_success_streams_its_output_only_once_paid(chain, asgi) -> None:
    """Its logs stream as they come; its pieces are kept back until the payment confirms."""
    model = seed()[1]
    assert str(model) == "demo/stream-words"
    model.settlement_policy = "after_success"
    model.save()
    url = f"{asgi['url']}/v1/models/demo/stream-words/predictions"
    created = paid_create(chain, url, {"input": {"text": "kept back", "delay": 0.3}, "stream": True}, 5).json()
    got = [(event, data) for _, event, _, data in read_events(created["urls"]["stream"])]
    kinds = [event for event, _ in got]
    assert kinds == ["logs", "logs", "output", "output", "done"], got  # all the logs before any piece
    assert "".join(data for event, data in got if event == "output") == "kept back"
    assert Prediction.objects.get(pk=created["id"]).payment.status == "confirmed"


def test_a_streaming_cog_model_streams_through_its_progress_callbacks(chain, asgi, cog_stream_server) -> None:
    """A real Cog server running an iterator model: its callbacks bring the pieces and logs so
    far, which reach the stream while the run goes on."""
    from predictions.runners import cog

    input_schema, output_schema = cog.read_schemas(cog_stream_server["url"])  # as the admin reads them
    assert output_schema["x-cog-array-type"] == "iterator"
    model = Model.objects.create(owner="test", name="cog-words", price="0.01")
    ModelVersion.objects.create(
        id="cog-words-v1",
        model=model,
        runner="cog",
        cog_url=cog_stream_server["url"],
        input_schema=input_schema,
        output_schema=output_schema,
    )
    url = f"{asgi['url']}/v1/models/test/cog-words/predictions"
    created = paid_create(chain, url, {"input": {"text": "uno dos tres", "delay": 0.5}, "stream": True}, 7)
    assert created.status_code == 201, created.text
    got = read_events(created.json()["urls"]["stream"])
    outputs = [(at, data) for at, event, _, data in got if event == "output"]
    assert [data for _, data in outputs] == ["uno ", "dos ", "tres "]
    assert outputs[-1][0] - outputs[0][0] >= 0.5, outputs  # as Cog made them, not at the end
    assert [data for _, event, _, data in got if event == "logs"] == [f"streaming {w}" for w in ("uno", "dos", "tres")]
    assert got[-1][1:2] == ("done",) and got[-1][3] == "{}"
    done = Prediction.objects.get(pk=created.json()["id"])
    assert done.status == "succeeded" and done.output == ["uno ", "dos ", "tres "]


def test_a_failed_or_plain_prediction_streams_error_or_its_output_then_done(chain, asgi) -> None:
    free_model("countdown", "tests.predictors.Countdown", COUNT)
    free_model("sleepy", "tests.predictors.Sleepy", SLEEPY)
    failing = requests.post(
        f"{asgi['url']}/v1/models/test/countdown/predictions", json={"input": {"n": 4, "fail": True}, "stream": True}, timeout=10
    ).json()
    events = [(event, data) for _, event, _, data in read_events(failing["urls"]["stream"])]
    assert [d for e, d in events if e == "output"] == ["4", "3"]  # non-string pieces as JSON
    assert events[-2:] == [("error", json.dumps({"detail": "ValueError: lost count"})), ("done", '{"reason": "error"}')]
    plain = requests.post(
        f"{asgi['url']}/v1/models/test/sleepy/predictions", json={"input": {"text": "whole"}, "stream": True}, timeout=10
    ).json()
    events = [(event, data) for _, event, _, data in read_events(plain["urls"]["stream"])]
    assert events == [("output", "whole"), ("done", "{}")]


def test_the_stream_is_read_with_the_prediction_id_only(asgi) -> None:
    seed()
    missing = requests.get(f"{asgi['url']}/v1/predictions/{'x' * 32}/stream", timeout=10)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == "application/problem+json"
    posted = requests.post(f"{asgi['url']}/v1/predictions/{'x' * 32}/stream", timeout=10)
    assert posted.status_code == 405 and posted.headers["Allow"] == "GET"
    bad = requests.post(
        f"{asgi['url']}/v1/models/demo/stream-words/predictions", json={"input": {"text": "x"}, "stream": "yes"}, timeout=10
    )
    assert bad.status_code == 422 and "stream" in bad.json()["invalid_fields"]


def test_the_x402_mcp_client_pays_a_tool_call_over_the_sse_transport(chain, asgi) -> None:
    """``x402.mcp.create_x402_mcp_client`` speaks MCP's HTTP+SSE transport (``/mcp/sse``)."""
    import asyncio

    from eth_account import Account
    from x402 import x402Client
    from x402.mcp import create_x402_mcp_client
    from x402.mechanisms.evm.exact import register_exact_evm_client

    seed()
    payer = chain.payers[6]
    before = token_balance(chain, payer["address"])
    client = x402Client()
    register_exact_evm_client(client, Account.from_key(payer["private_key"]))
    client.set_spend_controls(
        {"allowed_assets": [{"network": chain.network, "asset": chain.asset, "max_amount_per_payment": "20000"}]}
    )

    async def call() -> Any:
        async with create_x402_mcp_client(client, f"{asgi['url']}/mcp") as session:
            listed = await session.list_tools()
            assert "demo__echo-text" in {tool.name for tool in listed.tools}
            return await session.call_tool("demo__echo-text", {"text": "over sse"})

    result = asyncio.run(call())
    assert result.payment_made and not result.is_error, result
    assert result.content[0].text == "over sse"
    assert result.payment_response is not None and result.payment_response.success
    assert token_balance(chain, payer["address"]) == before - PRICE
    prediction = Prediction.objects.get()
    assert prediction.status == "succeeded" and prediction.payment.payer == payer["address"]
    # Its message endpoint refuses what the REST API refuses.
    bad = requests.post(f"{asgi['url']}/mcp/messages/?session_id=00", data=b'{"a": NaN}', timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == -32700
    assert requests.post(f"{asgi['url']}/mcp/sse", timeout=10).status_code == 405


def test_waiting_requests_hold_no_worker(asgi) -> None:
    """Forty ``Prefer: wait`` requests wait at once (their runs queue behind two worker slots)
    while the server still answers at once; each waiter got its answer when the time was up."""
    free_model("nap", "tests.predictors.Sleepy", SLEEPY)
    url = f"{asgi['url']}/v1/models/test/nap/predictions"
    answers: list[tuple[float, dict]] = []

    def wait() -> None:
        started = time.monotonic()
        body = requests.post(
            url, json={"input": {"text": "zz", "seconds": 2}}, headers={"Prefer": "wait=4"}, timeout=30
        ).json()
        answers.append((time.monotonic() - started, body))

    waiters = [threading.Thread(target=wait) for _ in range(40)]
    for waiter in waiters:
        waiter.start()
    time.sleep(1.5)  # all of them are waiting now
    started = time.monotonic()
    assert requests.get(f"{asgi['url']}/v1/models", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0
    threads = len(list(Path(f"/proc/{asgi['pid']}/task").iterdir()))
    for waiter in waiters:
        waiter.join(30)
    assert len(answers) == 40
    finished = [body for _, body in answers if body["status"] == "succeeded"]
    assert finished and all(b["output"] == "zz" for b in finished)  # the first ones, within 4 s
    assert all(elapsed < 8 for elapsed, _ in answers)
    print(f"server threads while 40 requests waited: {threads}")
