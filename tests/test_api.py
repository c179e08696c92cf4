"""The paid predictions API through Django's test client, on the real anvil chain.

Celery runs eagerly here (settlement and the run happen inline); tests/test_e2e.py covers the
same path with a real worker process and the official x402 client.
"""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client, override_settings

from payments.models import Payment, PaymentEvent
from payments.options import payment_options
from payments.x402.codec import decode_header
from payments.x402.types import Requirement
from predictions.models import Prediction
from tests.conftest import free_port, option_settings, rpc, token_balance, transfer_count
from tests.payers import v1_header, v2_header

URL = "/v1/models/demo/echo-text/predictions"
PRICE = 10_000  # 0.01 USDC


def post(client: Client, body: object, **headers: str):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(URL, data=data, content_type="application/json", headers=headers)


def requirement(hold_seconds: int = 0) -> Requirement:
    return Requirement(payment_options()[0], PRICE, hold_seconds=hold_seconds)


def held_header(key: str) -> str:
    """A payment for the demo model under after_success: valid through its 600 s time limit."""
    import time

    req = requirement(hold_seconds=600)
    return v2_header(key, req, valid_before=int(time.time()) + req.max_timeout_seconds)


pytestmark = [pytest.mark.django_db(transaction=True)]


def test_unpaid_request_gets_a_v2_header_and_a_v1_body(offline_options, demo_model) -> None:
    response = post(Client(), {"input": {"text": "hi"}})
    assert response.status_code == 402
    assert response["Cache-Control"] == "no-store"
    v2 = decode_header(response["PAYMENT-REQUIRED"])
    assert v2["x402Version"] == 2
    assert v2["resource"]["url"] == "http://testserver" + URL
    [accept] = v2["accepts"]
    assert accept == {
        "scheme": "exact",
        "network": "eip155:31337",
        "amount": str(PRICE),
        "asset": offline_options.asset,
        "payTo": offline_options.pay_to,
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    v1 = response.json()
    assert v1["x402Version"] == 1
    assert v1["accepts"][0]["maxAmountRequired"] == str(PRICE)
    assert v1["accepts"][0]["network"] == "anvil"
    assert v1["accepts"][0]["resource"] == "http://testserver" + URL


def test_price_change_shows_in_the_next_challenge(offline_options, demo_model) -> None:
    demo_model.price = "0.25"
    demo_model.save()
    v2 = decode_header(post(Client(), {"input": {"text": "hi"}})["PAYMENT-REQUIRED"])
    assert v2["accepts"][0]["amount"] == "250000"


@pytest.mark.parametrize(
    "body, status, field",
    [
        ("", 422, "input"),
        ("{not json", 400, None),
        ([1, 2], 400, None),
        ({"input": "text"}, 422, "input"),
        ({"input": {}}, 422, "text"),
        ({"input": {"text": 5}}, 422, "text"),
        ({"input": {"text": "x", "other": 1}}, 422, "input"),
    ],
)
def test_bad_input_is_refused_before_any_challenge(offline_options, demo_model, body, status, field) -> None:
    response = post(Client(), body)
    assert response.status_code == status, response.content
    problem = response.json()
    assert problem["status"] == status and problem["detail"]
    assert "PAYMENT-REQUIRED" not in response
    if field:
        assert field in problem["invalid_fields"]


def test_unknown_model_is_a_json_404(offline_options, db) -> None:
    response = Client().post(
        "/v1/models/nobody/nothing/predictions", data={"input": {}}, content_type="application/json"
    )
    assert response.status_code == 404
    assert response.json()["status"] == 404
    assert Client().get("/v1/predictions/doesnotexist").status_code == 404


@pytest.mark.parametrize("header", ["garbage", "e30=", "eyJ4NDAyVmVyc2lvbiI6IDJ9", "A" * 20_000])
def test_garbage_payment_header_gets_402_with_reason(offline_options, demo_model, header) -> None:
    response = post(Client(), {"input": {"text": "hi"}}, **{"PAYMENT-SIGNATURE": header})
    assert response.status_code == 402
    assert response.json()["error"] == "invalid_payload"
    assert decode_header(response["PAYMENT-REQUIRED"])["error"] == "invalid_payload"
    assert Payment.objects.count() == 0


def test_paid_request_settles_runs_and_moves_exactly_the_price(
    chain_settings, demo_model, eager_celery
) -> None:
    payer = chain_settings.payers[0]
    before_payer = token_balance(chain_settings, payer["address"])
    before_pay_to = token_balance(chain_settings, chain_settings.pay_to)
    header = v2_header(payer["private_key"], requirement())

    response = post(Client(), {"input": {"text": "paid"}}, **{"PAYMENT-SIGNATURE": header})
    assert response.status_code == 201, response.content
    body = response.json()
    # The answer is the payment as this request recorded it: settled after the answer (inline
    # here, by a worker in production); the prediction's payment shows the outcome.
    settle = decode_header(response["PAYMENT-RESPONSE"])
    assert settle["success"] is False and settle["errorReason"] == "settlement_pending", settle
    assert settle["payer"] == payer["address"] and settle["amount"] == str(PRICE)

    detail = Client().get(f"/v1/predictions/{body['id']}").json()
    assert detail["status"] == "succeeded" and detail["output"] == "paid"
    assert detail["payment"]["status"] == "confirmed"
    assert detail["payment"]["transaction"].startswith("0x")
    assert token_balance(chain_settings, payer["address"]) == before_payer - PRICE
    assert token_balance(chain_settings, chain_settings.pay_to) == before_pay_to + PRICE
    payment = Payment.objects.get()
    assert [e.to_status for e in PaymentEvent.objects.filter(payment=payment)] == [
        "verified",
        "settling",
        "confirmed",
    ]
    assert payment.gas_used and payment.block_number


def test_a_replayed_header_buys_nothing_and_reveals_nothing(chain_settings, demo_model, eager_celery) -> None:
    """Everything in a payment header is public once it settles (the calldata carries it): a
    header replayed without its payment-identifier must not return the first prediction (its
    id is the capability to read the output and to cancel)."""
    payer = chain_settings.payers[1]
    header = v2_header(payer["private_key"], requirement())
    transfers_before = transfer_count(chain_settings, chain_settings.pay_to)
    first = post(Client(), {"input": {"text": "once"}}, **{"PAYMENT-SIGNATURE": header})
    assert first.status_code == 201
    secret_id = first.json()["id"]
    for body in ({"input": {"text": "once"}}, {"input": {"text": "something else"}}):
        again = post(Client(), body, **{"PAYMENT-SIGNATURE": header})
        assert again.status_code == 402
        assert again.json()["error"] == "invalid_exact_evm_nonce_already_used"
        assert secret_id not in again.content.decode() and "Location" not in again
    assert Payment.objects.count() == 1 and Prediction.objects.count() == 1
    assert transfer_count(chain_settings, chain_settings.pay_to) == transfers_before + 1


def test_a_v1_header_rebuilt_from_settled_calldata_is_refused(chain_settings, demo_model, eager_celery) -> None:
    """The attack: watch the chain, decode a settled transferWithAuthorization, wrap it in an
    X-PAYMENT header with the same input, and read the victim's prediction."""
    from eth_abi import decode

    from payments.chain.abi import BATCH_SETTLE_TYPES
    from payments.x402.codec import encode_header

    payer = chain_settings.payers[1]
    first = post(Client(), {"input": {"text": "private"}}, **{"X-PAYMENT": v1_header(payer["private_key"], requirement())})
    assert first.status_code == 201
    tx = Payment.objects.get().settle_tx_hash
    calldata = rpc(chain_settings.rpc_url, "eth_getTransactionByHash", [tx])["input"]
    # Settled in a batch (BatchSettler.settle): the authorization is its first item.
    _, to, _, [(frm, value, after, before, nonce, v, r, s_)] = decode(BATCH_SETTLE_TYPES, bytes.fromhex(calldata[10:]))
    rebuilt = {
        "x402Version": 1,
        "scheme": "exact",
        "network": requirement().option.v1_network,
        "payload": {
            "signature": "0x" + (r + s_ + bytes([v])).hex(),
            "authorization": {
                "from": frm,
                "to": to,
                "value": str(value),
                "validAfter": str(after),
                "validBefore": str(before),
                "nonce": "0x" + nonce.hex(),
            },
        },
    }
    stolen = post(Client(), {"input": {"text": "private"}}, **{"X-PAYMENT": encode_header(rebuilt)})
    assert stolen.status_code == 402, stolen.content
    assert stolen.json()["error"] == "invalid_exact_evm_nonce_already_used"
    assert first.json()["id"] not in stolen.content.decode()


def test_v1_x_payment_header_is_accepted(chain_settings, demo_model, eager_celery) -> None:
    payer = chain_settings.payers[2]
    response = post(
        Client(),
        {"input": {"text": "v1"}},
        **{"X-PAYMENT": v1_header(payer["private_key"], requirement(), valid_after=0)},
    )
    assert response.status_code == 201, response.content
    assert decode_header(response["X-PAYMENT-RESPONSE"])["errorReason"] == "settlement_pending"
    detail = Client().get(f"/v1/predictions/{response.json()['id']}").json()
    assert detail["payment"]["status"] == "confirmed" and detail["output"] == "v1"
    assert Payment.objects.get().x402_version == 1


def test_payer_without_balance_is_refused(chain_settings, demo_model) -> None:
    from eth_account import Account

    response = post(
        Client(),
        {"input": {"text": "broke"}},
        **{"PAYMENT-SIGNATURE": v2_header(Account.create().key.hex(), requirement())},
    )
    assert response.status_code == 402
    assert response.json()["error"] == "invalid_exact_evm_insufficient_balance"
    assert Payment.objects.count() == 0


def test_node_down_is_503_with_retry_after_and_no_ledger_row(chain, demo_model) -> None:
    dead = {**option_settings(chain)}
    dead["X402_PAYMENT_OPTIONS"] = [
        {**dead["X402_PAYMENT_OPTIONS"][0], "rpc_url": f"http://127.0.0.1:{free_port()}"}
    ]
    with override_settings(**dead):
        header = v2_header(chain.payers[3]["private_key"], requirement())
        response = post(Client(), {"input": {"text": "x"}}, **{"PAYMENT-SIGNATURE": header})
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert Payment.objects.count() == 0


def test_wrong_price_is_refused_with_a_fresh_challenge(chain_settings, demo_model) -> None:
    req = Requirement(payment_options()[0], PRICE - 1)
    response = post(
        Client(),
        {"input": {"text": "x"}},
        **{"PAYMENT-SIGNATURE": v2_header(chain_settings.payers[0]["private_key"], req)},
    )
    assert response.status_code == 402
    assert response.json()["error"] == "invalid_exact_evm_payload_authorization_value_mismatch"
    assert decode_header(response["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == str(PRICE)


def test_several_options_in_a_stable_order_and_each_pays(
    chain, second_token, demo_model, eager_celery
) -> None:
    first = option_settings(chain)["X402_PAYMENT_OPTIONS"][0]
    second = option_settings(second_token)["X402_PAYMENT_OPTIONS"][0]
    one_lane = {"X402_RELAYER_KEY": chain.relayer_private_key, "X402_RELAYER_KEYS": [chain.relayer_private_key]}
    with override_settings(X402_PAYMENT_OPTIONS=[first, second], **one_lane):
        challenges = [
            decode_header(post(Client(), {"input": {"text": "x"}})["PAYMENT-REQUIRED"]) for _ in range(3)
        ]
        assert challenges[0] == challenges[1] == challenges[2]
        accepts = challenges[0]["accepts"]
        assert [(a["asset"], a["extra"]["name"]) for a in accepts] == [
            (chain.asset, "USD Coin"),
            (second_token.asset, "USDC"),
        ]
        payer = chain.payers[5]
        before = token_balance(second_token, payer["address"])
        req = Requirement(payment_options()[1], PRICE)
        response = post(
            Client(),
            {"input": {"text": "second"}},
            **{"PAYMENT-SIGNATURE": v2_header(payer["private_key"], req)},
        )
        assert response.status_code == 201, response.content
        assert Payment.objects.get().asset == second_token.asset
        assert Client().get(f"/v1/predictions/{response.json()['id']}").json()["status"] == "succeeded"
    assert token_balance(second_token, payer["address"]) == before - PRICE


def test_after_success_policy_settles_only_successful_runs(chain_settings, demo_model, eager_celery) -> None:
    from predictions.models import ModelVersion

    demo_model.settlement_policy = "after_success"
    demo_model.save()
    payer = chain_settings.payers[6]
    before = token_balance(chain_settings, payer["address"])

    ok = post(Client(), {"input": {"text": "good"}}, **{"PAYMENT-SIGNATURE": held_header(payer["private_key"])})
    assert ok.status_code == 201
    done = Client().get(f"/v1/predictions/{ok.json()['id']}").json()
    assert done["status"] == "succeeded" and done["output"] == "good"
    assert done["payment"]["status"] == "confirmed"
    assert token_balance(chain_settings, payer["address"]) == before - PRICE

    version = demo_model.latest_version
    ModelVersion.objects.create(
        id="f" * 64, model=demo_model, predictor="tests.predictors.Boom", input_schema=version.input_schema
    )
    bad = post(Client(), {"input": {"text": "bad"}}, **{"PAYMENT-SIGNATURE": held_header(payer["private_key"])})
    assert bad.status_code == 201
    failed = Client().get(f"/v1/predictions/{bad.json()['id']}").json()
    assert failed["status"] == "failed" and "cannot handle" in failed["error"]
    # Released: not settled by us, but only final once the chain says it was never used.
    assert failed["payment"]["status"] == "lapsing" and failed["payment"]["transaction"] is None
    assert token_balance(chain_settings, payer["address"]) == before - PRICE  # charged nothing more


def test_after_success_refuses_a_payment_that_would_lapse_before_the_run_ends(
    chain_settings, demo_model
) -> None:
    """Settled only after the run, a payment must stay valid for the run's time limit: the
    challenge says so (maxTimeoutSeconds), and a short validBefore is refused up front."""
    demo_model.settlement_policy = "after_success"
    demo_model.save()
    challenge = decode_header(post(Client(), {"input": {"text": "x"}})["PAYMENT-REQUIRED"])
    assert challenge["accepts"][0]["maxTimeoutSeconds"] >= demo_model.time_limit_seconds + 6
    short = post(
        Client(),
        {"input": {"text": "x"}},
        **{"PAYMENT-SIGNATURE": v2_header(chain_settings.payers[6]["private_key"], requirement())},
    )
    assert short.status_code == 402
    assert short.json()["error"] == "invalid_exact_evm_payload_authorization_valid_before"
    assert "600s" in short.json()["message"]
    assert Payment.objects.count() == 0


def test_paid_output_is_withheld_until_the_payment_is_confirmed(
    chain_settings, demo_model, monkeypatch
) -> None:
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)  # no run, no settle
    demo_model.settlement_policy = "after_success"
    demo_model.save()
    payer = chain_settings.payers[7]
    response = post(Client(), {"input": {"text": "secret"}}, **{"PAYMENT-SIGNATURE": held_header(payer["private_key"])})
    from predictions import lifecycle
    from predictions.runners import Outcome

    prediction_id = response.json()["id"]
    assert lifecycle.claim(prediction_id) is not None
    lifecycle.finish(prediction_id, Outcome(succeeded=True, output="secret"), cause=lifecycle.Cause.TASK)
    assert Prediction.objects.get(pk=prediction_id).output == "secret"  # kept, not shown
    shown = Client().get(f"/v1/predictions/{prediction_id}").json()
    assert shown["status"] == "processing" and shown["output"] is None


def _with_identifier(header: str, identifier: object) -> str:
    from payments.x402.codec import encode_header

    obj = decode_header(header)
    obj["extensions"] = {"payment-identifier": {"info": {"required": False, "id": identifier}}}
    return encode_header(obj)


def test_payment_identifier_extension(chain_settings, demo_model, eager_celery, monkeypatch) -> None:
    import time

    challenge = decode_header(post(Client(), {"input": {"text": "x"}})["PAYMENT-REQUIRED"])
    assert challenge["extensions"]["payment-identifier"]["info"] == {"required": False}
    payer = chain_settings.payers[0]["private_key"]
    header = _with_identifier(v2_header(payer, requirement()), "pay_7d5d747be160e280504c099d984bcfe0")
    first = post(Client(), {"input": {"text": "idem"}}, **{"PAYMENT-SIGNATURE": header})
    assert first.status_code == 201
    # Same id, same payload: the same answer, even once the authorization has lapsed.
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    again = post(Client(), {"input": {"text": "idem"}}, **{"PAYMENT-SIGNATURE": header})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    monkeypatch.setattr(time, "time", real)
    # Same id, another payload: 409.
    other = _with_identifier(v2_header(payer, requirement()), "pay_7d5d747be160e280504c099d984bcfe0")
    conflict = post(Client(), {"input": {"text": "idem"}}, **{"PAYMENT-SIGNATURE": other})
    assert conflict.status_code == 409 and conflict.json()["status"] == 409
    # A malformed id: 400.
    bad = _with_identifier(v2_header(payer, requirement()), "short")
    assert post(Client(), {"input": {"text": "idem"}}, **{"PAYMENT-SIGNATURE": bad}).status_code == 400
    assert Payment.objects.count() == 1


def test_operator_token_runs_without_payment(chain_settings, demo_model, eager_celery, settings) -> None:
    settings.X402_OPERATOR_TOKENS = ["op-secret-token"]
    assert post(Client(), {"input": {"text": "x"}}, Authorization="Bearer wrong").status_code == 402
    response = post(Client(), {"input": {"text": "operator"}}, Authorization="Bearer op-secret-token")
    assert response.status_code == 201
    body = Client().get(f"/v1/predictions/{response.json()['id']}").json()
    assert body["status"] == "succeeded" and body["payment"] is None
    assert Payment.objects.count() == 0


def test_broker_down_after_the_payment_is_recorded(
    chain_settings, demo_model, eager_celery, monkeypatch
) -> None:
    """The paid request still succeeds; once the broker is back the sweep settles and runs it."""
    from datetime import timedelta

    from django.utils import timezone
    from kombu.exceptions import OperationalError

    from payments.tasks import reconcile, settle_batches, settle_payment

    def down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(settle_payment, "delay", down)
    monkeypatch.setattr(settle_batches, "apply_async", down)
    response = post(
        Client(),
        {"input": {"text": "later"}},
        **{"PAYMENT-SIGNATURE": v2_header(chain_settings.payers[4]["private_key"], requirement())},
    )
    assert response.status_code == 201
    payment = Payment.objects.get()
    assert payment.status == "verified"
    monkeypatch.undo()  # the broker is back
    Payment.objects.filter(pk=payment.pk).update(settle_requested_at=timezone.now() - timedelta(minutes=5))
    assert reconcile()["swept"] == 1
    done = Client().get(f"/v1/predictions/{response.json()['id']}").json()
    assert done["status"] == "succeeded" and done["payment"]["status"] == "confirmed"


def test_database_unavailable_is_a_clean_503(chain_settings, demo_model, monkeypatch) -> None:
    from django import db

    def down(*args, **kwargs):
        raise db.OperationalError("connection failed: FATAL: sorry, too many clients already")

    monkeypatch.setattr("predictions.models.ModelVersionQuerySet.latest_of", down)
    response = post(Client(), {"input": {"text": "x"}})
    assert response.status_code == 503 and response["Retry-After"] == "5"
    assert response.json()["status"] == 503 and "too many" not in response.json()["detail"]


def test_the_paid_create_writes_its_rows_in_one_transaction(chain_settings, demo_model, monkeypatch) -> None:
    """The paid create's own database work is small and in one place: the ledger row, its event
    and the prediction written in one transaction with nothing read between them, each row with
    its event in one statement (two round trips for four rows); besides, only
    the latest version with its model and tier is read (one query; the honoured prices and the
    backlog's age are kept by the process: the first request reads them). The answer is built from
    the rows just written, not read back."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    # The backlog's age is re-read once a second: a slow machine may take longer than that
    # between the two requests (a read then is the process's, not the request's).
    monkeypatch.setattr("payments.backpressure.CACHE_SECONDS", 3600.0)
    payer = chain_settings.payers[5]["private_key"]
    for text in ("first", "second"):
        header = v2_header(payer, Requirement(payment_options()[0], 10_000))
        with CaptureQueriesContext(connection) as queries:
            response = Client().post(
                URL, data={"input": {"text": text}}, content_type="application/json", headers={"PAYMENT-SIGNATURE": header}
            )
        assert response.status_code == 201, response.content
    sql = [q["sql"] for q in queries.captured_queries]
    writes = [s for s in sql if s.startswith(("INSERT", "UPDATE", "DELETE", "WITH"))]
    tables = [re.findall(r'INSERT INTO "(\w+)"', s) for s in writes]
    assert tables == [["payments_payment", "payments_paymentevent"], ["predictions_prediction", "predictions_predictionevent"]], sql
    first, last = sql.index(writes[0]), sql.index(writes[-1])
    assert all(not s.startswith("SELECT") for s in sql[first:last]), sql
    reads = [s.split(" FROM ")[1].split()[0].strip('"') for s in sql if s.startswith("SELECT")]
    assert reads == ["predictions_modelversion"], reads
