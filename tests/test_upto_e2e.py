"""Pay per second (x402 ``upto``) end to end: the official SDK's upto client pays the demo
per-second model on a live server; a real Celery worker runs it for a measured time and settles
the charge through our upto proxy on anvil; balances move by exactly the charge, below the
maximum; the ledger and the export show both. And the refusals: a permit for another spender,
witness or token, a replayed permit nonce, a run past its time limit, a failed settlement."""

from __future__ import annotations

import csv
import io
import time
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
import requests
from django.core.management import call_command
from django.test import Client
from eth_account import Account

from payments.chain import devchain, evidence
from payments.ledger import settlement_answer
from payments.models import Payment, PaymentStatus, UnpaidReason
from payments.x402.codec import decode_header, encode_header
from predictions.demo import seed
from predictions.models import Model, Prediction
from tests.conftest import fresh_payer, poll_until_done, rpc, token_balance
from tests.upto import sign_upto

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

MODEL = "demo/count-seconds"
PATH = f"/v1/models/{MODEL}/predictions"
PER_SECOND = Decimal("0.0014")  # the A100 tier, no markup
MAXIMUM = 14_000  # 0.0014 USDC/s x the 10 s time limit


def upto_session(payer: dict[str, str], chain: Any) -> requests.Session:
    from x402 import x402ClientSync
    from x402.http.clients import wrapRequestsWithPayment
    from x402.mechanisms.evm.upto import UptoEvmClientScheme

    client = x402ClientSync()
    client.register("eip155:*", UptoEvmClientScheme(Account.from_key(payer["private_key"])))
    client.set_spend_controls(
        {"allowed_assets": [{"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(MAXIMUM)}]}
    )
    return wrapRequestsWithPayment(requests.Session(), client)


def charge_of(seconds: Decimal) -> int:
    return int((PER_SECOND * seconds).scaleb(6).to_integral_value(rounding=ROUND_CEILING))


def approved_payer(chain: Any) -> dict[str, str]:
    payer = fresh_payer(chain, 10**8)
    devchain.approve_permit2(chain.rpc_url, chain.asset, payer["address"])
    return payer


def export_rows(capsys: Any) -> list[dict[str, str]]:
    capsys.readouterr()
    call_command("export_ledger")
    lines = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    return [dict(zip(lines[0], r, strict=True)) for r in lines[1:] if r and r[0] != "TOTAL"]


@pytest.fixture
def per_second_model(db: None) -> Model:
    from payments.models import HardwareTier

    # Transactional tests flush the tiers the migrations seeded.
    HardwareTier.objects.get_or_create(slug="gpu-a100-80gb", defaults={"name": "A100", "price_per_second": PER_SECOND})
    seed()
    return Model.objects.get(owner="demo", name="count-seconds")


def test_the_402_offers_upto_first_with_the_time_limits_price(chain_settings, per_second_model) -> None:
    response = Client().post(PATH, {"input": {"seconds": 1}}, content_type="application/json")
    assert response.status_code == 402
    accepts = decode_header(response["PAYMENT-REQUIRED"])["accepts"]
    assert [a["scheme"] for a in accepts] == ["upto", "exact"]
    upto, exact = accepts
    assert upto["amount"] == str(MAXIMUM) and exact["amount"] == "7000"  # 10 s limit; 5 s quote
    assert upto["extra"]["facilitatorAddress"] == chain_settings.relayer_address
    assert upto["maxTimeoutSeconds"] >= 10  # held through the run
    # The operator's order: exact first.
    Model.objects.filter(pk=per_second_model.pk).update(upto_order="exact_first")
    response = Client().post(PATH, {"input": {"seconds": 1}}, content_type="application/json")
    assert [a["scheme"] for a in decode_header(response["PAYMENT-REQUIRED"])["accepts"]] == ["exact", "upto"]


def test_sdk_upto_client_pays_for_the_seconds_it_ran(
    chain_settings, per_second_model, live_server, celery_worker_process, capsys, staff
) -> None:
    chain = chain_settings
    payer = approved_payer(chain)
    before_payer, before_pay_to = token_balance(chain, payer["address"]), token_balance(chain, chain.pay_to)
    response = upto_session(payer, chain).post(
        f"{live_server.url}{PATH}", json={"input": {"seconds": 2}}, timeout=30
    )
    assert response.status_code == 201, response.text
    prediction = poll_until_done(response.json()["urls"]["get"], timeout=40)
    assert prediction["status"] == "succeeded", prediction
    assert prediction["output"]["seconds"] >= 2
    assert prediction["payment"]["charged_atomic"] == prediction["payment"]["amount_atomic"]

    p = Payment.objects.get(prediction__id=prediction["id"])
    assert (p.scheme, int(p.maximum)) == ("upto", MAXIMUM)
    assert Decimal(2) <= p.run_seconds < Decimal(4)
    actual = charge_of(p.run_seconds)
    assert int(p.amount) == actual < MAXIMUM
    assert p.status in (PaymentStatus.SETTLED, PaymentStatus.CONFIRMED)
    # Exactly the charge moved, not the maximum.
    assert token_balance(chain, payer["address"]) == before_payer - actual
    assert token_balance(chain, chain.pay_to) == before_pay_to + actual
    receipt = rpc(chain.rpc_url, "eth_getTransactionReceipt", [p.settle_tx_hash])
    assert receipt["to"].lower() == chain.upto_proxy.lower() and int(receipt["status"], 16) == 1
    [row] = [r for r in export_rows(capsys) if r["payment_id"] == str(p.pk)]
    assert (row["scheme"], row["maximum_atomic"], row["amount_atomic"]) == ("upto", str(MAXIMUM), str(actual))
    assert (row["charged_atomic"], row["charged"]) == (str(actual), str(Decimal(actual).scaleb(-6).quantize(Decimal("1e-6"))))
    assert row["maximum"] == "0.014000" and Decimal(row["run_seconds"]) == p.run_seconds
    # The revenue dashboard shows the maximum and the charge; the catalogue, the per-second offer.
    page = staff["finance"].get("/admin/payments/payment/dashboard/").content.decode()
    assert f'<td class="maximum">{Decimal(MAXIMUM).scaleb(-6)}</td>' in page  # 0.014000
    assert f'<td class="charged">{Decimal(actual).scaleb(-6)}</td>' in page
    catalogue = requests.get(f"{live_server.url}/v1/models/{MODEL}", timeout=10).json()["pricing"]["per_second"]
    assert catalogue["maximum"] == "0.014" and catalogue["price_per_second"] == "0.0014"
    with capsys.disabled():
        print(f"\nupto: ran {p.run_seconds}s, charged {actual} of at most {MAXIMUM} atomic units")

    # The same permit again: its nonce is spent in Permit2.
    header = encode_header(p.payload)
    again = requests.post(
        f"{live_server.url}{PATH}", json={"input": {"seconds": 2}}, headers={"PAYMENT-SIGNATURE": header}, timeout=30
    )
    assert again.status_code == 402
    assert decode_header(again.headers["PAYMENT-REQUIRED"])["error"] == "permit2_invalid_nonce"


def test_a_run_past_its_time_limit_is_stopped_and_charged_its_seconds_up_to_the_maximum(
    chain_settings, per_second_model, live_server, celery_worker_process
) -> None:
    """An agent asks for more than the time limit: the run is stopped at the limit and charged
    the seconds it ran (here the whole maximum), not the failure charge: the compute was used.
    The model's ``upto_failure_charge`` (the minimum here) is for failures on our side."""
    chain = chain_settings
    Model.objects.filter(pk=per_second_model.pk).update(upto_failure_charge="minimum", minimum_price=Decimal("0.001"))
    payer = approved_payer(chain)
    before = token_balance(chain, payer["address"])
    started = time.monotonic()
    response = upto_session(payer, chain).post(
        f"{live_server.url}{PATH}", json={"input": {"seconds": 30}}, timeout=30
    )
    assert response.status_code == 201, response.text
    prediction = poll_until_done(response.json()["urls"]["get"], timeout=40)
    assert prediction["status"] == "failed" and "time limit" in prediction["error"], prediction
    assert time.monotonic() - started < 25  # stopped near the 10 s limit, not after 30 s
    p = Payment.objects.get(prediction__id=prediction["id"])
    deadline = time.monotonic() + 20
    while p.status not in (PaymentStatus.SETTLED, PaymentStatus.CONFIRMED) and time.monotonic() < deadline:
        time.sleep(0.2)
        p.refresh_from_db()
    assert p.status in (PaymentStatus.SETTLED, PaymentStatus.CONFIRMED), (p.status, p.failure_reason)
    assert p.run_seconds is not None and p.run_seconds >= 9
    charged = min(MAXIMUM, charge_of(p.run_seconds))
    assert int(p.amount) == charged > 1_000  # the seconds it ran, never more than the maximum
    assert token_balance(chain, payer["address"]) == before - charged


def test_a_run_its_payer_cancels_is_charged_the_seconds_it_ran(
    chain_settings, per_second_model, live_server, celery_worker_process
) -> None:
    """The payer cancels a running pay-per-second run: it is stopped and charged the seconds it
    ran (the model charges nothing for a failure: that policy is for failures on our side)."""
    chain = chain_settings
    payer = approved_payer(chain)
    before = token_balance(chain, payer["address"])
    response = upto_session(payer, chain).post(f"{live_server.url}{PATH}", json={"input": {"seconds": 8}}, timeout=30)
    assert response.status_code == 201, response.text
    urls = response.json()["urls"]
    deadline = time.monotonic() + 20
    while requests.get(urls["get"], timeout=5).json()["status"] != "processing" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2)
    canceled = requests.post(urls["cancel"], timeout=10).json()
    assert canceled["status"] == "canceled", canceled
    p = Payment.objects.get(prediction__id=canceled["id"])
    deadline = time.monotonic() + 20
    while p.status not in (PaymentStatus.SETTLED, PaymentStatus.CONFIRMED) and time.monotonic() < deadline:
        time.sleep(0.2)
        p.refresh_from_db()
    assert p.status in (PaymentStatus.SETTLED, PaymentStatus.CONFIRMED), (p.status, p.failure_reason)
    assert Decimal(2) <= p.run_seconds < Decimal(6)
    assert int(p.amount) == charge_of(p.run_seconds) < MAXIMUM
    assert token_balance(chain, payer["address"]) == before - int(p.amount)


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("spender", "0x" + "ab" * 20, "invalid_permit2_spender"),
        ("to", "0x" + "ab" * 20, "invalid_permit2_recipient_mismatch"),
        ("facilitator", "0x" + "ab" * 20, "upto_facilitator_mismatch"),
        ("token", "0x" + "ab" * 20, "permit2_token_mismatch"),
    ],
)
def test_a_permit_for_another_spender_witness_or_token_is_refused(
    chain_settings, per_second_model, field, value, reason
) -> None:
    challenge = Client().post(PATH, {"input": {"seconds": 1}}, content_type="application/json")
    assert challenge.status_code == 402, challenge.content
    accepted = decode_header(challenge["PAYMENT-REQUIRED"])["accepts"][0]
    from payments.x402.types import SCHEME_UPTO, PaymentOption, Requirement

    option = PaymentOption(chain_settings.chain_id, chain_settings.asset, "USD Coin", "2", chain_settings.pay_to)
    req = Requirement(option, int(accepted["amount"]), hold_seconds=10, scheme=SCHEME_UPTO,
                      facilitators=(chain_settings.relayer_address,))
    payer = chain_settings.payers[6]
    payload = sign_upto(payer["private_key"], req, **{field: value})
    body = {"x402Version": 2, "accepted": accepted, "payload": payload}
    response = Client().post(
        PATH, {"input": {"seconds": 1}}, content_type="application/json", HTTP_PAYMENT_SIGNATURE=encode_header(body)
    )
    assert response.status_code == 402
    assert decode_header(response["PAYMENT-REQUIRED"])["error"] == reason
    assert not Payment.objects.exists()


def test_a_failed_settlement_is_a_clear_state_the_reconciler_finishes(
    chain_settings, per_second_model, eager_celery, monkeypatch
) -> None:
    """The payer revokes Permit2's allowance during the run: the settlement's simulation reverts,
    the payment is LAPSING with the reason; once the permit lapses the reconciler writes FAILED
    (the chain shows its nonce unused) and the held output is never served."""
    from payments.chain.settlement import reconcile_open

    chain = chain_settings
    payer = approved_payer(chain)
    challenge = Client().post(PATH, {"input": {"seconds": 0.2}}, content_type="application/json")
    accepted = decode_header(challenge["PAYMENT-REQUIRED"])["accepts"][0]
    from x402.mechanisms.evm.upto import UptoEvmClientScheme
    from x402.schemas import PaymentRequirements

    payload = UptoEvmClientScheme(Account.from_key(payer["private_key"])).create_payment_payload(
        PaymentRequirements(
            scheme="upto", network=accepted["network"], asset=accepted["asset"], amount=accepted["amount"],
            pay_to=accepted["payTo"], max_timeout_seconds=accepted["maxTimeoutSeconds"], extra=accepted["extra"],
        )
    )
    header = encode_header({"x402Version": 2, "accepted": accepted, "payload": payload})

    def revoke_then_run(original: Any) -> Any:
        def run(self: Any, seconds: float = 1.0) -> Any:
            token = "0x095ea7b3" + chain.permit2[2:].lower().rjust(64, "0") + "0" * 64  # approve(Permit2, 0)
            tx = rpc(chain.rpc_url, "eth_sendTransaction", [{"from": payer["address"], "to": chain.asset, "data": token}])
            while rpc(chain.rpc_url, "eth_getTransactionReceipt", [tx]) is None:
                time.sleep(0.02)
            return original(self, seconds)

        return run

    from predictions.runners.demo import CountSeconds

    # During the run (before it, its settlement's simulation refuses the payment: issue 25).
    monkeypatch.setattr(CountSeconds, "predict", revoke_then_run(CountSeconds.predict))
    response = Client().post(
        PATH, {"input": {"seconds": 0.2}}, content_type="application/json", HTTP_PAYMENT_SIGNATURE=header
    )
    assert response.status_code == 201, response.content
    p = Payment.objects.get()
    assert p.status == PaymentStatus.LAPSING
    assert p.unpaid_reason == UnpaidReason.SIMULATION_REVERTED and "simulation reverted" in p.failure_reason
    assert int(p.amount) < int(p.maximum) and p.run_seconds is not None
    prediction = Prediction.objects.get(payment=p)
    assert prediction.status == "processing" and prediction.run_ended_at is not None  # output held back
    reconcile_open()
    p.refresh_from_db()
    assert p.status == PaymentStatus.LAPSING  # the permit may still be settled: nothing decided yet
    monkeypatch.setattr(time, "time", lambda: p.valid_before + evidence.LAPSE_MARGIN_SECONDS + 1)
    reconcile_open()
    p.refresh_from_db()
    prediction.refresh_from_db()
    assert p.status == PaymentStatus.FAILED and p.unpaid_reason == UnpaidReason.SIMULATION_REVERTED
    assert prediction.status == "failed" and prediction.output is None
    assert token_balance(chain, chain.pay_to) >= 0  # nothing moved for it: the invariant check proves it


def test_a_failed_run_with_nothing_to_charge_moves_no_money(
    chain_settings, per_second_model, eager_celery, monkeypatch, capsys, staff
) -> None:
    """The model charges nothing for a failed run: the permit is released (no transaction), the
    payment ends EXPIRED with ``unpaid_reason`` released once the permit lapses; the run seconds
    are on the books."""
    from payments.chain.evidence import LAPSE_MARGIN_SECONDS
    from payments.chain.settlement import reconcile_open
    from predictions.runners.demo import CountSeconds

    def broken(self: Any, seconds: float = 1.0) -> dict[str, float]:
        raise RuntimeError("the GPU fell over")

    monkeypatch.setattr(CountSeconds, "predict", broken)
    chain = chain_settings
    payer = approved_payer(chain)
    before = token_balance(chain, payer["address"])
    challenge = Client().post(PATH, {"input": {"seconds": 1}}, content_type="application/json")
    accepted = decode_header(challenge["PAYMENT-REQUIRED"])["accepts"][0]
    from payments.x402.types import SCHEME_UPTO, PaymentOption, Requirement

    option = PaymentOption(chain.chain_id, chain.asset, "USD Coin", "2", chain.pay_to)
    req = Requirement(option, int(accepted["amount"]), hold_seconds=10, scheme=SCHEME_UPTO,
                      facilitators=(chain.relayer_address,))
    body = {"x402Version": 2, "accepted": accepted, "payload": sign_upto(payer["private_key"], req)}
    response = Client().post(
        PATH, {"input": {"seconds": 1}}, content_type="application/json", HTTP_PAYMENT_SIGNATURE=encode_header(body)
    )
    assert response.status_code == 201, response.content
    p = Payment.objects.get()
    prediction = Prediction.objects.get(payment=p)
    assert prediction.status == "failed" and "fell over" in prediction.error
    assert p.status == PaymentStatus.LAPSING and p.unpaid_reason == UnpaidReason.RELEASED
    assert p.settle_tx_hash is None and p.settlement_tx is None and p.run_seconds is not None
    # The create answered with the payment as it recorded it (its run came after, inline here);
    # the answer as it stands now (what a wait or MCP's _meta returns) says released, not
    # "pending" with the maximum.
    assert decode_header(response["PAYMENT-RESPONSE"])["errorReason"] == "settlement_pending"
    answer = settlement_answer(p)
    assert (answer["success"], answer["errorReason"], answer["amount"]) == (False, "invalid_transaction_state", "0")

    def charged_cell() -> str:
        page = staff["finance"].get("/admin/payments/payment/dashboard/").content.decode()
        return page.split('<td class="charged">', 1)[1].split("</td>", 1)[0]

    assert charged_cell() == "0"  # released: never charged (not "pending")
    shown = Client().get(f"/v1/predictions/{prediction.pk}").json()["payment"]
    assert (shown["amount_atomic"], shown["charged_atomic"], shown["charged"]) == (str(MAXIMUM), "0", "0.000000")
    monkeypatch.setattr(time, "time", lambda: p.valid_before + LAPSE_MARGIN_SECONDS + 1)
    reconcile_open()
    p.refresh_from_db()
    assert p.status == PaymentStatus.EXPIRED and p.unpaid_reason == UnpaidReason.RELEASED
    # amount keeps the signed maximum (amounts are positive); the export says nothing was charged.
    [row] = [r for r in export_rows(capsys) if r["payment_id"] == str(p.pk)]
    assert (row["amount_atomic"], row["charged_atomic"], row["charged"]) == (str(MAXIMUM), "0", "0.000000")
    assert charged_cell() == "0"
    assert token_balance(chain, payer["address"]) == before


def test_the_agent_example_pays_per_second(chain_settings, per_second_model, live_server, celery_worker_process) -> None:
    """examples/agent_pay_upto.py, as the README runs it against the quick start."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    chain = chain_settings
    payer = chain.payers[1]  # a demo payer: approved Permit2 when the chain was deployed
    before = token_balance(chain, payer["address"])
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "agent_pay_upto.py"), "1", "--base-url", live_server.url,
         "--devchain", str(chain.path), "--payer", "1"],
        capture_output=True, text=True, timeout=120, cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    p = Payment.objects.get(payer=payer["address"], scheme="upto")
    assert f"charged     {p.amount_decimal} USDC of at most {p.maximum_decimal}" in done.stdout, done.stdout
    assert token_balance(chain, payer["address"]) == before - int(p.amount)


def test_the_lane_the_permit_names_settles_it(chain_settings, per_second_model, eager_celery, settings) -> None:
    """With several relayer lanes, a permit naming the second as its facilitator is settled by
    that lane (the proxy would refuse any other sender)."""
    from tests.conftest import option_settings

    chain = chain_settings
    second = Account.from_key(chain.spare_keys[1])  # type: ignore[attr-defined]
    for name, value in option_settings(chain).items():
        setattr(settings, name, value)
    settings.X402_RELAYER_KEYS = [chain.relayer_private_key, chain.spare_keys[1]]  # type: ignore[attr-defined]
    challenge = Client().post(PATH, {"input": {"seconds": 0.1}}, content_type="application/json")
    accepted = decode_header(challenge["PAYMENT-REQUIRED"])["accepts"][0]
    assert accepted["extra"]["facilitatorAddress"] == chain.relayer_address  # the first lane is advertised
    from payments.x402.types import SCHEME_UPTO, PaymentOption, Requirement

    option = PaymentOption(chain.chain_id, chain.asset, "USD Coin", "2", chain.pay_to)
    req = Requirement(option, int(accepted["amount"]), hold_seconds=10, scheme=SCHEME_UPTO, facilitators=(second.address,))
    payer = approved_payer(chain)
    body = {"x402Version": 2, "accepted": accepted, "payload": sign_upto(payer["private_key"], req)}
    response = Client().post(
        PATH, {"input": {"seconds": 0.1}}, content_type="application/json", HTTP_PAYMENT_SIGNATURE=encode_header(body)
    )
    assert response.status_code == 201, response.content
    from payments.chain.settlement import reconcile_open

    p = Payment.objects.get()
    for _ in range(20):  # the batcher sent it alone; the reconciler follows its receipt
        if p.status == PaymentStatus.CONFIRMED:
            break
        reconcile_open()
        time.sleep(0.1)
        p.refresh_from_db()
    assert p.status == PaymentStatus.CONFIRMED, (p.status, p.failure_reason)
    receipt = rpc(chain.rpc_url, "eth_getTransactionReceipt", [p.settle_tx_hash])
    assert receipt["from"].lower() == second.address.lower()
    assert Prediction.objects.get(payment=p).status == "succeeded"


# --- A held authorization must outlast the run and its settlement (review C) -----------------------


def _paid_not_run(chain: Any, monkeypatch: Any, header_for: Any) -> Prediction:
    """A prediction paid with the header ``header_for(payer, PAYMENT-REQUIRED)`` builds, accepted
    and queued but not yet claimed (its run task is held back: the queue is long)."""
    from predictions import scheduling

    monkeypatch.setattr(scheduling, "enqueue_run", lambda prediction: None)
    challenge = Client().post(PATH, {"input": {"seconds": 1}}, content_type="application/json")
    header = header_for(challenge["PAYMENT-REQUIRED"])
    response = Client().post(
        PATH, {"input": {"seconds": 1}}, content_type="application/json", HTTP_PAYMENT_SIGNATURE=header
    )
    assert response.status_code == 201, response.content
    prediction = Prediction.objects.select_related("payment").latest("created_at")
    assert prediction.status == "starting" and prediction.payment.status == PaymentStatus.VERIFIED
    return prediction


def _upto_header(payer: dict[str, str], chain: Any) -> Any:
    from payments.x402.types import SCHEME_UPTO, PaymentOption, Requirement

    def header(payment_required: str) -> str:
        accepted = decode_header(payment_required)["accepts"][0]
        option = PaymentOption(chain.chain_id, chain.asset, "USD Coin", "2", chain.pay_to)
        req = Requirement(
            option, int(accepted["amount"]), hold_seconds=10, scheme=SCHEME_UPTO, facilitators=(chain.relayer_address,)
        )
        return encode_header({"x402Version": 2, "accepted": accepted, "payload": sign_upto(payer["private_key"], req)})

    return header


def _claimed_when_left(prediction: Prediction, seconds_left: int, monkeypatch: Any) -> Prediction | None:
    from predictions import lifecycle

    valid_before = prediction.payment.valid_before
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: valid_before - seconds_left)
        return lifecycle.claim(prediction.pk)


def test_an_upto_run_whose_permit_cannot_outlast_it_is_not_started_and_costs_nothing(
    chain_settings, per_second_model, monkeypatch
) -> None:
    """Claimed 10 s before the permit's deadline (a long queue): a 10 s run and its settlement
    cannot fit. It is not started, the permit is released, the prediction says why."""
    from payments.chain.evidence import LAPSE_MARGIN_SECONDS
    from payments.chain.settlement import reconcile_open

    chain = chain_settings
    payer = approved_payer(chain)
    before = token_balance(chain, payer["address"])
    prediction = _paid_not_run(chain, monkeypatch, _upto_header(payer, chain))
    assert _claimed_when_left(prediction, 10, monkeypatch) is None
    prediction.refresh_from_db()
    p = Payment.objects.get(pk=prediction.payment_id)
    assert prediction.status == "failed" and prediction.started_at is None, prediction.error
    assert "authorization expires" in prediction.error and "nothing was charged" in prediction.error
    assert p.status == PaymentStatus.LAPSING and p.unpaid_reason == UnpaidReason.RELEASED
    monkeypatch.setattr(time, "time", lambda: p.valid_before + LAPSE_MARGIN_SECONDS + 1)
    reconcile_open()
    p.refresh_from_db()
    assert p.status == PaymentStatus.EXPIRED and token_balance(chain, payer["address"]) == before


def test_an_upto_run_is_cut_to_what_its_permit_leaves(chain_settings, per_second_model, monkeypatch) -> None:
    """15 s before the deadline: 7 s are left once the settlement margin (6 s) and the watchdog's
    slack (2 s) are kept, over half the 10 s limit: the run starts with a 7 s limit."""
    chain = chain_settings
    prediction = _paid_not_run(chain, monkeypatch, _upto_header(approved_payer(chain), chain))
    claimed = _claimed_when_left(prediction, 15, monkeypatch)
    assert claimed is not None and claimed.status == "processing" and claimed.time_limit_seconds == 7
    event = claimed.events.get(to_status="processing")
    assert "cut from 10s" in event.detail["time_limit"]
    # With time to spare, the limit is the model's.
    other = _paid_not_run(chain, monkeypatch, _upto_header(approved_payer(chain), chain))
    claimed = _claimed_when_left(other, 30, monkeypatch)
    assert claimed is not None and claimed.time_limit_seconds == 10
    assert "time_limit" not in claimed.events.get(to_status="processing").detail


def test_an_after_success_run_whose_authorization_cannot_outlast_it_is_not_started(
    chain_settings, per_second_model, monkeypatch
) -> None:
    """The same for the exact scheme under ``after_success`` (its authorization is held)."""
    from tests.payers import v2_header_for

    Model.objects.filter(pk=per_second_model.pk).update(upto_order="off", settlement_policy="after_success")
    payer = fresh_payer(chain_settings)
    prediction = _paid_not_run(chain_settings, monkeypatch, lambda required: v2_header_for(payer["private_key"], required))
    assert prediction.payment.scheme == "exact" and prediction.settlement_policy == "after_success"
    assert _claimed_when_left(prediction, 12, monkeypatch) is None
    prediction.refresh_from_db()
    assert prediction.status == "failed" and "authorization expires" in prediction.error
    p = Payment.objects.get(pk=prediction.payment_id)
    assert p.status == PaymentStatus.LAPSING and p.unpaid_reason == UnpaidReason.RELEASED


def test_the_watchdog_charges_an_alive_run_past_its_limit_its_seconds_and_a_lost_one_nothing(
    chain_settings, per_second_model, celery_worker_process, monkeypatch
) -> None:
    """Two python runs start on their runner (``lifecycle.run_started``, as the runner confirms
    them; the real worker's watchdog is armed then) and never report: one whose limit was cut
    at the claim (7 s) and whose runner's watcher keeps beating (a predictor held in a long C
    call defers its runner's own stop, not its heartbeat), one with its full limit (10 s) and
    no sign of life (its worker died). At each limit the watchdog stops the alive one, charged
    its seconds (at most the maximum), settled on chain; the silent one was lost on our side:
    failed, charged the model's failure charge (nothing): its permit is released."""
    from predictions import lifecycle

    chain = chain_settings
    payers = [approved_payer(chain), approved_payer(chain)]
    before = [token_balance(chain, payer["address"]) for payer in payers]
    alive = _paid_not_run(chain, monkeypatch, _upto_header(payers[0], chain))
    assert _claimed_when_left(alive, 15, monkeypatch).time_limit_seconds == 7
    lost = _paid_not_run(chain, monkeypatch, _upto_header(payers[1], chain))
    assert _claimed_when_left(lost, 60, monkeypatch).time_limit_seconds == 10
    for prediction, left in ((alive, 15), (lost, 60)):
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda p=prediction, left=left: p.payment.valid_before - left)
            assert lifecycle.run_started(prediction.pk) == (7 if prediction is alive else 10)
    deadline = time.monotonic() + 30
    while Prediction.objects.filter(pk__in=[alive.pk, lost.pk], status="processing").exists():
        assert time.monotonic() < deadline, "the watchdog never ended them"
        lifecycle.record_alive(alive.pk)  # the alive run's heartbeat
        time.sleep(0.5)
    for prediction in (alive, lost):
        prediction.refresh_from_db()
    assert alive.status == lost.status == "failed"
    assert alive.events.get(to_status="failed").detail["run_end"] == "stopped" and "stopped" in alive.error
    assert lost.events.get(to_status="failed").detail["run_end"] == "failed" and "lost on our side" in lost.error
    paid, released = Payment.objects.get(prediction=alive), Payment.objects.get(prediction=lost)
    for _ in range(100):  # settled as it ended; the worker's reconciler follows its receipt
        if paid.status == PaymentStatus.CONFIRMED:
            break
        time.sleep(0.2)
        paid.refresh_from_db()
    assert paid.status == PaymentStatus.CONFIRMED, paid.failure_reason
    assert 7 <= paid.run_seconds < 12 and int(paid.amount) == min(MAXIMUM, charge_of(paid.run_seconds))
    assert token_balance(chain, payers[0]["address"]) == before[0] - int(paid.amount)
    assert released.status == PaymentStatus.LAPSING and released.unpaid_reason == UnpaidReason.RELEASED
    assert released.settle_tx_hash is None and token_balance(chain, payers[1]["address"]) == before[1]
