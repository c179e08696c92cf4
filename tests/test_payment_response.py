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

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
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


@pytest.mark.parametrize(
    "status, unpaid_reason",
    [
        ("lapsing", "released"),  # an upto run charged nothing / a failed after_success run
        ("expired", "released"),  # the same once the authorization lapsed
        ("failed", "settlement_reverted"),  # a settlement that did not pay
    ],
)
def test_a_payment_that_will_not_be_charged_says_so_with_nothing_charged(
    demo_model, status: str, unpaid_reason: str
) -> None:
    """A released or unpaid payment is never ``settlement_pending`` with the signed maximum: it
    answers ``invalid_transaction_state`` and the amount charged, 0, and the SDK reads it."""
    from django.utils import timezone

    from payments.ledger import settlement_answer
    from payments.models import Payment
    from payments.x402.codec import encode_header
    from tests.test_finance import make_payment

    maximum = 2_000_000
    p = make_payment(demo_model, status=status, amount=maximum, created=timezone.now())
    Payment.objects.filter(pk=p.pk).update(unpaid_reason=unpaid_reason, settle_tx_hash=None)
    p.refresh_from_db()
    answer = settlement_answer(p)
    assert answer["success"] is False and answer["errorReason"] == "invalid_transaction_state"
    assert answer["amount"] == "0"
    read = x402HTTPClientSync(x402ClientSync()).get_payment_settle_response(
        {"PAYMENT-RESPONSE": encode_header(answer)}.get
    )
    assert read.success is False and read.error_reason == "invalid_transaction_state" and read.amount == "0"


def test_a_payment_still_on_its_way_is_pending_with_its_amount(demo_model) -> None:
    from django.utils import timezone

    from payments.ledger import settlement_answer
    from tests.test_finance import make_payment

    p = make_payment(demo_model, status="verified", amount=PRICE, created=timezone.now())
    answer = settlement_answer(p)
    assert (answer["success"], answer["errorReason"], answer["amount"]) == (False, "settlement_pending", str(PRICE))
