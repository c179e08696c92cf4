"""Refunds (issue 20) on anvil: a paid run that ends without its output under before_run is
owed a refund; finance approves it; the refund wallet sends the token back; the reconciler
confirms it."""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client, override_settings
from django.utils import timezone
from eth_account import Account

from payments import refunds
from payments.chain import relayer
from payments.finance import exports, ledger_lines, reconciliation
from payments.finance.reports import DateBasis, LedgerFilter
from payments.metrics import REFUND_BROADCAST_ERRORS
from payments.models import NativeTokenRate, Payment, Refund
from payments.options import payment_options
from payments.x402.types import Requirement
from predictions.models import Prediction
from tests.conftest import fresh_payer, option_settings, rpc, token_balance
from tests.invariants import refund_violations
from tests.payers import sign_authorization, v2_header_for, v2_payload
from tests.test_lifecycle import python_model

pytestmark = [pytest.mark.django_db(transaction=True)]
PRICE = 10_000  # the test models' 0.01 USDC


def pay(model, key: str, given: dict | None = None) -> dict:
    url = f"/v1/models/{model}/predictions"
    body = {"input": given or {"text": "hello"}}
    challenge = Client().post(url, data=body, content_type="application/json")
    assert challenge.status_code == 402, challenge.content
    header = v2_header_for(key, challenge["PAYMENT-REQUIRED"])
    response = Client().post(url, data=body, content_type="application/json", headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 201, response.content
    return response.json()


def settle_through_the_facilitator_api(key: str, pay_to: str) -> None:
    """A payment another merchant's server (or ours) settles through our facilitator API."""
    option = replace(payment_options()[0], pay_to=pay_to)
    req = Requirement(option, PRICE)
    body = {"x402Version": 2, "paymentPayload": v2_payload(req, sign_authorization(key, req)), "paymentRequirements": req.v2()}
    with override_settings(X402_FACILITATOR_TOKENS=["t"], X402_FACILITATOR_SETTLE_WAIT=10):
        answer = Client().post(
            "/facilitator/settle", data=json.dumps(body), content_type="application/json", headers={"Authorization": "Bearer t"}
        ).json()
    assert answer["success"] is True, answer


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
    # The reason names the payment, never the prediction id (a bearer capability); the OWED
    # event says why for finance: the run failed on our side, and how long it ran.
    assert str(prediction.payment_id) in refund.reason and created["id"] not in refund.reason
    owed = refund.events.get(to_status="owed").detail
    assert owed["cause"] == "failed" and Decimal(owed["run_seconds"]) >= 0
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
    # Facilitator-API payments: one to our pay-to (revenue), one to another merchant (not ours).
    other = fresh_payer(chain)
    settle_through_the_facilitator_api(other["private_key"], chain.pay_to)
    settle_through_the_facilitator_api(other["private_key"], Account.create().address)
    today = timezone.now().date().isoformat()
    NativeTokenRate.objects.create(network=chain.network, symbol="ETH", usd_per_token=Decimal(3000), source="test")
    dashboard = staff["finance"].get(
        "/admin/payments/payment/dashboard/", {"since": today, "until": today, "basis": "money", "tz": "UTC"}
    ).context
    days = dashboard["days"]
    flt = LedgerFilter(since=days.since, until=days.until, basis=DateBasis.MONEY, tz="UTC", ours_only=True)
    result = exports.write_zip(flt, tmp_path / "ledger.zip")
    with zipfile.ZipFile(tmp_path / "ledger.zip") as archive:
        data = list(csv.DictReader(io.StringIO(archive.read("data.csv").decode())))
        summary = list(csv.DictReader(io.StringIO(archive.read("summary.csv").decode())))
    [refund_line] = [r for r in data if r["kind"] == "refund"]
    assert (refund_line["status"], refund_line["amount"], refund_line["payer"]) == ("confirmed", "-0.010000", payer["address"])
    assert refund_line["transaction"] == refund.tx_hash and refund_line["payment_id"] == str(prediction.payment_id)
    exported_refunds = -sum(Decimal(s["amount"]) for s in summary if s["kind"] == "refund" and s["status"] == "confirmed")
    exported_revenue = sum(ledger_lines.paid_total(result.summary).values(), Decimal(0))
    report = reconciliation.report(reconciliation.Period(days.since, days.until))
    assert {(s.kind, s.address) for s in report.scans} == {("payment", chain.pay_to), ("refund", wallet)}
    # (Refunds other modules' tests sent earlier today, their rows gone, are chain-only lines.)
    [chain_refund] = [line for line in report.lines if line.kind == "refund" and line.status == "matched"]
    assert (chain_refund.status, chain_refund.refund_id, chain_refund.payer) == ("matched", refund.pk, payer["address"])
    assert report.count("matched") == 2 and not [line for line in report.lines if line.status == "ledger_only"]
    assert dashboard["revenue"] == exported_revenue == report.amount("matched") == Decimal("0.02")
    assert dashboard["moved_for_others"] == Decimal("0.01")
    assert dashboard["refunded"] == exported_refunds == report.amount("matched", "refund") == Decimal("0.01")
    # Net: one definition (revenue, minus confirmed refunds, minus every transaction's gas at
    # finance's rate), the dashboard's figure is the export summary's.
    gas = sum(Decimal(s["gas_usd"]) for s in summary)
    [moved] = Payment.objects.for_others()  # its gas, at finance's rate, as the export rounds it
    gas_of_others = (Decimal(moved.gas_cost_wei) * 3000 / 10**18).quantize(Decimal("0.000001"))
    assert gas > 0 and gas_of_others > 0 and dashboard["net"] == dashboard["revenue"] - dashboard["refunded"] - gas - gas_of_others
    # The export finance downloads keeps the whole ledger (ours_only off): the other merchant's
    # payment is a line of its own (ours false), its amount not revenue, its gas our cost, and
    # its net is the dashboard's all the same.
    whole = exports.write_zip(replace(flt, ours_only=False), tmp_path / "whole.zip")
    with zipfile.ZipFile(tmp_path / "whole.zip") as archive:
        data = list(csv.DictReader(io.StringIO(archive.read("data.csv").decode())))
        summary = list(csv.DictReader(io.StringIO(archive.read("summary.csv").decode())))
    [theirs] = [r for r in data if r["ours"] == "false"]
    assert theirs["verification"] == "facilitator-api" and theirs["amount"] == "0.010000"
    assert Decimal(theirs["net_amount"]) == -Decimal(theirs["gas_usd"]) < 0
    assert {r["ours"] for r in data if r is not theirs} == {"true"}
    [theirs_summed] = [s for s in summary if s["ours"] == "false"]
    assert Decimal(theirs_summed["net_amount"]) == -gas_of_others
    assert dashboard["net"] == sum(Decimal(s["net_amount"]) for s in summary) == ledger_lines.net_total(whole.summary)
    assert sum(ledger_lines.paid_total(whole.summary).values(), Decimal(0)) == dashboard["revenue"]


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
    from payments.chain import batching, relayer
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


def wallet_send(chain, data: str) -> str:
    """A transaction from the refund wallet (unlocked on anvil) to the token, mined; its hash."""
    rpc(chain.rpc_url, "anvil_impersonateAccount", [chain.refund_address])
    tx = rpc(
        chain.rpc_url,
        "eth_sendTransaction",
        [{"from": chain.refund_address, "to": chain.asset, "data": data, "gas": hex(100_000)}],
    )
    deadline = time.monotonic() + 10
    while rpc(chain.rpc_url, "eth_getTransactionReceipt", [tx]) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return tx


def transfer_data(to: str, amount: int) -> str:
    return refunds.TRANSFER + to[2:].lower().rjust(64, "0") + hex(amount)[2:].rjust(64, "0")


def as_sent(refund: Refund, tx: str) -> None:
    """The refund as if the wallet had signed ``tx`` for it (the state send() leaves: its outbox
    row, the refund pointing to it)."""
    from payments.models import SettlementTx

    url = refund_chain_url()
    signed = rpc(url, "eth_getTransactionByHash", [tx])
    row = SettlementTx.objects.create(
        network=refund.network,
        relayer=refunds.wallet().address,
        nonce=int(signed["nonce"], 16),
        kind=SettlementTx.Kind.REFUND,
        to=refund.asset,
        items=1,
        tx_hash=tx,
        raw_tx=rpc(url, "eth_getRawTransactionByHash", [tx]),
        gas_limit=int(signed["gas"], 16),
        max_fee_per_gas=int(signed.get("maxFeePerGas") or signed["gasPrice"], 16),
        max_priority_fee_per_gas=int(signed.get("maxPriorityFeePerGas") or signed["gasPrice"], 16),
    )
    Refund.objects.filter(pk=refund.pk).update(
        status="sent", sender=refunds.wallet().address, tx=row, tx_hash=tx, approved_at=timezone.now()
    )


def refund_chain_url() -> str:
    from payments.options import configured

    return configured()[0].rpc_url


def test_a_revert_is_final_only_at_depth_and_a_success_without_the_transfer_needs_a_human(
    chain_settings, eager_celery
) -> None:
    """A reverted refund transaction whose block a reorg may still drop is not FAILED yet (the
    same nonce could still pay, and a re-approval would pay twice); at the network's depth it is.
    A successful transaction without the expected Transfer is not FAILED either: REVIEW."""
    chain = chain_settings
    payer = fresh_payer(chain)
    model = python_model("boom", "tests.predictors.Boom", "before_run")
    pay(model, payer["private_key"])
    pay(model, payer["private_key"])
    with override_settings(**option_settings(chain, confirmations=3)):
        first, second = Refund.objects.order_by("pk")
        reverted = wallet_send(chain, transfer_data(payer["address"], 10**30))  # more than it holds
        as_sent(first, reverted)
        refunds.track(first.pk)
        first.refresh_from_db()
        assert (first.status, first.confirmations) == ("sent", 1) and first.block_number
        rpc(chain.rpc_url, "anvil_mine", [hex(2)])
        refunds.track(first.pk)
        first.refresh_from_db()
        assert (first.status, first.confirmations) == ("failed", 3) and "reverted" in first.failure_reason

        wrong = wallet_send(chain, transfer_data(payer["address"], 1))  # status 1, not the refund's Transfer
        as_sent(second, wrong)
        refunds.track(second.pk)
        second.refresh_from_db()
        assert second.status == "review" and "check on chain" in second.failure_reason
        refunds.approve(second.pk, None)  # finance cannot re-send it by approving
        second.refresh_from_db()
        assert second.status == "review"

        # The auditor sees a refund paid twice: a second real Transfer of the amount, named
        # by one of the refund's events, is caught (then the test's own record is removed).
        assert refund_violations(chain.rpc_url) == []
        extra = wallet_send(chain, transfer_data(payer["address"], PRICE))
        first_paid = wallet_send(chain, transfer_data(payer["address"], PRICE))
        from payments.models import RefundEvent

        marks = [RefundEvent.objects.create(refund=first, from_status="sent", to_status="sent", detail={"tx": t}) for t in (extra, first_paid)]
        found = refund_violations(chain.rpc_url)
        assert any("paid more than once" in f for f in found) and any("is failed but" in f for f in found)
        RefundEvent.objects.filter(pk__in=[m.pk for m in marks]).delete()


def test_a_cancel_after_the_run_started_is_not_refunded_but_one_before_it_is(chain_settings, staff) -> None:
    """The refund policy: a payer who cancels after the run started had the compute (and may
    have seen partial output): nothing is owed. One canceled before the run started is refunded
    in full (see test_money_that_confirms_after_a_cancel_is_owed_back for the settling case)."""
    from payments.chain import batching, relayer
    from payments.options import configured
    from predictions import lifecycle

    payer = fresh_payer(chain_settings)
    model = python_model("cancelme", "tests.predictors.Slow", "before_run")
    ran, waiting = pay(model, payer["private_key"]), pay(model, payer["private_key"])
    by_operator = pay(model, payer["private_key"])
    conf = configured()[0]
    formed = batching.form(conf, force=True)
    relayer.broadcast(conf.rpc_url, formed.tx)
    assert batching.follow([formed.tx.pk], wait_seconds=20) == []
    assert set(Payment.objects.values_list("status", flat=True)) == {"confirmed"}
    assert lifecycle.claim(ran["id"]) is not None  # claimed, and its runner confirmed the run:
    assert lifecycle.run_started(ran["id"]) is not None  # its run started (no worker runs it here)
    assert lifecycle.claim(by_operator["id"]) is not None
    lifecycle.cancel(by_operator["id"], cause=lifecycle.Cause.ADMIN)  # our decision: refunded
    ours = Refund.objects.get(payment=Prediction.objects.get(pk=by_operator["id"]).payment)
    assert ours.events.get(to_status="owed").detail["cause"] == "canceled_by_operator"

    for created in (ran, waiting):
        canceled = Client().post(f"/v1/predictions/{created['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    started, not_started = (Prediction.objects.get(pk=c["id"]) for c in (ran, waiting))
    assert not Refund.objects.filter(payment=started.payment).exists()
    refund = Refund.objects.get(payment=not_started.payment)
    assert refund.status == "owed" and int(refund.amount) == PRICE
    owed = refund.events.get(to_status="owed").detail
    assert (owed["cause"], owed["run_seconds"], owed["prediction_status"]) == ("ended_before_run", "0", "canceled")


def test_a_cancel_while_the_runner_has_not_started_the_run_is_refunded(chain_settings, settings) -> None:
    """Claimed, but its runner never confirmed the run (busy): the payer's cancel ends it before
    its run, so it is refunded in full, and nothing of the wait is counted as run time. The
    payer's own cancel is reviewed by finance, whatever the auto-approval threshold: paying,
    canceling and being refunded must not be a loop that spends our gas unwatched."""
    settings.X402_REFUND_AUTO_APPROVE_MAX = 10 * PRICE
    from payments.chain import batching, relayer
    from payments.options import configured
    from predictions import lifecycle

    payer = fresh_payer(chain_settings)
    model = python_model("waiting", "tests.predictors.Slow", "before_run")
    created = pay(model, payer["private_key"])
    conf = configured()[0]
    formed = batching.form(conf, force=True)
    relayer.broadcast(conf.rpc_url, formed.tx)
    assert batching.follow([formed.tx.pk], wait_seconds=20) == []
    assert lifecycle.claim(created["id"]) is not None  # the runner answers busy: never started
    time.sleep(1)
    assert Client().post(f"/v1/predictions/{created['id']}/cancel").json()["status"] == "canceled"
    refund = Refund.objects.get(payment=Prediction.objects.get(pk=created["id"]).payment)
    assert int(refund.amount) == PRICE
    owed = refund.events.get(to_status="owed").detail
    assert (owed["cause"], owed["run_seconds"]) == ("ended_before_run", "0")
    assert refund.status == "owed" and refund.approved_at is None  # finance decides


def test_refunds_up_to_the_auto_approve_threshold_are_paid_without_a_human(
    chain_settings, eager_celery, settings
) -> None:
    """The refund policy (issue 25): a refund owed at or under X402_REFUND_AUTO_APPROVE_MAX is
    approved as it is owed, by the service finance uses, and paid back on chain; one above it
    waits for finance, as before."""
    chain = chain_settings
    payer = fresh_payer(chain)
    start = token_balance(chain, payer["address"])
    model = python_model("boom", "tests.predictors.Boom", "before_run")
    settings.X402_REFUND_AUTO_APPROVE_MAX = PRICE - 1
    reviewed = pay(model, payer["private_key"])
    waiting = Refund.objects.get(payment__prediction__pk=reviewed["id"])
    assert waiting.status == "owed" and waiting.approved_at is None
    settings.X402_REFUND_AUTO_APPROVE_MAX = PRICE
    automatic = pay(model, payer["private_key"])
    refund = confirm(Refund.objects.get(payment__prediction__pk=automatic["id"]))
    assert refund.status == "confirmed" and refund.approved_by is None and refund.approved_at is not None
    assert refund.events.filter(detail__approved_by=refunds.AUTO_APPROVER).exists()
    assert token_balance(chain, payer["address"]) == start - PRICE  # the reviewed one is still owed
    settings.X402_REFUND_AUTO_APPROVE_MAX = 0
    waiting.refresh_from_db()
    assert waiting.status == "owed" and waiting.approved_at is None


def test_the_refund_policy_approves_at_most_its_hourly_budget(chain_settings, eager_celery, settings) -> None:
    """Failures an input can provoke must not turn auto-approval into an unwatched loop: past
    X402_REFUND_AUTO_APPROVE_PER_HOUR approvals in the last hour, refunds wait for finance."""
    payer = fresh_payer(chain_settings)
    model = python_model("boom", "tests.predictors.Boom", "before_run")
    settings.X402_REFUND_AUTO_APPROVE_MAX = PRICE
    settings.X402_REFUND_AUTO_APPROVE_PER_HOUR = 1
    first, second = pay(model, payer["private_key"]), pay(model, payer["private_key"])
    approved = confirm(Refund.objects.get(payment__prediction__pk=first["id"]))
    assert approved.status == "confirmed" and approved.approved_by is None
    waiting = Refund.objects.get(payment__prediction__pk=second["id"])
    assert waiting.status == "owed" and waiting.approved_at is None


def test_only_a_confirmed_payment_can_be_owed_back(chain_settings) -> None:
    """A SETTLED payment may still be undone by a reorg: nothing is owed until it is final."""
    payer = fresh_payer(chain_settings)
    model = python_model("cancelme", "tests.predictors.Slow", "before_run")
    created = pay(model, payer["private_key"])
    payment = Prediction.objects.get(pk=created["id"]).payment
    for status in ("verified", "settled"):
        Payment.objects.filter(pk=payment.pk).update(status=status)
        payment.refresh_from_db()
        with pytest.raises(ValueError, match="not confirmed"):
            refunds.owe(payment, "test")
    assert not Refund.objects.exists()
    Payment.objects.filter(pk=payment.pk).update(status="verified")  # as the ledger left it


def owed_refund(chain) -> Refund:
    """A paid run that failed under before_run: its refund, owed."""
    payer = fresh_payer(chain)
    pay(python_model(f"boom{Refund.objects.count()}", "tests.predictors.Boom", "before_run"), payer["private_key"])
    return Refund.objects.order_by("-pk").first()


def test_an_approved_refund_the_wallet_could_not_send_is_sent_by_the_reconciler(
    chain_settings, eager_celery, staff
) -> None:
    """Approved and owed but not sent (no key, a failing estimate, a send task lost with the
    broker): the reconciler tries again, backing off, until it goes out."""
    from django.contrib.auth.models import User

    refund = owed_refund(chain_settings)
    finn = User.objects.create_user("finn2")
    with override_settings(X402_REFUND_KEY=""):
        refunds.approve(refund.pk, finn)
        refund.refresh_from_db()
        assert (refund.status, refund.send_attempts) == ("owed", 1) and refund.retry_at > timezone.now()
        Refund.objects.filter(pk=refund.pk).update(retry_at=timezone.now())
        refunds.reconcile()  # still no key: tried, and the wait doubles
        refund.refresh_from_db()
        assert refund.send_attempts == 2
        assert (refund.retry_at - timezone.now()).total_seconds() > refunds.RETRY_BASE_SECONDS * 1.5
    refunds.reconcile()  # not due yet: left alone
    refund.refresh_from_db()
    assert refund.status == "owed"
    # Finance need not wait: "send again" in the admin sends it now (an operator may not).
    action = {"action": "send_again", "_selected_action": [str(refund.pk)]}
    assert staff["operator"].post("/admin/payments/refund/", action).status_code == 403
    assert staff["finance"].post("/admin/payments/refund/", action).status_code == 302
    refund.refresh_from_db()
    assert refund.status == "sent" and refund.retry_at is None
    assert confirm(refund).status == "confirmed"

    # A send task lost (never tried): picked up once the grace after approval has passed.
    lost = owed_refund(chain_settings)
    Refund.objects.filter(pk=lost.pk).update(approved_at=timezone.now(), approved_by=finn)
    refunds.reconcile()
    lost.refresh_from_db()
    assert lost.status == "owed"  # its task may still be on its way
    Refund.objects.filter(pk=lost.pk).update(approved_at=timezone.now() - timedelta(seconds=refunds.SEND_GRACE_SECONDS + 1))
    assert confirm(lost).status == "confirmed"


@contextmanager
def no_automine(chain):
    """Blocks only when the test mines them (transactions wait in the node's pool)."""
    rpc(chain.rpc_url, "evm_setAutomine", [False])
    try:
        yield
    finally:
        rpc(chain.rpc_url, "evm_setAutomine", [True])
        rpc(chain.rpc_url, "anvil_mine", [hex(1)])


def test_a_stuck_refund_is_re_signed_with_the_same_nonce_and_a_higher_fee(chain_settings, eager_celery) -> None:
    chain = chain_settings
    refund = owed_refund(chain)
    with no_automine(chain):
        refunds.approve(refund.pk, None)
        refund.refresh_from_db()
        first = refund.tx_hash
        assert refund.status == "sent"
        # Dropped by the node: not re-signed (the node never had it, or lost it), the same bytes
        # are sent again.
        rpc(chain.rpc_url, "anvil_dropTransaction", [first])
        with override_settings(X402_STUCK_AFTER_SECONDS=0):
            refunds.track(refund.pk)
        refund.refresh_from_db()
        assert refund.tx_hash == first and rpc(chain.rpc_url, "eth_getTransactionByHash", [first]) is not None
        with override_settings(X402_STUCK_AFTER_SECONDS=0):  # in the pool and not mined: its fee is too low
            refunds.track(refund.pk)
        refund.refresh_from_db()
        assert refund.status == "sent" and refund.tx_hash != first and refunds.hashes(refund) == [refund.tx_hash, first]
        resent = refund.events.filter(to_status="sent").last().detail
        assert resent["replaces"] == first and resent["nonce"] == refund.nonce
        rpc(chain.rpc_url, "anvil_mine", [hex(1)])
        assert confirm(refund).status == "confirmed"
        assert refund_violations(chain.rpc_url) == []


def test_a_refund_whose_nonce_the_wallet_used_otherwise_fails_as_dropped(chain_settings, eager_celery) -> None:
    chain = chain_settings
    refund = owed_refund(chain)
    with no_automine(chain), override_settings(**option_settings(chain, confirmations=2)):
        refunds.approve(refund.pk, None)
        refund.refresh_from_db()
        assert refund.status == "sent"
        # Someone uses the wallet by hand: the same nonce, a higher fee, another transfer.
        rpc(chain.rpc_url, "anvil_impersonateAccount", [chain.refund_address])
        rpc(
            chain.rpc_url,
            "eth_sendTransaction",
            [{"from": chain.refund_address, "to": chain.asset, "data": transfer_data(chain.pay_to, 1),
              "gas": hex(100_000), "nonce": hex(refund.nonce), "maxFeePerGas": hex(10**12), "maxPriorityFeePerGas": hex(10**11)}],
        )
        rpc(chain.rpc_url, "anvil_mine", [hex(1)])
        refunds.track(refund.pk)
        refund.refresh_from_db()
        assert refund.status == "sent"  # not final yet: the block could still be dropped
        rpc(chain.rpc_url, "anvil_mine", [hex(1)])
        refunds.track(refund.pk)
        refund.refresh_from_db()
        assert refund.status == "failed" and "used by another transaction" in refund.failure_reason
        assert refund.events.last().detail["dropped"] == [refund.tx_hash]


def test_a_refund_approved_again_after_a_revert_is_judged_by_its_new_transfer_only(chain_settings, eager_celery) -> None:
    """A refund whose transfer reverted (FAILED at depth) and that finance approves again: while
    its new transfer waits in the pool, the old reverted receipt must not fail it again (a third
    approval would then pay twice); once the new one is mined it is CONFIRMED, paid once."""
    from payments.models import RefundEvent

    chain = chain_settings
    refund = owed_refund(chain)
    start = token_balance(chain, refund.recipient)
    with override_settings(**option_settings(chain, confirmations=1)):
        reverted = wallet_send(chain, transfer_data(refund.recipient, 10**30))  # more than it holds
        as_sent(refund, reverted)
        refund.refresh_from_db()
        RefundEvent.objects.create(
            refund=refund, from_status="owed", to_status="sent", detail={"nonce": refund.nonce, "tx": reverted}
        )
        refunds.track(refund.pk)
        refund.refresh_from_db()
        assert refund.status == "failed" and refund.tx_hash == reverted
        with override_settings(X402_REFUND_KEY=""):  # approved again, not sent yet: owed, no stale hash
            refunds.approve(refund.pk, None)
        refund.refresh_from_db()
        assert (refund.status, refund.tx_hash, refund.raw_tx, refund.block_number) == ("owed", "", "", None)
        assert refund_violations(chain.rpc_url) == []
        with no_automine(chain):
            refunds.send(refund.pk)
            refund.refresh_from_db()
            assert refund.status == "sent" and refund.tx_hash != reverted and refunds.hashes(refund) == [refund.tx_hash]
            refunds.track(refund.pk)  # the new transfer is pending; the old one reverted
            refund.refresh_from_db()
            assert refund.status == "sent", refund.failure_reason
        assert confirm(refund).status == "confirmed"
    assert token_balance(chain, refund.recipient) == start + PRICE  # paid once
    refunds.approve(refund.pk, None)  # nothing to approve any more
    refund.refresh_from_db()
    assert refund.status == "confirmed" and refund_violations(chain.rpc_url) == []


def paid_and_running(chain, name: str) -> str:
    """A before_run prediction paid (its payment CONFIRMED on chain) and claimed by a worker:
    its id (the test then plays the runner through the lifecycle)."""
    from payments.chain import batching, relayer
    from payments.options import configured
    from predictions import lifecycle

    payer = fresh_payer(chain)
    created = pay(python_model(name, "tests.predictors.Slow", "before_run"), payer["private_key"])
    conf = configured()[0]
    formed = batching.form(conf, force=True)
    relayer.broadcast(conf.rpc_url, formed.tx)
    assert batching.follow([formed.tx.pk], wait_seconds=20) == []
    assert Payment.objects.get(prediction__pk=created["id"]).status == "confirmed"
    assert lifecycle.claim(created["id"]) is not None
    return created["id"]


def test_a_run_that_streamed_output_or_hit_its_time_limit_is_not_refunded(chain_settings) -> None:
    """Refund policy: owed only when the run failed on our side and delivered no output. A
    before_run payer sees streamed pieces during the run, so a failure after them, or a stop at
    the time limit its input ran into (the compute was used), is not refunded."""
    from predictions import charges, lifecycle
    from predictions.runners import Outcome

    task = lifecycle.Cause.TASK
    streamed = paid_and_running(chain_settings, "streamer")
    lifecycle.record_output(streamed, ["all", "the"], cause=task)
    assert Client().get(f"/v1/predictions/{streamed}").json()["output"] == ["all", "the"]  # delivered
    lifecycle.finish(streamed, Outcome(succeeded=False, error="boom", predict_time=1.0), cause=task)

    limited = paid_and_running(chain_settings, "limited")
    lifecycle.finish(limited, Outcome(succeeded=False, error="time limit", timed_out=True, predict_time=9.0), cause=task)

    failed = paid_and_running(chain_settings, "failing")
    lifecycle.finish(failed, Outcome(succeeded=False, error="boom", predict_time=1.0), cause=task)

    assert {p.pk: p.status for p in Prediction.objects.all()} == {streamed: "failed", limited: "failed", failed: "failed"}
    ended = {pk: Prediction.objects.get(pk=pk).events.last().detail for pk in (streamed, limited, failed)}
    assert (ended[streamed]["output_pieces"], ended[streamed]["run_end"]) == (2, "failed")
    assert ended[limited]["run_end"] == "stopped"
    assert list(Refund.objects.values_list("payment__prediction__pk", flat=True)) == [failed]
    owed = Refund.objects.get().events.get(to_status="owed").detail
    assert (owed["cause"], owed["output_pieces"]) == ("failed", 0)
    assert charges.refund_cause(Prediction.objects.get(pk=streamed)) == charges.RefundCause.FAILED_AFTER_OUTPUT
    assert charges.refund_cause(Prediction.objects.get(pk=limited)) == charges.RefundCause.TIME_LIMIT


def test_re_signing_a_stuck_refund_never_passes_the_fee_cap(chain_settings, eager_celery) -> None:
    """Fees rise by 12.5% per re-sign (or to what the chain asks), never past
    X402_MAX_FEE_PER_GAS; at the cap the last transaction is only rebroadcast."""
    chain = chain_settings
    refund = owed_refund(chain)
    with no_automine(chain):
        refunds.approve(refund.pk, None)
        refund.refresh_from_db()
        first_fee = relayer.decode(refund.raw_tx)["maxFeePerGas"]
        cap = first_fee * 2
        with override_settings(X402_STUCK_AFTER_SECONDS=0, X402_MAX_FEE_PER_GAS=cap):
            for _ in range(20):
                refunds.track(refund.pk)
        refund.refresh_from_db()
        signed = [e.detail["max_fee_per_gas"] for e in refund.events.filter(to_status="sent") if "max_fee_per_gas" in e.detail]
        assert len(signed) == 5  # 1.125**5 < 2 < 1.125**6: then the cap leaves no room
        assert all(b >= a * 9 // 8 for a, b in zip([first_fee, *signed], signed, strict=False))
        assert max(signed) <= cap and relayer.decode(refund.raw_tx)["maxFeePerGas"] == signed[-1]
    assert confirm(refund).status == "confirmed" and refund_violations(chain.rpc_url) == []


def test_a_refund_wallet_without_gas_money_is_not_re_signed_and_says_why(chain_settings, eager_celery, staff) -> None:
    """Every broadcast refused (the wallet has no ETH): the same transaction is rebroadcast, its
    fees never raised; the node's answer is on the refund (the admin shows it) and counted.
    Topped up, the same transaction pays."""
    chain = chain_settings
    refund = owed_refund(chain)
    rpc(chain.rpc_url, "anvil_setBalance", [chain.refund_address, hex(10**9)])  # dust
    refunds.approve(refund.pk, None)
    refund.refresh_from_db()
    first = refund.tx_hash
    assert refund.status == "sent" and "insufficient funds" in refund.broadcast_error.lower()
    refused = REFUND_BROADCAST_ERRORS._value.get()
    with override_settings(X402_STUCK_AFTER_SECONDS=0):
        for _ in range(20):
            refunds.track(refund.pk)
    refund.refresh_from_db()
    assert refund.tx_hash == first and refund.events.filter(to_status="sent").count() == 1
    assert REFUND_BROADCAST_ERRORS._value.get() == refused + 20
    page = staff["finance"].get(f"/admin/payments/refund/{refund.pk}/change/")
    assert b"nsufficient funds" in page.content
    # Issue 25: the wallet is flagged as a lane that cannot pay; a refund approved meanwhile is
    # not signed (it waits, owed, and says why) until a balance check shows funds.
    later = owed_refund(chain)
    refunds.approve(later.pk, None)
    later.refresh_from_db()
    assert later.status == "owed" and later.failure_reason.startswith(refunds.WALLET_CANNOT_PAY)
    rpc(chain.rpc_url, "anvil_setBalance", [chain.refund_address, hex(10**18)])
    from payments.models import RelayerNonce
    from payments.tasks import reconcile

    reconcile.delay()  # the beat's pass: the balance check clears the flag, the waiting refund is sent
    assert not RelayerNonce.objects.filter(address=chain.refund_address, unfunded_since__isnull=False).exists()
    later.refresh_from_db()
    assert later.status in ("sent", "confirmed")
    refund = confirm(refund)
    assert refund.status == "confirmed" and refund.tx_hash == first and refund.broadcast_error == ""
    assert confirm(later).status == "confirmed"


def test_a_streaming_run_that_fails_after_yielding_is_not_refunded(chain_settings, eager_celery) -> None:
    """End to end through the python runner: a paid before_run generator yields two pieces (its
    payer sees them while it runs), then raises: failed, the pieces counted, nothing owed."""
    from tests.test_progress import COUNT

    payer = fresh_payer(chain_settings)
    model = python_model("countdown", "tests.predictors.Countdown", "before_run", schema=COUNT)
    created = pay(model, payer["private_key"], {"n": 3, "fail": True})
    prediction = Prediction.objects.get(pk=created["id"])
    assert (prediction.status, prediction.payment.status) == ("failed", "confirmed")
    assert "lost count" in prediction.error
    assert prediction.events.last().detail["output_pieces"] == 2
    assert not Refund.objects.exists()


def test_re_signed_fees_follow_the_chain_up_to_the_cap(settings) -> None:
    """The rule settlements and refunds share: 12.5% over the last fees, or what the latest block
    asks if more, never above X402_MAX_FEE_PER_GAS; None when the cap leaves no valid bump."""
    account = Account.create()
    raw = account.sign_transaction(
        {"chainId": 1, "nonce": 7, "to": account.address, "data": "0x", "gas": 21_000,
         "maxFeePerGas": 1_000_000_000, "maxPriorityFeePerGas": 1_000_000, "value": 0, "type": 2}
    ).raw_transaction.hex()
    raw = "0x" + raw.removeprefix("0x")
    settings.X402_MAX_FEE_PER_GAS = 10**10
    calm = {"baseFeePerGas": hex(10**8)}
    _, bumped, fee = relayer.resign_raw(raw, account, calm)
    assert fee == 1_125_000_000 and relayer.decode(bumped)["maxPriorityFeePerGas"] == 1_125_000
    assert relayer.decode(bumped)["nonce"] == 7
    surge = {"baseFeePerGas": hex(3 * 10**9)}  # the chain asks 2 x 3 gwei + the tip
    assert relayer.resign_raw(raw, account, surge)[2] == 6 * 10**9 + relayer.PRIORITY_FEE
    assert relayer.resign_raw(raw, account, {"baseFeePerGas": hex(10**11)})[2] == 10**10  # capped
    settings.X402_MAX_FEE_PER_GAS = 1_100_000_000  # below the least valid replacement
    assert relayer.resign_raw(raw, account, calm) is None


def _token_balance_slot(holder: str) -> str:
    """The storage slot of ``balanceOf[holder]`` in TestUSDC (its mapping is slot 5)."""
    from eth_utils import keccak

    return "0x" + keccak(bytes.fromhex(holder[2:].lower().rjust(64, "0") + "5".rjust(64, "0"))).hex()


def test_a_refund_approved_again_after_it_reverted_on_chain_keeps_the_gas_of_both_attempts(
    chain_settings, eager_celery, tmp_path
) -> None:
    """Issue 25, defect 6: finance approves a refund whose transfer reverted on chain (its gas
    spent) again, and the second transfer pays. The refund's gas is both attempts' (the FAILED
    event records the first one's), equal to what the chain's receipts say, and the ledger
    export shows all of it."""
    chain = chain_settings
    refund = owed_refund(chain)
    slot = _token_balance_slot(chain.refund_address)
    with override_settings(**option_settings(chain, confirmations=1)):
        with no_automine(chain):
            refunds.approve(refund.pk, None)  # estimated, signed and in the pool
            refund.refresh_from_db()
            assert refund.status == "sent"
            first = refund.tx_hash
            # Before it is mined, the wallet's token balance is gone: the transfer reverts.
            held = rpc(chain.rpc_url, "eth_getStorageAt", [chain.asset, slot, "latest"])
            rpc(chain.rpc_url, "anvil_setStorageAt", [chain.asset, slot, "0x" + "0" * 64])
            rpc(chain.rpc_url, "anvil_mine", [hex(1)])
            rpc(chain.rpc_url, "anvil_setStorageAt", [chain.asset, slot, held])
        refunds.reconcile()
        refund.refresh_from_db()
        assert refund.status == "failed" and refund.tx_hash == first
        reverted = rpc(chain.rpc_url, "eth_getTransactionReceipt", [first])
        assert reverted["status"] == "0x0" and int(reverted["gasUsed"], 16) > 0
        failed = refund.events.get(to_status="failed").detail
        assert failed["gas_used"] == int(reverted["gasUsed"], 16)

        refunds.approve(refund.pk, None)  # again: sent at once, then confirmed
        refund = confirm(refund)
        assert refund.status == "confirmed" and refund.tx_hash != first
    paid = rpc(chain.rpc_url, "eth_getTransactionReceipt", [refund.tx_hash])

    def cost(receipt: dict) -> int:
        return int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)

    assert refund.gas_used == int(reverted["gasUsed"], 16) + int(paid["gasUsed"], 16)
    assert int(refund.gas_cost_wei) == cost(reverted) + cost(paid)
    exports.write_zip(LedgerFilter(), tmp_path / "ledger.zip")
    with zipfile.ZipFile(tmp_path / "ledger.zip") as archive:
        data = list(csv.DictReader(io.StringIO(archive.read("data.csv").decode())))
    [line] = [r for r in data if r["kind"] == "refund" and r["transaction"] == refund.tx_hash]
    assert Decimal(line["gas_cost_wei"]) == cost(reverted) + cost(paid)
    assert Decimal(line["gas_native"]) == Decimal(cost(reverted) + cost(paid)).scaleb(-18)
    assert refund_violations(chain.rpc_url) == []
    # A revert recorded before FAILED events carried gas: its gas is read from its receipt.
    legacy = {k: v for k, v in failed.items() if k not in ("gas_used", "gas_cost_wei")}
    refund.events.filter(to_status="failed").update(detail=legacy)
    assert refunds._earlier_gas(refund, chain.rpc_url) == (int(reverted["gasUsed"], 16), cost(reverted))


def test_a_refund_is_an_outbox_transaction_of_the_refund_wallet(chain_settings, eager_celery) -> None:
    """Issue 26: a refund's transfer is an outbox row (SettlementTx, kind refund) of the refund
    wallet, stored before it is broadcast; its nonce stays held while the refund waits (the
    wallet's next transaction takes the next one even when the node lost it), a balance check
    of the wallet counts what it may cost, and it is re-signed on that row (same nonce, every
    hash kept) until one is mined."""
    from unittest import mock

    from payments.models import RelayerNonce, SettlementTx
    from payments.options import configured

    chain = chain_settings
    conf = configured()[0]
    refund = owed_refund(chain)
    wallet = refunds.wallet().address
    pending = int(rpc(chain.rpc_url, "eth_getTransactionCount", [wallet, "pending"]), 16)
    stored_at_broadcast = []
    send_raw = relayer.send_raw

    def spy(url: str, raw: str) -> str | None:
        stored_at_broadcast.append(list(SettlementTx.objects.filter(raw_tx=raw).values_list("kind", "relayer", "nonce")))
        return send_raw(url, raw)

    with no_automine(chain):
        with mock.patch.object(relayer, "send_raw", spy):
            refunds.approve(refund.pk, None)
        refund.refresh_from_db()
        tx = refund.tx
        assert (tx.kind, tx.relayer, tx.nonce, tx.items, tx.tx_hash) == ("refund", wallet, pending, 1, refund.tx_hash)
        assert stored_at_broadcast == [[("refund", wallet, pending)]]
        first = tx.tx_hash

        rpc(chain.rpc_url, "anvil_dropTransaction", [first])  # the node lost it: the refund still holds its nonce
        assert relayer.allocate_nonce(conf, refund.network, wallet) == pending + 1

        cost = tx.gas_limit * int(tx.max_fee_per_gas)
        RelayerNonce.objects.filter(address=wallet).update(unfunded_since=timezone.now(), unfunded_reason="test")
        with override_settings(X402_RELAYER_MIN_BALANCE_WEI=10**15):
            rpc(chain.rpc_url, "anvil_setBalance", [wallet, hex(10**15 + cost - 1)])
            assert relayer.recheck_unfunded({refund.network: chain.rpc_url}) == set()
            rpc(chain.rpc_url, "anvil_setBalance", [wallet, hex(10**15 + cost)])
            assert relayer.recheck_unfunded({refund.network: chain.rpc_url}) == {refund.network}
        rpc(chain.rpc_url, "anvil_setBalance", [wallet, hex(10**18)])

        refunds.track(refund.pk)  # not stuck: the same bytes again
        with override_settings(X402_STUCK_AFTER_SECONDS=0):
            refunds.track(refund.pk)  # stuck in the pool: re-signed on its row
        tx.refresh_from_db()
        refund.refresh_from_db()
        assert (refund.tx_id, tx.nonce, tx.replaced_hashes, tx.tx_hash) == (tx.pk, pending, [first], refund.tx_hash)
        rpc(chain.rpc_url, "anvil_mine", [hex(1)])
    refund = confirm(refund)
    tx.refresh_from_db()
    assert refund.status == "confirmed" and tx.block_number == refund.block_number and tx.gas_used == refund.gas_used
    assert SettlementTx.objects.filter(kind="refund").count() == 1 and refund_violations(chain.rpc_url) == []
