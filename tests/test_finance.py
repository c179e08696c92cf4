"""Finance: ledger exports (CSV, XLSX, command, admin), totals, audit, dashboard, permissions."""

from __future__ import annotations

import csv
import io
import secrets
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.utils import timezone

from payments.exports import COLUMNS
from payments.models import LedgerExport, Payment
from predictions.models import Prediction

pytestmark = pytest.mark.django_db


def make_payment(
    model, *, status: str, amount: int, created: datetime, network: str = "eip155:31337"
) -> Payment:
    p = Payment.objects.create(
        status=status,
        x402_version=2,
        network=network,
        asset="0x5FbDB2315678afecb367f032d93F642f64180aa3",
        payer="0x" + secrets.token_hex(20),
        pay_to="0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        amount=amount,
        nonce="0x" + secrets.token_hex(32),
        valid_after=0,
        valid_before=2**40,
        signature="0x00",
        payload={},
        requirement={},
        resource="http://x/",
        request_fingerprint="f",
        created_at=created,
        settle_tx_hash=("0x" + secrets.token_hex(32))
        if status in ("settled", "confirmed", "failed")
        else None,
        block_number=7 if status in ("settled", "confirmed") else None,
        confirmations=1,
        settled_at=created if status in ("settled", "confirmed") else None,
        confirmed_at=created if status == "confirmed" else None,
        gas_cost_wei=82_900 * 10**9,
        failure_reason="settlement transaction reverted" if status == "failed" else "",
    )
    if model is not None:
        Prediction.objects.create(
            model=model,
            version=model.latest_version,
            input={"text": "secret input"},
            output="secret output",
            payment=p,
        )
    return p


@pytest.fixture
def ledger_rows(demo_model):
    now = timezone.now()
    rows = [
        make_payment(demo_model, status="confirmed", amount=10_000, created=now - timedelta(days=2)),
        make_payment(demo_model, status="confirmed", amount=10_001, created=now - timedelta(days=1)),
        make_payment(demo_model, status="settled", amount=250_000, created=now - timedelta(hours=3)),
        make_payment(demo_model, status="verified", amount=10_000, created=now - timedelta(hours=2)),
        make_payment(demo_model, status="failed", amount=10_000, created=now - timedelta(hours=1)),
        make_payment(
            None, status="expired", amount=333, created=now - timedelta(minutes=5), network="eip155:8453"
        ),
    ]
    return rows


def read_csv(text: str) -> tuple[list[dict], list[list[str]]]:
    lines = list(csv.reader(io.StringIO(text)))
    header, body = lines[0], lines[1:]
    assert header == COLUMNS
    rows = [dict(zip(header, r, strict=True)) for r in body if r and r[0] != "TOTAL"]
    totals = [r for r in body if r and r[0] == "TOTAL"][1:]
    return rows, totals


def test_csv_export_columns_decimals_and_totals(ledger_rows, capsys) -> None:
    call_command("export_ledger")
    rows, totals = read_csv(capsys.readouterr().out)
    assert len(rows) == 6
    first = rows[0]
    assert first["amount"] == "0.010000" and first["amount_atomic"] == "10000"
    assert rows[1]["amount"] == "0.010001"  # no float rounding
    assert first["created_at"].endswith("Z") and first["model"] == "demo/echo-text"
    assert first["hardware_tier"] in ("cpu", "") and first["prediction_status"] == "starting"
    assert "secret" not in "".join(",".join(r.values()) for r in rows)  # no inputs or outputs
    by_status: dict[str, Decimal] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], Decimal(0)) + Decimal(r["amount"])
    assert {t[1]: Decimal(t[5]) for t in totals if t[2] == "eip155:31337"} == {
        k: v for k, v in by_status.items() if k != "expired"
    }
    assert LedgerExport.objects.get().rows == 6


def test_command_filters(ledger_rows, capsys, tmp_path) -> None:
    since = (timezone.now() - timedelta(hours=4)).isoformat()
    call_command("export_ledger", "--since", since, "--status", "settled", "--status", "verified")
    rows, _ = read_csv(capsys.readouterr().out)
    assert sorted(r["status"] for r in rows) == ["settled", "verified"]
    call_command("export_ledger", "--network", "eip155:8453", "--output", str(tmp_path / "x.csv"))
    rows, _ = read_csv((tmp_path / "x.csv").read_text())
    assert [r["status"] for r in rows] == ["expired"] and rows[0]["model"] == ""
    call_command("export_ledger", "--model", "demo/echo-text", "--until", since)
    rows, _ = read_csv(capsys.readouterr().out)
    assert sorted(r["status"] for r in rows) == ["confirmed", "confirmed"]


def test_xlsx_is_typed_with_frozen_header_and_summary(ledger_rows, tmp_path) -> None:
    from openpyxl import load_workbook

    path = tmp_path / "ledger.xlsx"
    call_command("export_ledger", "--format", "xlsx", "--output", str(path))
    book = load_workbook(path)
    sheet = book["Ledger"]
    assert sheet.freeze_panes == "A2"
    assert [c.value for c in sheet[1]] == COLUMNS
    second = sheet[2]
    col = {name: i for i, name in enumerate(COLUMNS)}
    assert isinstance(second[col["created_at"]].value, datetime)
    assert (
        second[col["amount"]].value == pytest.approx(0.01)
        and second[col["amount"]].number_format == "0.000000"
    )
    assert isinstance(second[col["amount_atomic"]].value, int)
    summary = {(r[0], r[1]): r[4] for r in book["Summary"].iter_rows(min_row=2, values_only=True)}
    assert summary[("confirmed", "eip155:31337")] == pytest.approx(0.020001)


def test_admin_exports_stream_and_are_audited(ledger_rows, staff) -> None:
    response = staff["finance"].get("/admin/payments/payment/export/csv/?status__exact=confirmed")
    assert response.status_code == 200 and response.streaming
    rows, _ = read_csv(b"".join(response.streaming_content).decode())
    assert [r["status"] for r in rows] == ["confirmed", "confirmed"]
    audit = LedgerExport.objects.get()
    assert (
        audit.user.username == "finn"
        and audit.rows == 2
        and "status__exact=confirmed" in audit.filters["changelist"]
    )
    action = staff["finance"].post(
        "/admin/payments/payment/",
        {"action": "export_xlsx", "_selected_action": [str(ledger_rows[0].pk), str(ledger_rows[1].pk)]},
    )
    assert action.status_code == 200 and action["Content-Type"].startswith("application/vnd.openxmlformats")


def test_who_may_see_the_ledger(ledger_rows, staff, demo_model) -> None:
    pages = [
        "/admin/payments/payment/",
        "/admin/payments/payment/export/csv/",
        "/admin/payments/payment/dashboard/",
        f"/admin/payments/payment/{ledger_rows[0].pk}/change/",
    ]
    for page in pages:
        assert staff["finance"].get(page).status_code == 200, page
        assert staff["operator"].get(page).status_code == 403, page
        assert staff["anonymous"].get(page).status_code == 302, page
    # Finance sees no prices, predictions (inputs and outputs) or tiers.
    for page in [
        "/admin/predictions/model/",
        "/admin/predictions/prediction/",
        "/admin/payments/hardwaretier/",
        f"/admin/predictions/model/{demo_model.pk}/change/",
    ]:
        assert staff["finance"].get(page).status_code == 403, page
    # Nobody edits the ledger through the admin.
    change = staff["finance"].post(
        f"/admin/payments/payment/{ledger_rows[0].pk}/change/", {"status": "failed"}
    )
    assert change.status_code == 403
    ledger_rows[0].refresh_from_db()
    assert ledger_rows[0].status == "confirmed"


def test_dashboard_agrees_with_the_export(ledger_rows, staff, capsys) -> None:
    page = staff["finance"].get("/admin/payments/payment/dashboard/")
    assert page.status_code == 200 and b"<svg" in page.content
    call_command("export_ledger")
    rows, _ = read_csv(capsys.readouterr().out)
    paid = sum(Decimal(r["amount"]) for r in rows if r["status"] in ("settled", "confirmed"))
    pending = sum(Decimal(r["amount"]) for r in rows if r["status"] in ("verified", "settling"))
    assert page.context["revenue"] == paid == Decimal("0.270001")
    assert page.context["pending"] == pending
    counts = dict(page.context["by_status"])
    assert counts == {s: sum(1 for r in rows if r["status"] == s) for s in counts}
    assert [m for m, _, _ in page.context["by_model"]] == ["demo/echo-text"]
    assert len(page.context["attention"]) == 2  # the failed and the expired payment


def test_money_moved_for_other_merchants_is_not_our_revenue(ledger_rows, staff, settings) -> None:
    """The facilitator API settles payments to other merchants' pay-to: the ledger keeps them,
    the dashboard's revenue does not count them (it shows them apart); one to our own pay-to is ours."""
    from payments.models import VerificationMethod

    our_pay_to = ledger_rows[0].pay_to
    settings.X402_PAYMENT_OPTIONS = [
        {
            "network": "eip155:31337",
            "asset": ledger_rows[0].asset,
            "asset_name": "USD Coin",
            "asset_version": "2",
            "pay_to": our_pay_to,
            "rpc_url": "http://127.0.0.1:9",
        }
    ]
    before = staff["finance"].get("/admin/payments/payment/dashboard/").context
    now = timezone.now()
    theirs = make_payment(None, status="confirmed", amount=7_000_000, created=now - timedelta(minutes=3))
    ours = make_payment(None, status="settled", amount=5, created=now - timedelta(minutes=2))
    Payment.objects.filter(pk=theirs.pk).update(
        verification=VerificationMethod.FACILITATOR_API, pay_to="0x" + "ab" * 20
    )
    Payment.objects.filter(pk=ours.pk).update(
        verification=VerificationMethod.FACILITATOR_API, pay_to=our_pay_to
    )

    page = staff["finance"].get("/admin/payments/payment/dashboard/")
    assert page.context["revenue"] == before["revenue"] + Decimal("0.000005")
    assert page.context["moved_for_others"] == Decimal("7")
    assert b'id="moved-for-others">7' in page.content
    assert sum(amount for _, amount, _ in page.context["by_model"]) == page.context["revenue"]
    assert Payment.objects.count() == len(ledger_rows) + 2  # the ledger still holds both


def test_the_admin_never_shows_a_payment_identifier(demo_model, staff) -> None:
    """The stored payload with its payment-identifier is a replay key to the prediction it
    bought: staff see the payload with the id redacted."""
    p = make_payment(demo_model, status="confirmed", amount=10_000, created=timezone.now())
    key = "idem_" + secrets.token_hex(12)
    Payment.objects.filter(pk=p.pk).update(
        payload={"x402Version": 2, "extensions": {"payment-identifier": {"info": {"required": False, "id": key}}}}
    )
    page = staff["finance"].get(f"/admin/payments/payment/{p.pk}/change/")
    assert page.status_code == 200
    assert b"payment-identifier" in page.content and key.encode() not in page.content
