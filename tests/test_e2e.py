"""End to end: the official x402 client pays a live server; a real Celery worker settles on
anvil and runs the prediction; balances move by exactly the price."""

from __future__ import annotations

import time

import pytest
import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm.exact import register_exact_evm_client

from payments.models import Payment, SettlementTx
from predictions.models import Prediction
from tests.conftest import poll_until_done, token_balance, transfer_count
from tests.payers import record

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PRICE = 10_000


def paying_session(chain, payer: dict) -> requests.Session:
    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key(payer["private_key"]))
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(PRICE)}
            ]
        }
    )
    return wrapRequestsWithPayment(requests.Session(), client)


def test_official_client_pays_and_worker_settles(
    chain_settings, demo_model, live_server, celery_worker_process
) -> None:
    chain = chain_settings
    payer = chain.payers[4]
    before_payer = token_balance(chain, payer["address"])
    before_pay_to = token_balance(chain, chain.pay_to)
    url = f"{live_server.url}/v1/models/demo/echo-text/predictions"

    started = time.monotonic()
    response = paying_session(chain, payer).post(url, json={"input": {"text": "end to end"}}, timeout=30)
    assert response.status_code == 201, response.text
    prediction = poll_until_done(response.json()["urls"]["get"])
    elapsed = time.monotonic() - started

    assert prediction["status"] == "succeeded", prediction
    assert prediction["output"] == "end to end"
    tx = prediction["payment"]["transaction"]
    receipt = requests.post(
        chain.rpc_url,
        json={"jsonrpc": "2.0", "id": 1, "method": "eth_getTransactionReceipt", "params": [tx]},
        timeout=5,
    ).json()["result"]
    assert int(receipt["status"], 16) == 1
    assert token_balance(chain, payer["address"]) == before_payer - PRICE
    assert token_balance(chain, chain.pay_to) == before_pay_to + PRICE
    print(f"paid prediction end to end in {elapsed:.2f}s")


def test_replayed_header_against_the_worker_runs_once(
    chain_settings, demo_model, live_server, celery_worker_process
) -> None:
    """The same signed header sent 100 times (32 at once) buys one prediction, one transfer."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from x402.http import x402HTTPClientSync

    chain = chain_settings
    payer = chain.payers[5]
    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key(payer["private_key"]))
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(PRICE)}
            ]
        }
    )
    http = x402HTTPClientSync(client)
    url = f"{live_server.url}/v1/models/demo/echo-text/predictions"
    body = {"input": {"text": "replay"}}
    challenge = requests.post(url, json=body, timeout=10)
    assert challenge.status_code == 402
    required = http.get_payment_required_response(challenge.headers.get, challenge.json())
    headers = http.encode_payment_signature_header(client.create_payment_payload(required))
    transfers_before = transfer_count(chain, chain.pay_to)

    barrier = threading.Barrier(32)

    def send(i: int) -> requests.Response:
        if i < 32:
            barrier.wait(10)  # the first 32 leave together
        for attempt in range(6):
            try:
                return requests.post(url, json=body, headers=headers, timeout=60)
            except requests.ConnectionError:  # the test server's listen backlog is 10: retry
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("the live server refused the connection six times")

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, range(100)))
    # Without a payment-identifier nothing tells a retry from a thief replaying a public
    # authorization: one 201, and every other answer a 402 that reveals nothing of it.
    assert [a.status_code for a in answers].count(201) == 1
    [first] = [a for a in answers if a.status_code == 201]
    refused = [a for a in answers if a.status_code != 201]
    # Refused with the reason; past 60 refusals a minute the client is also rate-limited (429).
    assert {a.status_code for a in refused} <= {402, 429}
    assert all(a.json()["error"] == "invalid_exact_evm_nonce_already_used" for a in refused if a.status_code == 402)
    assert any(a.status_code == 402 for a in refused)
    assert all(first.json()["id"] not in a.text for a in refused)
    prediction = poll_until_done(first.json()["urls"]["get"])
    assert prediction["status"] == "succeeded"
    assert Payment.objects.count() == 1 and Prediction.objects.count() == 1
    assert transfer_count(chain, chain.pay_to) == transfers_before + 1

    # With a payment-identifier (x402's idempotency key), every retry gets the one prediction.
    from payments.x402.codec import decode_header, encode_header

    fresh = http.encode_payment_signature_header(client.create_payment_payload(required))
    name = next(iter(fresh))
    payload = decode_header(fresh[name])
    payload["extensions"] = {"payment-identifier": {"info": {"required": False, "id": "retry_" + "a1b2" * 6}}}
    headers = {name: encode_header(payload)}
    barrier.reset()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, range(100)))
    assert [a.status_code for a in answers].count(201) == 1, [a.status_code for a in answers]
    assert {a.status_code for a in answers} == {200, 201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert Payment.objects.count() == 2 and Prediction.objects.count() == 2
    poll_until_done(answers[0].json()["urls"]["get"])
    assert transfer_count(chain, chain.pay_to) == transfers_before + 2


def test_worker_killed_between_signing_and_broadcast_settles_once(
    chain_settings, demo_model, celery_worker_process, tmp_path
) -> None:
    """SIGKILL a worker after it stored the signed settlement and before it broadcast it: the
    reconciler (another worker's beat) broadcasts that same transaction; money moves once and
    the prediction runs once."""
    import os
    import signal

    from django.db import transaction

    from payments.options import payment_options
    from payments.tasks import settle_payment
    from payments.x402.types import Requirement
    from tests.conftest import rpc, start_worker

    chain = chain_settings
    payer = chain.payers[3]
    req = Requirement(payment_options()[0], PRICE)
    payment = record(payer["private_key"], req, fingerprint="kill")
    with transaction.atomic():
        prediction = Prediction.objects.create(
            model=demo_model, version=demo_model.latest_version, input={"text": "survives"}, payment=payment
        )
    before = token_balance(chain, payer["address"])
    relayer_nonce = int(rpc(chain.rpc_url, "eth_getTransactionCount", [chain.relayer_address, "latest"]), 16)

    doomed_queue = f"{celery_worker_process['queue']}-doomed"
    doomed = start_worker(
        chain, tmp_path / "doomed.log", doomed_queue, beat=False, env={"X402_FAULT_PAUSE_AFTER_SIGN": "60"}
    )
    try:
        settle_payment.apply_async(args=[str(payment.pk)], queue=doomed_queue)
        deadline = time.monotonic() + 20
        while Payment.objects.get(pk=payment.pk).status == "verified" and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(doomed.pid, signal.SIGKILL)
    finally:
        doomed.wait(10)
    assert Payment.objects.get(pk=payment.pk).settlement_tx.raw_tx  # signed and stored before the kill

    finished = wait_for_prediction(prediction.pk)
    payment.refresh_from_db()
    assert payment.status == "confirmed" and finished.status == "succeeded" and finished.output == "survives"
    assert token_balance(chain, payer["address"]) == before - PRICE
    assert (
        int(rpc(chain.rpc_url, "eth_getTransactionCount", [chain.relayer_address, "latest"]), 16)
        == relayer_nonce + 1
    )


def wait_for_prediction(prediction_id: str, timeout: float = 20.0) -> Prediction:
    deadline = time.monotonic() + timeout
    while True:
        prediction = Prediction.objects.get(pk=prediction_id)
        if prediction.is_terminal or time.monotonic() > deadline:
            return prediction
        time.sleep(0.1)


def test_two_worker_processes_settle_many_payments_without_nonce_collisions(
    chain_settings, demo_model, celery_worker_process, tmp_path
) -> None:
    """Two more worker processes (four slots) and the module's worker settle 24 payments sharing
    one relayer, each task batching whatever is ready: every payment in exactly one transaction,
    all confirmed, the relayer's nonces contiguous."""
    from eth_account import Account

    from payments.chain import devchain
    from payments.options import payment_options
    from payments.tasks import settle_payment
    from payments.x402.types import Requirement
    from tests.conftest import rpc, send_as_mint, start_worker

    chain = chain_settings
    req = Requirement(payment_options()[0], PRICE)
    payments = []
    for _ in range(24):
        account = Account.create()
        send_as_mint(chain, account.address, PRICE)
        payments.append(record(account.key.hex(), req, fingerprint="two"))
    start = int(rpc(chain.rpc_url, "eth_getTransactionCount", [chain.relayer_address, "latest"]), 16)
    queue = celery_worker_process["queue"]
    workers = [start_worker(chain, tmp_path / f"w{i}.log", queue, beat=False) for i in range(2)]
    try:
        for p in payments:
            settle_payment.delay(str(p.pk))
        deadline = time.monotonic() + 60
        while Payment.objects.filter(pk__in=[p.pk for p in payments]).exclude(status="confirmed").exists():
            assert time.monotonic() < deadline, "settlements did not finish"
            time.sleep(0.2)
    finally:
        for w in workers:
            devchain.stop(w)
    txs = set(Payment.objects.filter(pk__in=[p.pk for p in payments]).values_list("settlement_tx", flat=True))
    assert None not in txs
    nonces = sorted(SettlementTx.objects.filter(pk__in=txs).values_list("nonce", flat=True))
    assert nonces == list(range(start, start + len(txs)))
    assert int(rpc(chain.rpc_url, "eth_getTransactionCount", [chain.relayer_address, "latest"]), 16) == start + len(txs)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert all("Task payments.tasks.settle_payment[" in log for log in logs)  # both did some
