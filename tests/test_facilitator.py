"""Facilitator mode, both directions, against the official SDK's client and facilitator."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from django.test import Client, override_settings
from eth_account import Account

from payments.chain import evidence
from payments.models import Payment
from payments.options import payment_options
from payments.tasks import reconcile
from payments.x402.codec import decode_header
from payments.x402.types import Requirement
from predictions.models import Prediction
from tests.conftest import fresh_payer, option_settings, send_as_mint, token_balance
from tests.payers import record, sign_authorization, v2_header, v2_payload
from tests.sdk_facilitator import serve_sdk_facilitator
from tests.test_settlement import send_as

pytestmark = [pytest.mark.django_db(transaction=True)]
PRICE = 10_000
TOKEN = "facilitator-test-token"


def pay_echo(key: str, req: Requirement, text: str):
    """A paid POST to the demo model, through the gate."""
    return Client().post(
        "/v1/models/demo/echo-text/predictions",
        data=json.dumps({"input": {"text": text}}),
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": v2_header(key, req)},
    )


@pytest.fixture
def facilitator_api(chain_settings):
    with override_settings(X402_FACILITATOR_TOKENS=[TOKEN], X402_FACILITATOR_SETTLE_WAIT=10):
        yield chain_settings


def _body(chain, payer_index: int, **kw) -> dict:
    req = Requirement(payment_options()[0], PRICE)
    payload = v2_payload(req, sign_authorization(chain.payers[payer_index]["private_key"], req, **kw))
    return {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": req.v2()}


def _post(path: str, body: dict, token: str | None = TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client().post(
        f"/facilitator/{path}", data=json.dumps(body), content_type="application/json", headers=headers
    )


def test_facilitator_api_is_off_without_tokens_and_refuses_strangers(chain_settings) -> None:
    assert Client().get("/facilitator/supported").status_code == 404
    with override_settings(X402_FACILITATOR_TOKENS=[TOKEN]):
        assert Client().get("/facilitator/supported").status_code == 403
        assert _post("verify", {}, token="wrong").status_code == 403


def test_our_facilitator_api_verifies_and_settles_once(facilitator_api) -> None:
    chain = facilitator_api
    supported = Client().get("/facilitator/supported", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert {"x402Version": 2, "scheme": "exact", "network": chain.network} in supported["kinds"]
    assert supported["signers"]["eip155:*"] == [chain.relayer_address]

    bad = _post("verify", _body(chain, 0, value=PRICE - 1)).json()
    assert bad["isValid"] is False
    assert bad["invalidReason"] == "invalid_exact_evm_payload_authorization_value_mismatch"

    body = _body(chain, 0)
    assert _post("verify", body).json() == {"isValid": True, "payer": chain.payers[0]["address"]}
    before = token_balance(chain, chain.pay_to)
    settled = _post("settle", body).json()
    assert settled["success"] is True and settled["transaction"].startswith("0x"), settled
    assert token_balance(chain, chain.pay_to) == before + PRICE
    # Once used on chain, the same proof is no longer valid: a replay neither verifies nor is
    # answered with the old hash (its client would take it as a new payment).
    assert _post("verify", body).json()["invalidReason"] == "invalid_exact_evm_nonce_already_used"
    again = _post("settle", body).json()
    assert again["success"] is False and again["errorReason"] == "invalid_exact_evm_nonce_already_used"
    assert again["transaction"] == ""
    assert token_balance(chain, chain.pay_to) == before + PRICE
    assert Payment.objects.get().verification == "facilitator-api"


def test_a_forged_proof_for_a_known_payer_and_nonce_is_invalid(facilitator_api) -> None:
    """Payer and nonce are public once a payment settles. A body that reuses them with another
    recipient and amount, and a signature nobody made, used to be answered isValid: true."""
    chain = facilitator_api
    body = _body(chain, 0)
    assert _post("settle", body).json()["success"] is True
    forged = json.loads(json.dumps(body))
    auth = forged["paymentPayload"]["payload"]["authorization"]
    thief = Account.create().address
    auth["to"], auth["value"] = thief, "1000000"
    forged["paymentPayload"]["payload"]["signature"] = "0x" + "11" * 65
    forged["paymentPayload"]["accepted"].update(payTo=thief, amount="1000000")
    forged["paymentRequirements"].update(payTo=thief, amount="1000000")
    verdict = _post("verify", forged).json()
    assert verdict["isValid"] is False, verdict
    assert verdict["invalidReason"] == "invalid_exact_evm_payload_signature"
    settle = _post("settle", forged).json()
    assert settle["success"] is False and settle["transaction"] == ""
    assert Payment.objects.count() == 1


def test_a_facilitator_failure_answer_does_not_outvote_the_chain(chain, demo_model, eager_celery) -> None:
    """The facilitator mined the settlement but answered failure (a timeout on its side): the
    ledger must book the payment as paid, with the hash that moved the money."""

    def lost_answer(answer: dict) -> dict:
        return {"success": False, "errorReason": "unexpected_settle_error", "transaction": "", "network": chain.network}

    with (
        serve_sdk_facilitator(chain.rpc_url, chain.spare_keys[0], chain.network, lost_answer) as (url, _),
        override_settings(**option_settings(chain, facilitator_url=url)),
    ):
        payer = fresh_payer(chain)
        before = token_balance(chain, payer["address"])
        response = pay_echo(payer["private_key"], Requirement(payment_options()[0], PRICE), "lost answer")
        assert response.status_code == 201, response.content
        prediction = Client().get(f"/v1/predictions/{response.json()['id']}").json()
        payment = Payment.objects.get()
    assert token_balance(chain, payer["address"]) == before - PRICE
    assert payment.status == "confirmed" and payment.settle_tx_hash
    assert prediction["status"] == "succeeded" and prediction["output"] == "lost answer"


def test_a_facilitator_hash_that_never_mines_is_resolved_from_the_chain(chain, demo_model, monkeypatch) -> None:
    """The facilitator reports one hash, but the transaction that lands is another (it replaced
    its own): when the reported one never mines, the chain shows what did."""
    from payments.chain import settlement

    def other_hash(answer: dict) -> dict:
        return {**answer, "transaction": "0x" + "ee" * 32}

    with (
        serve_sdk_facilitator(chain.rpc_url, chain.spare_keys[0], chain.network, other_hash) as (url, _),
        override_settings(**option_settings(chain, facilitator_url=url)),
    ):
        payer = fresh_payer(chain)
        response = pay_echo(payer["private_key"], Requirement(payment_options()[0], PRICE), "replaced")
        assert response.status_code == 201, response.content
        payment = settlement.settle(Payment.objects.get().pk, wait_seconds=0.2)
        assert payment.status == "settling" and payment.settle_tx_hash == "0x" + "ee" * 32
        monkeypatch.setattr(time, "time", lambda: payment.valid_before + evidence.LAPSE_MARGIN_SECONDS + 1)
        from x402site.celery import app

        app.conf.task_always_eager = True  # the run the payment bought, inline
        try:
            reconcile()
        finally:
            app.conf.task_always_eager = False
        payment.refresh_from_db()
    assert payment.status == "confirmed" and payment.settle_tx_hash != "0x" + "ee" * 32
    assert "replaced" in Prediction.objects.get().output


def test_official_facilitator_client_against_our_api(facilitator_api, live_server) -> None:
    from x402.http import HTTPFacilitatorClientSync
    from x402.http.facilitator_client_base import FacilitatorConfig
    from x402.schemas import parse_payment_payload, parse_payment_requirements

    chain = facilitator_api

    class Auth:
        def get_auth_headers(self):
            from x402.http.facilitator_client_base import AuthHeaders

            h = {"Authorization": f"Bearer {TOKEN}"}
            return AuthHeaders(verify=h, settle=h, supported=h)

    client = HTTPFacilitatorClientSync(
        FacilitatorConfig(url=f"{live_server.url}/facilitator", auth_provider=Auth())
    )
    body = _body(chain, 1)
    payload = parse_payment_payload(body["paymentPayload"])
    requirements = parse_payment_requirements(2, body["paymentRequirements"])
    assert client.get_supported().kinds
    assert client.verify(payload, requirements).is_valid is True
    result = client.settle(payload, requirements)
    assert result.success is True and result.transaction.startswith("0x")


@pytest.fixture
def via_sdk_facilitator(chain):
    """Settings whose payment option delegates to the official SDK's facilitator."""
    with (
        serve_sdk_facilitator(chain.rpc_url, chain.spare_keys[0], chain.network) as (url, calls),
        override_settings(**option_settings(chain, facilitator_url=url)),
    ):
        yield calls


def test_gate_delegates_to_the_sdk_facilitator(chain, via_sdk_facilitator, demo_model, eager_celery) -> None:
    calls = via_sdk_facilitator
    req = Requirement(payment_options()[0], PRICE)
    payer = chain.payers[2]
    before = token_balance(chain, payer["address"])
    response = pay_echo(payer["private_key"], req, "via sdk")
    assert response.status_code == 201, response.content
    prediction = Client().get(f"/v1/predictions/{response.json()['id']}").json()
    assert calls == ["/verify", "/settle"]
    assert prediction["status"] == "succeeded" and prediction["output"] == "via sdk"
    payment = Payment.objects.get()
    assert payment.verification == "facilitator" and payment.status == "confirmed"
    assert token_balance(chain, payer["address"]) == before - PRICE


def test_sdk_facilitator_refusal_is_a_402_with_its_reason(chain, via_sdk_facilitator, demo_model) -> None:
    from eth_account import Account

    req = Requirement(payment_options()[0], PRICE)
    response = pay_echo(Account.create().key.hex(), req, "x")
    assert response.status_code == 402
    assert decode_header(response["PAYMENT-REQUIRED"])["error"] == "invalid_exact_evm_insufficient_balance"
    assert Payment.objects.count() == 0


def test_facilitator_down_is_503(chain, demo_model) -> None:
    from tests.conftest import free_port

    with override_settings(**option_settings(chain, facilitator_url=f"http://127.0.0.1:{free_port()}")):
        req = Requirement(payment_options()[0], PRICE)
        response = pay_echo(chain.payers[3]["private_key"], req, "x")
    assert response.status_code == 503 and response["Retry-After"]
    assert Payment.objects.count() == 0


@pytest.fixture
def our_facilitator_process(chain, tmp_path):
    """This project run as a separate facilitator service (own database, own relayer key)."""
    import os
    import subprocess
    import sys

    import psycopg
    from django.conf import settings

    from payments.chain import devchain
    from tests.conftest import free_port

    name = settings.DATABASES["default"]["NAME"] + "_facilitator"  # this run's own (parallel runs)
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{name}",
        "X402_DEVCHAIN_FILE": str(chain.path),
        "X402_RELAYER_KEY": chain.spare_keys[1],
        "X402_FACILITATOR_TOKENS": TOKEN,
        "CACHE_URL": "redis://127.0.0.1:6379/12",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/12",
        "DJANGO_DEBUG": "true",
    }
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=root, env=env, check=True)
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=root,
        env=env,
        stdout=open(tmp_path / "facilitator.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/facilitator"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url + "/supported", timeout=1)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline and proc.poll() is None, (
                    tmp_path / "facilitator.log"
                ).read_text()
                time.sleep(0.1)
        yield url
    finally:
        devchain.stop(proc)
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.e2e
def test_gate_delegates_to_our_own_facilitator_service(
    chain, our_facilitator_process, demo_model, eager_celery
):
    with override_settings(
        **option_settings(chain, facilitator_url=our_facilitator_process, facilitator_auth=f"Bearer {TOKEN}")
    ):
        req = Requirement(payment_options()[0], PRICE)
        payer = chain.payers[4]
        before = token_balance(chain, payer["address"])
        response = pay_echo(payer["private_key"], req, "via our facilitator")
        assert response.status_code == 201, response.content
        prediction = Client().get(f"/v1/predictions/{response.json()['id']}").json()
    assert prediction["status"] == "succeeded" and prediction["output"] == "via our facilitator"
    payment = Payment.objects.get()
    assert payment.verification == "facilitator" and payment.status == "confirmed"
    receipt = requests.post(
        chain.rpc_url,
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "eth_getTransactionReceipt",
            "params": [payment.settle_tx_hash],
        },
        timeout=5,
    ).json()["result"]
    assert (
        receipt["from"].lower() == Account.from_key(chain.spare_keys[1]).address.lower()
    )  # their relayer paid gas
    assert token_balance(chain, payer["address"]) == before - PRICE


def test_a_zero_value_proof_is_invalid(facilitator_api) -> None:
    chain = facilitator_api
    req = Requirement(payment_options()[0], 0)
    payload = v2_payload(req, sign_authorization(chain.payers[0]["private_key"], req, value=0))
    body = {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": req.v2()}
    assert _post("verify", body).json()["invalidReason"] == "invalid_payment_requirements"
    assert _post("settle", body).json()["errorReason"] == "invalid_payment_requirements"
    assert Payment.objects.count() == 0


def test_a_failed_attempt_is_pending_not_failed_and_the_same_proof_retries(facilitator_api, monkeypatch) -> None:
    """The payer is short when we settle: the answer must not be a final "failed" (anyone may
    still submit the authorization); once the payer has the funds, the same proof settles."""
    from payments import verification

    chain = facilitator_api
    payer = fresh_payer(chain, amount=PRICE)
    req = Requirement(payment_options()[0], PRICE)
    body = {
        "x402Version": 2,
        "paymentPayload": v2_payload(req, sign_authorization(payer["private_key"], req)),
        "paymentRequirements": req.v2(),
    }
    real = verification.verify
    drain = "0xa9059cbb" + Account.create().address[2:].lower().rjust(64, "0") + hex(PRICE)[2:].rjust(64, "0")

    def verify_then_drain(*args, **kwargs):  # the payer moves the funds between verify and settle
        verified = real(*args, **kwargs)
        send_as(chain, payer["address"], chain.asset, drain)
        return verified

    monkeypatch.setattr(verification, "verify", verify_then_drain)
    first = _post("settle", body).json()
    monkeypatch.setattr(verification, "verify", real)
    assert first["success"] is False and first["errorReason"] == "settlement_pending", first
    assert Payment.objects.get().status == "lapsing"
    send_as_mint(chain, payer["address"], PRICE)
    again = _post("settle", body).json()
    assert again["success"] is True and again["transaction"].startswith("0x"), again
    assert Payment.objects.get().status == "confirmed"


def test_a_hanging_facilitator_is_backed_off(chain, demo_model) -> None:
    """An unknown settlement whose facilitator never answers costs its timeouts once, then the
    row backs off: the reconciler does not wait on it on every pass."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        with override_settings(**option_settings(chain)):
            p = record(fresh_payer(chain)["private_key"], Requirement(payment_options()[0], PRICE))
        Payment.objects.filter(pk=p.pk).update(status="settling")  # asked the facilitator, the answer lost
        with override_settings(**option_settings(chain, facilitator_url=url), X402_FACILITATOR_TIMEOUT_SECONDS=0.3):
            started = time.monotonic()
            first, second = reconcile(), reconcile()
            elapsed = time.monotonic() - started
        p.refresh_from_db()
        assert first["errors"] == 1 and p.reconcile_failures == 1 and p.reconcile_after is not None
        assert "errors" not in second and elapsed < 5
    finally:
        silent.close()
        Payment.objects.filter(status="settling").update(status="verified")  # a consistent ledger again
