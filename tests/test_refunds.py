"""Refunds (issue 20) on anvil: a paid run that ends without its output under before_run is
owed a refund; finance approves it; the refund wallet sends the token back; the reconciler
confirms it."""

from __future__ import annotations

import csv
import io
import time
import zipfile
from decimal import Decimal

import pytest
from django.test import Client, override_settings
from django.utils import timezone

from payments import exports, reconciliation, refunds
from payments.models import Payment, Refund
from payments.reports import DateBasis, LedgerFilter
from predictions.models import Prediction
from tests.conftest import fresh_payer, token_balance
from tests.invariants import refund_violations
from tests.payers import v2_header_for
from tests.test_lifecycle import python_model

pytestmark = [pytest.mark.chain, pytest.mark.django_db(transaction=True)]
PRICE = 10_000  # the test models' 0.01 USDC


def pay(model, key: str) -> dict:
    url = f"/v1/models/{model}/predictions"
    body = {"input": {"text": "hello"}}
    challenge = Client().post(url, data=body, content_type="application/json")
    assert challenge.status_code == 402, challenge.content
    header = v2_header_for(key, challenge["PAYMENT-REQUIRED"])
    response = Client().post(url, data=body, content_type="application/json", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 201, response.content
    return response.json()


def confirm(refund: Refund) -> Refund:
    deadline = time.monotonic() + 20
    while refund.status != "confirmed" and time.monotonic() < deadline:
        refunds.reconcile()
        refund.refresh_from_db()
        time.sleep(0.05)
    return refund


def test_a_paid_run_that_fails_is_refunded_on_chain(chain_settings, eager_celery, staff, tmp_path) -> None:
    chain = chain_settings
    payer = fresh_payer(chain)
    wallet = chain.refund_address
    start_payer, start_wallet = token_balance(chain, payer["address"]), token_balance(chain, wallet)
    model = python_model("boom", "tests.predictors.Boom", "before_run")
    created = pay(model, payer["private_key"])
    prediction = Prediction.objects.get(pk=created["id"])
    assert prediction.status == "failed" and prediction.payment.status == "confirmed"
    assert token_balance(chain, payer["address"]) == start_payer - PRICE  # paid up front

    refund = Refund.objects.get(payment=prediction.payment)
    assert (refund.status, int(refund.amount), refund.recipient) == ("owed", PRICE, payer["address"])
    assert created["id"] in refund.reason
    # Owed once: the payment's later moves (none) or a second look change nothing.
    assert refunds.owe(prediction.payment, "again") == refund and Refund.objects.count() == 1

    # Nothing leaves before finance approves; an operator may not approve.
    refunds.send(refund.pk)
    refund.refresh_from_db()
    assert refund.status == "owed" and not refund.tx_hash
    action = {"action": "approve", "_selected_action": [str(refund.pk)]}
    assert staff["operator"].post("/admin/payments/refund/", action).status_code == 403
    with override_settings(X402_REFUND_KEY=""):  # no wallet: approved, still owed, and why
        assert staff["finance"].post("/admin/payments/refund/", action).status_code == 302
    refund.refresh_from_db()
    assert refund.status == "owed" and "X402_REFUND_KEY" in refund.failure_reason and refund.approved_at
    answer = staff["finance"].post("/admin/payments/refund/", action)  # approving again sends it
    assert answer.status_code == 302
    refund.refresh_from_db()
    assert refund.status == "sent" and refund.approved_by.username == "finn" and refund.sender == wallet

    refund = confirm(refund)
    assert refund.status == "confirmed" and refund.block_number and refund.gas_cost_wei > 0
    assert token_balance(chain, payer["address"]) == start_payer  # the money is back
    assert token_balance(chain, wallet) == start_wallet - PRICE  # from the refund wallet
    events = list(refund.events.values_list("from_status", "to_status"))
    assert events == [("", "owed"), ("owed", "owed"), ("owed", "sent"), ("sent", "confirmed")]
    assert refund.events.all()[1].detail == {"approved_by": "finn"}
    page = staff["finance"].get(f"/admin/payments/refund/{refund.pk}/change/")
    assert page.status_code == 200 and refund.raw_tx.encode() not in page.content

    # The auditor's invariant sees the refund on chain; a refund the chain does not back is caught.
    assert refund_violations(chain.rpc_url) == []
    Refund.objects.filter(pk=refund.pk).update(amount=PRICE + 1)
    assert "carries no Transfer" in refund_violations(chain.rpc_url)[0]
    Refund.objects.filter(pk=refund.pk).update(amount=PRICE)

    # The dashboard, the export and the reconciliation report agree for the same period (today,
    # by the date money moved), refunds on lines of their own.
    today = timezone.now().date().isoformat()
    dashboard = staff["finance"].get(
        "/admin/payments/payment/dashboard/", {"since": today, "until": today, "basis": "money", "tz": "UTC"}
    ).context
    days = dashboard["days"]
    flt = LedgerFilter(since=days.since, until=days.until, basis=DateBasis.MONEY, tz="UTC")
    result = exports.write_zip(flt, tmp_path / "ledger.zip")
    with zipfile.ZipFile(tmp_path / "ledger.zip") as archive:
        data = list(csv.DictReader(io.StringIO(archive.read("data.csv").decode())))
        summary = list(csv.DictReader(io.StringIO(archive.read("summary.csv").decode())))
    [refund_line] = [r for r in data if r["kind"] == "refund"]
    assert (refund_line["status"], refund_line["amount"], refund_line["payer"]) == ("confirmed", "-0.010000", payer["address"])
    assert refund_line["transaction"] == refund.tx_hash and refund_line["payment_id"] == str(prediction.payment_id)
    exported_refunds = -sum(Decimal(s["amount"]) for s in summary if s["kind"] == "refund" and s["status"] == "confirmed")
    exported_revenue = sum(exports.paid_total(result.summary).values(), Decimal(0))
    report = reconciliation.report(reconciliation.Period(days.since, days.until))
    assert {(s.kind, s.address) for s in report.scans} == {("payment", chain.pay_to), ("refund", wallet)}
    [chain_refund] = [line for line in report.lines if line.kind == "refund"]
    assert (chain_refund.status, chain_refund.refund_id, chain_refund.payer) == ("matched", refund.pk, payer["address"])
    assert report.count("matched") == 1 and not [line for line in report.lines if line.status == "ledger_only"]
    assert dashboard["revenue"] == exported_revenue == report.amount("matched") == Decimal("0.01")
    assert dashboard["refunded"] == exported_refunds == report.amount("matched", "refund") == Decimal("0.01")
    assert dashboard["net"] == Decimal(0)


def test_after_success_a_failed_run_is_not_charged_so_nothing_is_owed(chain_settings, eager_celery) -> None:
    payer = fresh_payer(chain_settings)
    before = token_balance(chain_settings, payer["address"])
    model = python_model("boom", "tests.predictors.Boom", "after_success")
    created = pay(model, payer["private_key"])
    assert Prediction.objects.get(pk=created["id"]).status == "failed"
    assert not Refund.objects.exists()
    assert token_balance(chain_settings, payer["address"]) == before
    assert Payment.objects.get().status in ("lapsing", "expired")


def test_money_that_confirms_after_a_cancel_is_owed_back(chain_settings, staff) -> None:
    """before_run: the payment is being settled (signed and stored) when the agent cancels; the
    prediction ends unserved with nothing paid yet, then the settlement confirms: the lifecycle
    hears it from the ledger and records the refund then."""
    from payments import batching, relayer
    from payments.options import configured

    payer = fresh_payer(chain_settings)
    model = python_model("late", "tests.predictors.Boom", "before_run")
    created = pay(model, payer["private_key"])
    conf = configured()[0]
    formed = batching.form(conf, force=True)
    payment = Payment.objects.get()
    assert formed.tx is not None and payment.status == "settling"
    canceled = Client().post(f"/v1/predictions/{created['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert not Refund.objects.exists()  # nothing paid yet, nothing owed
    relayer.broadcast(conf.rpc_url, formed.tx)
    assert batching.follow([formed.tx.pk], wait_seconds=20) == []
    payment.refresh_from_db()
    assert payment.status == "confirmed"
    refund = Refund.objects.get(payment=payment)
    assert refund.status == "owed" and "canceled" in refund.reason and int(refund.amount) == PRICE
