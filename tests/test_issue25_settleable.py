"""Issue 25: what we accept we can settle, and a correct payment is never lost to our timing.

On anvil, through the gate and the run task (Celery eager: settlement and run inline):

- defect 3: a signature the chain cannot settle (v = 0/1) is refused before any run; a held
  payment (upto, ``after_success``) whose settlement would revert when its run is about to
  start is refused then (``refused_before_run``): no run, nothing charged;
- defect 9: on a chain idle for a while (its latest block older than ``validAfter``), a payment
  with ``validAfter`` = now - 1 s or = now settles (simulated in the pending block, waited out
  when just valid); a prediction whose payment goes unpaid before its run fails at once;
- defect 4: the facilitator API does not settle a payment the gate holds; a run that ends with
  its payment already confirmed is served;
- defect 5: a released ``after_success`` authorization that someone submits later is paid on
  chain and refunded, and the payment's answer says paid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client, override_settings
from eth_account import Account

from payments import ledger
from payments.chain import evidence, settlement
from payments.chain.devchain import DevChain
from payments.models import Payment, PaymentStatus, Refund, UnpaidReason
from payments.options import payment_options
from payments.schemes.exact import calldata as exact_calldata
from payments.x402.codec import decode_header, encode_header
from payments.x402.types import SCHEME_UPTO, PaymentOption, Requirement
from payments.x402.verify import PERMIT2_INVALID_SIGNATURE, SETTLEMENT_WOULD_REVERT
from predictions.models import ModelVersion, Prediction
from tests.conftest import fresh_payer, new_chain, rpc, token_balance
from tests.payers import sign_authorization, v2_header_for, v2_payload
from tests.test_settlement import send_as
from tests.test_upto_e2e import PATH as UPTO_PATH
from tests.test_upto_e2e import PER_SECOND, approved_payer
from tests.upto import sign_upto

pytestmark = [pytest.mark.chain, pytest.mark.django_db(transaction=True)]

URL = "/v1/models/demo/echo-text/predictions"
PRICE = 10_000
TOKEN = "issue25-facilitator-token"


@pytest.fixture
def per_second_model(db: None) -> Any:
    """The demo per-second model (its tier flushed by transactional tests: recreated)."""
    from payments.models import HardwareTier
    from predictions.demo import seed
    from predictions.models import Model

    HardwareTier.objects.get_or_create(
        slug="gpu-a100-80gb", defaults={"name": "A100", "price_per_second": PER_SECOND}
    )
    seed()
    return Model.objects.get(owner="demo", name="count-seconds")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChain]:
    """This module's own chain: the idle-chain tests need its clock to agree with ours, and a
    test elsewhere in the run may have moved the shared chain's timestamps ahead (the latest
    block would then never be older than a validAfter of now)."""
    yield from new_chain(tmp_path_factory)



def post(path: str, header: str | None = None, text: str = "hello") -> Any:
    """A POST to ``path``: the demo echo model's text, or (the upto model) as many seconds."""
    inputs = {"seconds": float(text)} if path == UPTO_PATH else {"text": text}
    headers = {"PAYMENT-SIGNATURE": header} if header else {}
    return Client().post(
        path, data=json.dumps({"input": inputs}), content_type="application/json", headers=headers
    )


def challenge(path: str = URL) -> str:
    return post(path, text="1" if path == UPTO_PATH else "hello")["PAYMENT-REQUIRED"]


def after_success(model: Any) -> None:
    model.settlement_policy = "after_success"
    model.save()


def transfer_data(to: str, amount: int) -> str:
    return "0xa9059cbb" + to[2:].lower().rjust(64, "0") + hex(amount)[2:].rjust(64, "0")


def drain(chain: Any, payer: dict[str, str]) -> None:
    """The payer moves its whole balance away (an unlocked fresh payer)."""
    balance = token_balance(chain, payer["address"])
    to = Account.create().address
    send_as(chain, payer["address"], chain.asset, transfer_data(to, balance))


def lapse_and_reconcile(monkeypatch: Any, p: Payment) -> None:
    monkeypatch.setattr(time, "time", lambda: p.valid_before + evidence.LAPSE_MARGIN_SECONDS + 1)
    settlement.reconcile_open()
    monkeypatch.undo()


# --- defect 3 -------------------------------------------------------------------------------------


def test_an_upto_permit_signed_with_v_0_or_1_is_refused_before_any_run(
    chain_settings,
    per_second_model,
    eager_celery,
) -> None:
    """Permit2's ecrecover takes v only as 27/28: a permit signed with v = 0/1 would verify (we
    normalised v to recover) and run, then never settle: free compute. Refused at the gate."""
    chain = chain_settings
    payer = approved_payer(chain)
    before = token_balance(chain, payer["address"])
    accepted = decode_header(challenge(UPTO_PATH))["accepts"][0]
    assert accepted["scheme"] == SCHEME_UPTO
    option = PaymentOption(chain.chain_id, chain.asset, "USD Coin", "2", chain.pay_to)
    req = Requirement(
        option,
        int(accepted["amount"]),
        hold_seconds=10,
        scheme=SCHEME_UPTO,
        facilitators=(chain.relayer_address,),
    )
    payload = sign_upto(payer["private_key"], req)
    sig = bytes.fromhex(payload["signature"][2:])
    payload["signature"] = "0x" + (sig[:64] + bytes([sig[64] - 27])).hex()
    response = post(
        UPTO_PATH, encode_header({"x402Version": 2, "accepted": accepted, "payload": payload}), "1"
    )
    assert response.status_code == 402, response.content
    assert decode_header(response["PAYMENT-REQUIRED"])["error"] == PERMIT2_INVALID_SIGNATURE
    assert Prediction.objects.count() == 0 and Payment.objects.count() == 0  # no run
    assert token_balance(chain, payer["address"]) == before


def test_a_held_payment_whose_settlement_would_revert_is_refused_at_the_gate(
    chain_settings, demo_model, monkeypatch
) -> None:
    """The payer's transfer of all its funds is pending when it pays: the chain checks (at the
    latest block) pass, but the settlement, simulated in the block it would be mined in,
    reverts: a 402 with the reason, no payment recorded, no run."""
    chain = chain_settings
    after_success(demo_model)
    started: list[Prediction] = []
    monkeypatch.setattr("predictions.scheduling.start_prediction", started.append)
    payer = fresh_payer(chain, PRICE)
    header = v2_header_for(payer["private_key"], challenge())
    rpc(chain.rpc_url, "anvil_setAutomine", [False])
    try:
        tx = {
            "from": payer["address"],
            "to": chain.asset,
            "data": transfer_data(Account.create().address, PRICE),
        }
        rpc(chain.rpc_url, "eth_sendTransaction", [tx])
        response = post(URL, header)
    finally:
        rpc(chain.rpc_url, "anvil_setAutomine", [True])
        rpc(chain.rpc_url, "evm_mine", [])
    assert response.status_code == 402, response.content
    assert decode_header(response["PAYMENT-REQUIRED"])["error"] == SETTLEMENT_WOULD_REVERT
    assert "exceeds balance" in response.json()["message"]
    assert Payment.objects.count() == 0 and Prediction.objects.count() == 0 and not started


def test_a_simulation_the_node_does_not_answer_is_not_a_revert(chain_settings, demo_model, monkeypatch) -> None:
    """Review of issue 25: a provider's error (a rate limit) on the settlement's simulation is
    not the chain refusing the payment: a 503 to retry, never a 402 that calls a correct
    payment unsettleable; nothing is recorded."""
    from django.test import override_settings

    from tests.conftest import option_settings
    from tests.rpc_proxy import rpc_proxy

    chain = chain_settings
    after_success(demo_model)
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    payer = fresh_payer(chain, PRICE)
    with rpc_proxy(chain.rpc_url) as proxy, override_settings(**option_settings(chain, rpc_url=proxy.url)):
        header = v2_header_for(payer["private_key"], challenge())
        proxy.mode = "limit_pending_calls"
        response = post(URL, header)
    assert response.status_code == 503, (response.content, proxy.calls)
    assert Payment.objects.count() == 0 and Prediction.objects.count() == 0


def test_an_after_success_payment_whose_settlement_would_revert_is_refused_before_its_run(
    chain_settings, demo_model, eager_celery
) -> None:
    """Accepted (201), then the payer moves its funds before the run starts: the settlement
    the run would end with is simulated before the run, reverts, and the prediction fails
    unstarted (``refused_before_run``); the model never ran, nothing was charged."""
    chain = chain_settings
    after_success(demo_model)
    payer = fresh_payer(chain, PRICE)
    from predictions import scheduling

    real = scheduling.enqueue_run

    def drain_then_run(prediction: Any) -> None:
        drain(chain, payer)
        real(prediction)

    scheduling.enqueue_run = drain_then_run
    try:
        response = post(URL, v2_header_for(payer["private_key"], challenge()))
    finally:
        scheduling.enqueue_run = real
    assert response.status_code == 201, response.content
    prediction = Prediction.objects.get()
    p = prediction.payment
    assert prediction.status == "failed" and prediction.started_at is None and prediction.output is None
    assert "refused before the run" in prediction.error
    assert p.status == PaymentStatus.LAPSING and p.unpaid_reason == UnpaidReason.REFUSED_BEFORE_RUN
    assert p.settle_tx_hash is None and p.settlement_tx is None
    shown = Client().get(f"/v1/predictions/{prediction.pk}").json()["payment"]
    assert shown["charged_atomic"] == "0"


def test_a_run_refused_before_it_started_is_not_run_by_a_retry(
    chain_settings, demo_model, eager_celery, monkeypatch
) -> None:
    """Refused before its run (the simulation reverts), but the chain has not yet said what the
    authorization became, so the prediction is still STARTING: the task's retry (or the sweep's
    re-queue) must not run it either."""
    from payments.chain import prerun
    from predictions import scheduling
    from predictions.tasks import run_prediction

    chain = chain_settings
    after_success(demo_model)
    payer = fresh_payer(chain, PRICE)
    monkeypatch.setattr(prerun, "resolve_lapsing", lambda payment_id: Payment.objects.get(pk=payment_id))
    real = scheduling.enqueue_run

    def drain_then_run(prediction: Any) -> None:
        drain(chain, payer)
        real(prediction)

    monkeypatch.setattr(scheduling, "enqueue_run", drain_then_run)
    response = post(URL, v2_header_for(payer["private_key"], challenge()))
    assert response.status_code == 201, response.content
    prediction = Prediction.objects.get()
    assert prediction.status == "starting" and prediction.payment.unpaid_reason == UnpaidReason.REFUSED_BEFORE_RUN
    assert run_prediction(prediction.pk) == "refused"  # the retry
    prediction.refresh_from_db()
    assert prediction.status == "starting" and prediction.started_at is None and prediction.output is None


def test_an_upto_payment_whose_settlement_would_revert_is_refused_before_its_run(
    chain_settings,
    per_second_model,
    eager_celery,
    monkeypatch,
) -> None:
    """The payer revokes Permit2's allowance between acceptance and the run: refused before the
    run, no compute given; once the permit lapses the ledger says FAILED (refused_before_run)."""
    chain = chain_settings
    payer = approved_payer(chain)
    accepted = decode_header(challenge(UPTO_PATH))["accepts"][0]
    option = PaymentOption(chain.chain_id, chain.asset, "USD Coin", "2", chain.pay_to)
    req = Requirement(
        option,
        int(accepted["amount"]),
        hold_seconds=10,
        scheme=SCHEME_UPTO,
        facilitators=(chain.relayer_address,),
    )
    header = encode_header(
        {"x402Version": 2, "accepted": accepted, "payload": sign_upto(payer["private_key"], req)}
    )
    from predictions import scheduling

    real = scheduling.enqueue_run

    def revoke_then_run(prediction: Any) -> None:
        send_as(
            chain,
            payer["address"],
            chain.asset,
            "0x095ea7b3" + chain.permit2[2:].lower().rjust(64, "0") + "0" * 64,
        )
        real(prediction)

    monkeypatch.setattr(scheduling, "enqueue_run", revoke_then_run)
    response = post(UPTO_PATH, header, "1")
    assert response.status_code == 201, response.content
    prediction = Prediction.objects.get()
    p = prediction.payment
    assert prediction.status == "failed" and prediction.started_at is None and prediction.predict_time is None
    assert p.status == PaymentStatus.LAPSING and p.unpaid_reason == UnpaidReason.REFUSED_BEFORE_RUN
    assert p.run_seconds is None and p.settle_tx_hash is None
    monkeypatch.undo()
    lapse_and_reconcile(monkeypatch, p)
    p.refresh_from_db()
    assert p.status == PaymentStatus.FAILED and p.unpaid_reason == UnpaidReason.REFUSED_BEFORE_RUN


# --- defect 9 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_per_tx"])
@pytest.mark.parametrize("valid_after_ago", [1, 0])
def test_a_correct_payment_settles_on_a_chain_idle_past_its_valid_after(
    chain_settings, demo_model, eager_celery, settings, valid_after_ago, batched
) -> None:
    """The chain mined nothing for a few seconds: its latest block is older than the payment's
    validAfter (now - 1 s, or now as the spec allows). Simulated at the latest block the
    settlement reverted "not yet valid" and the payment lapsed; it must settle and run, in
    batches or one payment per transaction."""
    settings.X402_BATCH_SETTLEMENT = batched
    chain = chain_settings
    payer = fresh_payer(chain, PRICE)
    time.sleep(3)  # the chain idles: no block is mined
    valid_after = int(time.time()) - valid_after_ago
    latest = int(rpc(chain.rpc_url, "eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
    assert latest < valid_after  # the premise
    response = post(URL, v2_header_for(payer["private_key"], challenge(), valid_after=valid_after), "idle")
    assert response.status_code == 201, response.content
    prediction = Prediction.objects.get()
    p = prediction.payment
    assert p.status == PaymentStatus.CONFIRMED, (p.status, p.failure_reason)
    assert prediction.status == "succeeded" and prediction.output == "idle"
    assert token_balance(chain, payer["address"]) == 0


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_per_tx"])
def test_a_payment_settles_on_a_node_whose_clock_lags_ours(
    chain_settings, demo_model, eager_celery, settings, batched
) -> None:
    """The node's clock is two seconds behind ours (anvil_setTime), so the block it would mine
    now comes before the payment's validAfter (now - 1 s) and its simulation says "not yet
    valid". A payment settled alone was asked again until valid; a batch left it VERIFIED for a
    later sweep (a CI run on a busy host lost the race this way). Both must settle and run."""
    settings.X402_BATCH_SETTLEMENT = batched
    chain = chain_settings
    payer = fresh_payer(chain, PRICE)
    time.sleep(3)  # no block after this one: the next block's timestamp follows the node's clock
    try:
        rpc(chain.rpc_url, "anvil_setTime", [int(time.time()) - 2])
        valid_after = int(time.time()) - 1
        response = post(URL, v2_header_for(payer["private_key"], challenge(), valid_after=valid_after), "lagging")
        assert response.status_code == 201, response.content
    finally:
        rpc(chain.rpc_url, "anvil_setTime", [int(time.time())])
    prediction = Prediction.objects.get()
    p = prediction.payment
    assert p.status == PaymentStatus.CONFIRMED, (p.status, p.failure_reason)
    assert prediction.status == "succeeded" and prediction.output == "lagging"
    mined = rpc(chain.rpc_url, "eth_getBlockByHash", [p.block_hash, False])
    assert int(mined["timestamp"], 16) > valid_after  # what the token requires
    assert token_balance(chain, payer["address"]) == 0


def test_a_prediction_whose_payment_goes_unpaid_before_its_run_fails_at_once(
    chain_settings, demo_model, eager_celery, monkeypatch
) -> None:
    """before_run: the payer moves its funds between acceptance and settlement; the settlement
    reverts and the payment is LAPSING. Its prediction must not stay ``starting``: it fails,
    with the reason, and later the ledger writes FAILED."""
    chain = chain_settings
    payer = fresh_payer(chain, PRICE)
    real = ledger.start_settlement

    def drain_then_settle(payment: Payment) -> None:
        drain(chain, payer)
        real(payment)

    monkeypatch.setattr(ledger, "start_settlement", drain_then_settle)
    response = post(URL, v2_header_for(payer["private_key"], challenge()))
    assert response.status_code == 201, response.content
    prediction = Prediction.objects.get()
    p = prediction.payment
    assert p.status == PaymentStatus.LAPSING and p.unpaid_reason == UnpaidReason.SIMULATION_REVERTED
    assert prediction.status == "failed" and "simulation reverted" in prediction.error
    monkeypatch.undo()
    lapse_and_reconcile(monkeypatch, p)
    p.refresh_from_db()
    prediction.refresh_from_db()
    assert p.status == PaymentStatus.FAILED and prediction.status == "failed"


# --- defect 4 -------------------------------------------------------------------------------------


def test_the_facilitator_api_does_not_settle_a_payment_the_gate_holds(
    chain_settings, demo_model, monkeypatch
) -> None:
    """The same proof as an agent's held after_success payment, sent to /facilitator/settle by
    anyone who saw it: not answered with our row, never settled early."""
    chain = chain_settings
    after_success(demo_model)
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)  # the run waits
    payer = chain.payers[5]
    before = token_balance(chain, payer["address"])
    req = Requirement(payment_options()[0], PRICE, hold_seconds=600)
    signed = sign_authorization(
        payer["private_key"], req, valid_before=int(time.time()) + req.max_timeout_seconds
    )
    response = post(URL, encode_header(v2_payload(req, signed)))
    assert response.status_code == 201, response.content
    body = {"x402Version": 2, "paymentPayload": v2_payload(req, signed), "paymentRequirements": req.v2()}
    with override_settings(X402_FACILITATOR_TOKENS=[TOKEN], X402_FACILITATOR_SETTLE_WAIT=5):
        answer = (
            Client()
            .post(
                "/facilitator/settle",
                data=json.dumps(body),
                content_type="application/json",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            .json()
        )
    assert answer["success"] is False and answer["errorReason"] != "settlement_pending", answer
    p = Payment.objects.get()
    assert p.status == PaymentStatus.VERIFIED and p.settle_tx_hash is None
    assert token_balance(chain, payer["address"]) == before


def test_a_run_whose_payment_is_already_confirmed_is_served(
    chain_settings, demo_model, eager_celery, monkeypatch
) -> None:
    """The held payment was settled before the run ended (by whomever): the run's success must
    release the output, since the confirmation that would release it has already come."""
    chain = chain_settings
    after_success(demo_model)
    from predictions import scheduling

    held: list[Prediction] = []
    monkeypatch.setattr(scheduling, "start_prediction", held.append)
    payer = chain.payers[5]
    response = post(URL, v2_header_for(payer["private_key"], challenge()), "early")
    assert response.status_code == 201, response.content
    p = Payment.objects.get()
    assert settlement.settle(p.pk).status == PaymentStatus.CONFIRMED  # settled before the run
    monkeypatch.undo()
    scheduling.start_prediction(held[0])  # the run, through its task
    prediction = Prediction.objects.get()
    assert prediction.status == "succeeded" and prediction.output == "early"


# --- defect 5 -------------------------------------------------------------------------------------


def test_a_released_authorization_someone_submits_later_is_refunded(
    chain_settings, demo_model, eager_celery
) -> None:
    """after_success, the run fails: the authorization is released (nothing charged). Someone
    who saw it submits it on chain: the ledger follows the chain to CONFIRMED, the answer says
    paid, and the payer is owed the money back."""
    chain = chain_settings
    after_success(demo_model)
    version = demo_model.latest_version
    ModelVersion.objects.create(
        id="e" * 64, model=demo_model, predictor="tests.predictors.Boom", input_schema=version.input_schema
    )
    payer = fresh_payer(chain, PRICE)
    response = post(URL, v2_header_for(payer["private_key"], challenge()), "boom")
    assert response.status_code == 201, response.content
    prediction = Prediction.objects.get()
    p = prediction.payment
    assert prediction.status == "failed" and p.status == PaymentStatus.LAPSING and p.is_released
    # Someone who saw it (here the payer itself) submits the released authorization.
    send_as(chain, payer["address"], chain.asset, exact_calldata(p))
    assert token_balance(chain, payer["address"]) == 0
    for _ in range(5):
        rpc(chain.rpc_url, "evm_mine", [])
    settlement.reconcile_open()
    p.refresh_from_db()
    assert p.status == PaymentStatus.CONFIRMED and p.unpaid_reason == ""
    answer = ledger.settlement_answer(p)
    assert answer["success"] is True and answer["transaction"] == p.settle_tx_hash
    refund = Refund.objects.get(payment=p)
    assert int(refund.amount) == PRICE and refund.recipient == p.payer
