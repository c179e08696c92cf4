"""The MCP server (Streamable HTTP at /mcp): tools from the catalogue, and paid tool calls that
go through the same gate, ledger and settlement as the REST API, driven by the official SDKs
(the ``mcp`` client and ``x402.mcp``) against a live server, a real Celery worker and anvil."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from eth_account import Account
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from x402 import x402Client
from x402.mcp.constants import MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY
from x402.mcp.utils import _extract_payment_required_from_object
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import parse_payment_required

from mcpserver import tools
from payments.models import Payment, PaymentStatus
from payments.x402.codec import decode_header
from predictions.models import Prediction
from tests.conftest import rpc, token_balance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from mcp_agent import call_paid_tool, tool_of  # noqa: E402

pytestmark = [pytest.mark.django_db(transaction=True)]

PRICE = 10_000  # demo/echo-text: 0.01 USDC
TOOL = "demo__echo-text"


@asynccontextmanager
async def mcp_session(url: str):  # type: ignore[no-untyped-def]
    """The official MCP client over Streamable HTTP."""
    async with streamable_http_client(f"{url}/mcp") as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def run(url: str, body: Callable[[ClientSession], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with mcp_session(url) as session:
            return await body(session)

    return asyncio.run(main())


def payment_client(chain, payer: dict[str, str]) -> x402Client:  # type: ignore[no-untyped-def]
    """The official x402 client, allowed to spend the test token."""
    client = x402Client()
    register_exact_evm_client(client, Account.from_key(payer["private_key"]))
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(PRICE)}
            ]
        }
    )
    return client


def test_one_tool_per_model_with_its_schema_and_price_and_free_catalogue_tools(
    chain_settings, demo_model, live_server
) -> None:
    async def body(session: ClientSession) -> tuple[Any, Any, Any]:
        listed = await session.list_tools()
        models = await session.call_tool("list_models", {})
        missing = await session.call_tool("get_prediction", {"id": "nope"})
        return listed, models, missing

    listed, models, missing = run(live_server.url, body)
    tools = {t.name: t for t in listed.tools}
    assert {"list_models", "get_prediction", TOOL} <= set(tools)
    version = demo_model.latest_version
    assert tools[TOOL].inputSchema == version.input_schema
    assert "0.01 USDC per run" in tools[TOOL].description
    assert not models.isError
    [echo] = [m for m in models.structuredContent["models"] if m["tool"] == TOOL]
    assert echo["pricing"]["accepts"][0]["amount"] == str(PRICE)
    assert missing.isError and missing.structuredContent["status"] == 404


def test_an_unpaid_call_gets_the_payment_requirements_of_the_rest_402(
    chain_settings, demo_model, live_server
) -> None:
    result = run(live_server.url, lambda s: s.call_tool(TOOL, {"text": "unpaid"}))
    assert result.isError
    required = result.structuredContent
    assert required == json.loads(result.content[0].text)
    assert required["x402Version"] == 2 and required["resource"]["url"] == f"mcp://tool/{TOOL}"
    # Our requirements, as the REST API's 402 for the same input carries them.
    rest = requests.post(
        f"{live_server.url}/v1/models/demo/echo-text/predictions", json={"input": {"text": "unpaid"}}, timeout=10
    )
    assert rest.status_code == 402
    assert required["accepts"] == decode_header(rest.headers["PAYMENT-REQUIRED"])["accepts"]
    assert required["accepts"][0]["amount"] == str(PRICE)
    assert required["accepts"][0]["payTo"] == chain_settings.pay_to
    # ...in the shape the x402 SDK's MCP client reads.
    assert _extract_payment_required_from_object(required) is not None
    assert (tools.MCP_PAYMENT_META_KEY, tools.MCP_PAYMENT_RESPONSE_META_KEY) == (
        MCP_PAYMENT_META_KEY,
        MCP_PAYMENT_RESPONSE_META_KEY,
    )
    # Bad input is refused before any payment is asked for, with the API's field errors.
    invalid = run(live_server.url, lambda s: s.call_tool(TOOL, {"text": 5}))
    assert invalid.isError and invalid.structuredContent["invalid_fields"] == {"text": "5 is not of type 'string'"}
    assert Payment.objects.count() == 0 and Prediction.objects.count() == 0


def test_the_official_x402_mcp_client_pays_a_tool_call_end_to_end(
    chain_settings, demo_model, live_server, celery_worker_process
) -> None:
    """Through examples/mcp_agent.py: the SDK's x402MCPSession over Streamable HTTP."""
    chain = chain_settings
    payer = chain.payers[6]
    before = token_balance(chain, payer["address"])
    before_pay_to = token_balance(chain, chain.pay_to)
    allowed = {"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(PRICE)}

    started = time.monotonic()
    result = asyncio.run(
        call_paid_tool(
            live_server.url,
            tool_of("demo/echo-text"),
            {"text": "hello mcp"},
            Account.from_key(payer["private_key"]),
            allowed,
        )
    )

    print(f"paid MCP tool call end to end (probe, sign, settle, run) in {time.monotonic() - started:.2f}s")
    assert result.payment_made and not result.is_error, result.content
    assert result.content[0].text == "hello mcp"
    settled = result.payment_response
    assert settled.success and settled.payer == payer["address"]
    receipt = rpc(chain.rpc_url, "eth_getTransactionReceipt", [settled.transaction])
    assert int(receipt["status"], 16) == 1
    assert token_balance(chain, payer["address"]) == before - PRICE
    assert token_balance(chain, chain.pay_to) == before_pay_to + PRICE
    [payment] = Payment.objects.all()
    assert payment.status in (PaymentStatus.SETTLED, PaymentStatus.CONFIRMED)
    assert payment.resource == f"mcp://tool/{TOOL}" and payment.settle_tx_hash == settled.transaction
    [prediction] = Prediction.objects.all()
    assert prediction.payment == payment and prediction.output == "hello mcp"
    assert result.raw_result.structuredContent["id"] == prediction.id


def test_a_replayed_payment_is_refused_and_reveals_nothing(
    chain_settings, demo_model, live_server, celery_worker_process
) -> None:
    """As over REST: the same payment again buys nothing, unless it is an idempotent retry
    (the same payment-identifier and payload for the same call), which gets the same prediction."""
    chain = chain_settings
    client = payment_client(chain, chain.payers[7])

    async def pay(session: ClientSession, text: str, identifier: str | None = None) -> dict[str, Any]:
        unpaid = await session.call_tool(TOOL, {"text": text})
        payload = await client.create_payment_payload(parse_payment_required(unpaid.structuredContent))
        body = payload.model_dump(by_alias=True, exclude_none=True)
        if identifier:
            body["extensions"] = {"payment-identifier": {"info": {"id": identifier}}}
        return {MCP_PAYMENT_META_KEY: body}

    async def body(session: ClientSession) -> list[Any]:
        meta = await pay(session, "once")
        first = await session.call_tool(TOOL, {"text": "once"}, meta=meta)
        again = await session.call_tool(TOOL, {"text": "once"}, meta=meta)
        keyed = await pay(session, "retried", identifier="mcp-retry-0123456789")
        retried = [await session.call_tool(TOOL, {"text": "retried"}, meta=keyed) for _ in range(2)]
        return [first, again, *retried]

    first, again, *retried = run(live_server.url, body)
    assert not first.isError and first.content[0].text == "once"
    assert again.isError
    assert again.structuredContent["error"] == "invalid_exact_evm_nonce_already_used"
    assert again.structuredContent["accepts"][0]["amount"] == str(PRICE)  # a fresh challenge
    assert first.structuredContent["id"] not in json.dumps(again.structuredContent)
    assert [r.content[0].text for r in retried] == ["retried", "retried"]
    assert retried[0].structuredContent["id"] == retried[1].structuredContent["id"]
    assert Payment.objects.count() == 2 and Prediction.objects.count() == 2


def test_hostile_or_misdirected_payments_get_a_fresh_challenge(chain_settings, demo_model, live_server) -> None:
    """A payment in _meta meets the REST gate's checks: undecodable or mistyped payloads are
    invalid_payload, and a payment made for another resource (here the REST endpoint) is refused."""
    from payments.options import configured
    from payments.x402.types import Requirement
    from tests.payers import sign_authorization, v2_payload

    requirement = Requirement(configured()[0].option, PRICE)
    rest_url = f"{live_server.url}/v1/models/demo/echo-text/predictions"
    for_rest = v2_payload(
        requirement, sign_authorization(chain_settings.payers[2]["private_key"], requirement), rest_url
    )
    payments = ["not json", {"x402Version": 2}, [1, 2], "x" * 20_000, for_rest]

    async def body(session: ClientSession) -> list[Any]:
        return [
            await session.call_tool(TOOL, {"text": "x"}, meta={MCP_PAYMENT_META_KEY: payment})
            for payment in payments
        ]

    results = run(live_server.url, body)
    assert all(r.isError and r.structuredContent["accepts"] for r in results)
    assert [r.structuredContent["error"] for r in results] == [
        *["invalid_payload"] * 4,
        "invalid_payment_resource_mismatch",
    ]
    assert Payment.objects.count() == 0 and Prediction.objects.count() == 0


def test_a_server_fault_is_an_error_result_that_reveals_nothing(
    chain_settings, demo_model, live_server, monkeypatch
) -> None:
    def broken(name: str) -> None:
        raise RuntimeError("postgres://secret@db-7/ledger")

    monkeypatch.setattr(tools, "model_of", broken)
    result = run(live_server.url, lambda s: s.call_tool(TOOL, {"text": "x"}))
    assert result.isError and result.structuredContent["status"] == 500
    assert "secret" not in result.content[0].text


def test_operators_run_paid_tools_without_payment(chain_settings, demo_model, live_server, settings) -> None:
    """As over REST, a bearer token from X402_OPERATOR_TOKENS runs without payment; the call
    answers after at most X402_MCP_WAIT_SECONDS, with the output or where the prediction stands."""
    import httpx

    settings.X402_OPERATOR_TOKENS = ["op-mcp-token"]
    settings.X402_MCP_WAIT_SECONDS = 1

    async def main() -> Any:
        headers = {"Authorization": "Bearer op-mcp-token"}
        async with (
            httpx.AsyncClient(headers=headers) as http,
            streamable_http_client(f"{live_server.url}/mcp", http_client=http) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await session.call_tool(TOOL, {"text": "staff"})

    result = asyncio.run(main())
    assert not result.isError, result.content
    [prediction] = Prediction.objects.all()
    assert prediction.payment is None and result.structuredContent["id"] == prediction.id
    # The output if this module's worker ran it within the second, else where to read it later.
    text = result.content[0].text
    assert text == "staff" or text.endswith(f"; read it later with get_prediction(id={prediction.id!r}).")
    assert Payment.objects.count() == 0


def test_bodies_are_held_to_the_rest_rules(chain_settings, demo_model, live_server) -> None:
    """NUL in a string (PostgreSQL stores none), lone surrogates, NaN, deep nesting: a JSON-RPC
    parse error (400) before any tool runs, as the REST API refuses such bodies."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}

    def call(arguments: str) -> requests.Response:
        body = (
            '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
            f'"params": {{"name": "get_prediction", "arguments": {arguments}}}}}'
        )
        return requests.post(f"{live_server.url}/mcp", data=body.encode(), headers=headers, timeout=10)

    for arguments in ('{"id": "a\\u0000b"}', '{"id": "\\ud800"}', '{"id": NaN}', '{"id": ' + "[" * 40 + "]" * 40 + "}"):
        answer = call(arguments)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == -32700, (arguments, answer.text)
    assert call('{"id": "nope"}').json()["result"]["structuredContent"]["status"] == 404
