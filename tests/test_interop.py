"""Every official client pays us without special casing (issue: x402 conformance)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from eth_account import Account
from x402 import x402Client, x402ClientSync
from x402.http.clients import wrapRequestsWithPayment, x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client

from tests.conftest import poll_until_done, token_balance

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parent.parent
PRICE = 10_000
PATH = "/v1/models/demo/echo-text/predictions"


def _controls(chain) -> dict:
    return {
        "allowed_assets": [
            {"network": network, "asset": chain.asset, "max_amount_per_payment": str(PRICE)}
            for network in (chain.network, "anvil")  # v2 and v1 names of the local chain
        ]
    }


def test_sdk_httpx_async_client(chain_settings, demo_model, live_server, celery_worker_process) -> None:
    chain, payer = chain_settings, chain_settings.payers[6]
    client = x402Client()
    register_exact_evm_client(client, Account.from_key(payer["private_key"]))
    client.set_spend_controls(_controls(chain))
    before = token_balance(chain, payer["address"])

    async def pay() -> tuple[int, dict]:
        async with x402HttpxClient(client) as http:
            r = await http.post(f"{live_server.url}{PATH}", json={"input": {"text": "httpx"}})
            return r.status_code, r.json()

    status, body = asyncio.run(pay())
    assert status == 201, body
    assert poll_until_done(body["urls"]["get"])["output"] == "httpx"
    assert token_balance(chain, payer["address"]) == before - PRICE


@pytest.fixture
def sdk_knows_anvil_v1():
    """The SDK's v1 path knows networks by name only: teach it the local chain's name."""
    from x402.mechanisms.evm.v1 import constants

    constants.V1_NETWORK_CHAIN_IDS["anvil"] = 31337
    constants.V1_NETWORKS.append("anvil")  # in place: the SDK's register module holds this list
    yield
    constants.V1_NETWORKS.remove("anvil")
    del constants.V1_NETWORK_CHAIN_IDS["anvil"]


def test_sdk_v1_client(
    chain_settings, demo_model, live_server, celery_worker_process, sdk_knows_anvil_v1, monkeypatch
) -> None:
    """The SDK's v1 path, with the server's v2 header hidden so the client answers the v1 body."""
    chain, payer = chain_settings, chain_settings.payers[7]
    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key(payer["private_key"]))
    client.set_spend_controls(_controls(chain))

    transport_send = requests.adapters.HTTPAdapter.send

    def v1_only(self, request, **kw):  # the payment adapter's own transport, v2 header hidden
        response = transport_send(self, request, **kw)
        response.headers.pop("PAYMENT-REQUIRED", None)
        return response

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", v1_only)
    session = wrapRequestsWithPayment(requests.Session(), client)
    before = token_balance(chain, payer["address"])
    r = session.post(f"{live_server.url}{PATH}", json={"input": {"text": "v1"}}, timeout=30)
    assert r.status_code == 201, r.text
    assert "X-PAYMENT-RESPONSE" in r.headers and "PAYMENT-RESPONSE" not in r.headers
    assert poll_until_done(r.json()["urls"]["get"])["output"] == "v1"
    assert token_balance(chain, payer["address"]) == before - PRICE


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_x402_fetch_javascript_client(chain_settings, demo_model, live_server, celery_worker_process) -> None:
    """@x402/fetch pays; with ``Prefer: wait`` the PAYMENT-RESPONSE carries the settlement's
    hash, without it the answer is ``settlement_pending`` (settled after the answer), which the
    client accepts as well."""
    chain, payer = chain_settings, chain_settings.payers[0]
    before = token_balance(chain, payer["address"])
    results = []
    for flags in ([], ["--no-wait"]):
        done = subprocess.run(
            [
                "node",
                str(ROOT / "examples" / "agent_pay.mjs"),
                "--base-url",
                live_server.url,
                "--devchain",
                str(chain.path),
                "--payer",
                "0",
                *flags,
                "from javascript",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["status"] == "succeeded" and result["output"] == "from javascript"
        assert result["transaction"].startswith("0x")
        results.append(result)
    waited, at_once = (r["paymentResponse"] for r in results)
    assert waited["success"] is True and waited["transaction"] == results[0]["transaction"]
    assert at_once["success"] is False and at_once["errorReason"] == "settlement_pending"
    assert token_balance(chain, payer["address"]) == before - 2 * PRICE


def test_cors_preflight_and_exposed_headers(client) -> None:
    pre = client.options(
        PATH,
        headers={
            "Origin": "https://agent.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "payment-signature",
        },
    )
    assert pre.status_code == 204
    assert "PAYMENT-SIGNATURE" in pre["Access-Control-Allow-Headers"]
    assert "X-PAYMENT" in pre["Access-Control-Allow-Headers"]
    r = client.get("/v1/predictions/nothing", headers={"Origin": "https://agent.example"})
    for header in ("PAYMENT-REQUIRED", "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"):
        assert header in r["Access-Control-Expose-Headers"]
