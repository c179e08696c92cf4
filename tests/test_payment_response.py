"""PAYMENT-RESPONSE tells the truth: never ``success: true`` without a transaction hash.

We settle after answering (in batches), so an immediate answer says ``settlement_pending``
(the x402 SDK's reason code for a settlement not yet final); with ``Prefer: wait`` the answer
comes once the prediction ran, which under ``before_run`` is after the payment was mined and
confirmed, and it carries the transaction's hash. The official x402 Python client reads both.
"""

from __future__ import annotations

import pytest
import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http import x402HTTPClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm.exact import register_exact_evm_client

from tests.conftest import fresh_payer, poll_until_done, rpc, token_balance

pytestmark = [pytest.mark.e2e, pytest.mark.chain, pytest.mark.django_db(transaction=True)]
PRICE = 10_000
PATH = "/v1/models/demo/echo-text/predictions"


def sdk_session(chain, key: str) -> tuple[requests.Session, x402HTTPClientSync]:
    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key(key))
    client.set_spend_controls(
        {"allowed_assets": [{"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(PRICE)}]}
    )
    return wrapRequestsWithPayment(requests.Session(), client), x402HTTPClientSync(client)


def test_pending_at_once_and_the_hash_after_prefer_wait(
    chain_settings, demo_model, live_server, celery_worker_process
) -> None:
    chain = chain_settings
    payer = fresh_payer(chain)
    before = token_balance(chain, payer["address"])
    session, http = sdk_session(chain, payer["private_key"])

    at_once = session.post(f"{live_server.url}{PATH}", json={"input": {"text": "now"}}, timeout=30)
    assert at_once.status_code == 201, at_once.text
    pending = http.get_payment_settle_response(at_once.headers.get)  # the SDK's own SettleResponse
    assert pending.success is False and pending.error_reason == "settlement_pending"
    assert pending.payer == payer["address"] and pending.amount == str(PRICE)
    assert pending.transaction == "" or pending.transaction.startswith("0x")  # broadcast, not yet mined
    done = poll_until_done(at_once.json()["urls"]["get"])
    assert done["output"] == "now" and done["payment"]["transaction"].startswith("0x")

    waited = session.post(
        f"{live_server.url}{PATH}", json={"input": {"text": "later"}}, headers={"Prefer": "wait=30"}, timeout=40
    )
    assert waited.status_code == 201 and waited.json()["status"] == "succeeded", waited.text
    settled = http.get_payment_settle_response(waited.headers.get)
    assert settled.success is True and settled.error_reason is None
    assert settled.transaction == waited.json()["payment"]["transaction"]
    receipt = rpc(chain.rpc_url, "eth_getTransactionReceipt", [settled.transaction])
    assert int(receipt["status"], 16) == 1
    assert token_balance(chain, payer["address"]) == before - 2 * PRICE
