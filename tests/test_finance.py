"""Finance: ledger exports (CSV, XLSX, command, admin), totals, audit, dashboard, permissions."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
import zipfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.utils import timezone

from payments.finance import export_jobs, exports
from payments.finance.ledger_lines import NAMES
from payments.models import ExportJob, NativeTokenRate, Payment
from payments.tasks import expire_exports
from predictions.models import Prediction, prediction_ref

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


def read_csv(text: str) -> list[dict]:
    """The data rows of an export's data.csv: the header is the columns, and every row is data."""
    lines = list(csv.reader(io.StringIO(text)))
    header, body = lines[0], lines[1:]
    assert header == NAMES
    return [dict(zip(header, r, strict=True)) for r in body]


def read_zip(path) -> tuple[list[dict], list[dict], dict]:
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["data.csv", "export.json", "rates.csv", "summary.csv"]
        data = read_csv(archive.read("data.csv").decode())
        summary = list(csv.DictReader(io.StringIO(archive.read("summary.csv").decode())))
        about = json.loads(archive.read("export.json"))
        assert about["data_sha256"] == hashlib.sha256(archive.read("data.csv")).hexdigest()
    return data, summary, about


def test_csv_export_columns_decimals_and_a_separate_summary(ledger_rows, capsys, tmp_path, staff) -> None:
    call_command("export_ledger")
    captured = capsys.readouterr()
    rows = read_csv(captured.out)
    assert len(rows) == 6 and not any("TOTAL" in ",".join(r.values()) for r in rows)
    first = rows[0]
    assert first["kind"] == "payment"
    assert first["amount"] == "0.010000" and first["amount_atomic"] == "10000"
    assert rows[1]["amount"] == "0.010001"  # no float rounding
    assert datetime.fromisoformat(first["created_at"]) == ledger_rows[0].created_at
    assert first["model"] == "demo/echo-text" and rows[-1]["model"] == ""
    assert first["hardware_tier"] in ("cpu", "") and first["prediction_status"] == "starting"
    assert "secret" not in "".join(",".join(r.values()) for r in rows)  # no inputs or outputs
    # A prediction's id is a bearer capability (read, cancel): exports name its ref instead, an
    # HMAC of the id under a purpose-keyed secret, which the admin can look a prediction up by.
    predictions = list(Prediction.objects.order_by("created_at"))
    assert "prediction_id" not in rows[0] and len(predictions) == 5
    everything = captured.out + captured.err
    assert not any(p.pk in everything for p in predictions)
    assert first["prediction_ref"] == predictions[0].ref == prediction_ref(predictions[0].pk)
    assert len(first["prediction_ref"]) == 32 and rows[-1]["prediction_ref"] == ""
    found = staff["operator"].get("/admin/predictions/prediction/", {"q": first["prediction_ref"]})
    assert [p.pk for p in found.context["cl"].result_list] == [predictions[0].pk]
    assert "status,network" in captured.err  # the summary goes beside the data, not into it

    call_command("export_ledger", "--output", str(tmp_path / "ledger.zip"))
    data, summary, about = read_zip(tmp_path / "ledger.zip")
    assert data == rows
    by_status: dict[tuple[str, str], Decimal] = {}
    for r in data:
        key = (r["status"], r["network"])
        by_status[key] = by_status.get(key, Decimal(0)) + Decimal(r["amount"])
    assert {(s["status"], s["network"]): Decimal(s["amount"]) for s in summary} == by_status
    assert sum(int(s["rows"]) for s in summary) == 6 == about["rows"]
    audit = ExportJob.objects.filter(source="command").order_by("pk")
    assert [j.rows for j in audit] == [6, 6] and audit[1].checksum == hashlib.sha256(
        (tmp_path / "ledger.zip").read_bytes()
    ).hexdigest()


def test_gas_in_the_native_token_converted_at_the_rate_finance_set(ledger_rows, staff, tmp_path) -> None:
    answer = staff["finance"].post(
        "/admin/payments/nativetokenrate/add/",
        {"network": "eip155:31337", "symbol": "ETH", "usd_per_token": "3000", "source": "Coinbase close 2026-11-25"},
    )
    assert answer.status_code == 302
    rate = NativeTokenRate.objects.get()
    assert rate.set_by.username == "finn"
    call_command("export_ledger", "--output", str(tmp_path / "ledger.zip"))
    data, summary, about = read_zip(tmp_path / "ledger.zip")
    confirmed = next(r for r in data if r["status"] == "confirmed")
    # 82,900 gas at 1 gwei = 0.0000829 ETH = 0.2487 USD at 3,000 USD/ETH.
    assert confirmed["gas_native"] == "0.000082900000000000" and confirmed["gas_usd"] == "0.248700"
    assert Decimal(confirmed["net_amount"]) == Decimal(confirmed["amount"]) - Decimal("0.2487")
    verified = next(r for r in data if r["status"] == "verified")
    assert Decimal(verified["net_amount"]) == Decimal("-0.2487")  # gas spent, nothing paid
    other_chain = next(r for r in data if r["network"] == "eip155:8453")
    assert other_chain["gas_usd"] == other_chain["net_amount"] == ""  # no rate: no net figure
    assert about["rates"]["eip155:31337"]["source"] == "Coinbase close 2026-11-25"
    with zipfile.ZipFile(tmp_path / "ledger.zip") as archive:
        assert "Coinbase close 2026-11-25" in archive.read("rates.csv").decode()
    net = {(s["status"], s["network"]): s["net_amount"] for s in summary}
    assert Decimal(net[("confirmed", "eip155:31337")]) == sum(
        Decimal(r["net_amount"]) for r in data if r["status"] == "confirmed"
    )
    assert net[("expired", "eip155:8453")] == ""
    # Rates are added, never edited: the history stays.
    assert staff["finance"].post(f"/admin/payments/nativetokenrate/{rate.pk}/change/", {}).status_code == 403


def test_periods_by_the_money_date_in_the_chosen_time_zone(demo_model, capsys) -> None:
    paris = ZoneInfo("Europe/Paris")
    # Accepted on 28 Nov, mined at 23:30 UTC on 30 Nov: 1 Dec in Paris.
    late = make_payment(demo_model, status="confirmed", amount=10_000, created=datetime(2026, 11, 28, 12, tzinfo=UTC))
    Payment.objects.filter(pk=late.pk).update(settled_at=datetime(2026, 11, 30, 23, 30, tzinfo=UTC))
    early = make_payment(demo_model, status="confirmed", amount=20_000, created=datetime(2026, 11, 30, 9, tzinfo=UTC))

    def ids(*args: str) -> list[str]:
        call_command("export_ledger", *args)
        return [r["payment_id"] for r in read_csv(capsys.readouterr().out)]

    november = ["--since", "2026-11-01", "--until", "2026-12-01"]
    assert ids(*november) == [str(late.pk), str(early.pk)]  # by creation
    assert ids(*november, "--basis", "money") == [str(early.pk), str(late.pk)]  # UTC: both in November
    assert ids(*november, "--basis", "money", "--tz", "Europe/Paris") == [str(early.pk)]
    call_command("export_ledger", "--basis", "money", "--tz", "Europe/Paris", "--since", "2026-12-01")
    [row] = read_csv(capsys.readouterr().out)
    assert row["payment_id"] == str(late.pk)
    assert datetime.fromisoformat(row["money_at"]).utcoffset() == datetime(2026, 12, 1, tzinfo=paris).utcoffset()
    assert datetime.fromisoformat(row["money_at"]) == datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    with pytest.raises(CommandError, match="unknown time zone"):
        call_command("export_ledger", "--tz", "Mars/Olympus")


def test_command_filters(ledger_rows, capsys, tmp_path) -> None:
    since = (timezone.now() - timedelta(hours=4)).isoformat()
    call_command("export_ledger", "--since", since, "--status", "settled", "--status", "verified")
    rows = read_csv(capsys.readouterr().out)
    assert sorted(r["status"] for r in rows) == ["settled", "verified"]
    call_command("export_ledger", "--network", "eip155:8453", "--output", str(tmp_path / "x.zip"))
    rows, _, _ = read_zip(tmp_path / "x.zip")
    assert [r["status"] for r in rows] == ["expired"] and rows[0]["model"] == ""
    call_command("export_ledger", "--model", "demo/echo-text", "--until", since)
    rows = read_csv(capsys.readouterr().out)
    assert sorted(r["status"] for r in rows) == ["confirmed", "confirmed"]


def test_xlsx_is_typed_with_frozen_header_and_summary(ledger_rows, tmp_path) -> None:
    from openpyxl import load_workbook

    path = tmp_path / "ledger.xlsx"
    call_command("export_ledger", "--format", "xlsx", "--output", str(path))
    book = load_workbook(path)
    sheet = book["Data"]
    assert sheet.freeze_panes == "A2"
    assert [c.value.split(" (")[0] for c in sheet[1]] == NAMES
    assert sheet.max_row == 7  # the header and six payments: no totals in the data
    second = sheet[2]
    col = {name: i for i, name in enumerate(NAMES)}
    assert isinstance(second[col["created_at"]].value, datetime)
    assert (
        second[col["amount"]].value == pytest.approx(0.01)
        and second[col["amount"]].number_format == "0.000000"
    )
    assert isinstance(second[col["amount_atomic"]].value, int)
    assert second[col["ours"]].value is True  # a boolean cell, not 1
    summary = {(r[1], r[2], r[3]): r[7] for r in book["Summary"].iter_rows(min_row=2, values_only=True) if r[0]}
    assert summary[(True, "confirmed", "eip155:31337")] == pytest.approx(0.020001)


@pytest.fixture
def inline_jobs(django_capture_on_commit_callbacks, eager_celery, settings, tmp_path):
    settings.X402_EXPORT_DIR = tmp_path / "exports"
    return django_capture_on_commit_callbacks


def test_admin_export_runs_in_the_background_shows_progress_and_expires(
    ledger_rows, staff, inline_jobs, monkeypatch
) -> None:
    client = staff["finance"]
    form = client.get("/admin/payments/payment/export/?status__exact=confirmed")
    assert form.status_code == 200 and form.context["form"].initial["statuses"] == ["confirmed"]
    bad = client.post("/admin/payments/payment/export/", {"format": "csv", "basis": "money", "tz": "Mars/Olympus"})
    assert bad.status_code == 200 and "unknown time zone" in bad.content.decode()
    assert not ExportJob.objects.exists()

    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(exports, "PROGRESS_EVERY", 0)
    real = export_jobs.WRITERS["csv"]

    def watched(flt, path, progress):
        def report(done: int, total: int) -> None:
            progress(done, total)
            seen.append(cache.get(export_jobs.progress_key(job_id)))  # what the job's page reads

        return real(flt, path, report)

    monkeypatch.setitem(export_jobs.WRITERS, "csv", watched)
    with inline_jobs(execute=True):
        started = client.post(
            "/admin/payments/payment/export/",
            {"format": "csv", "basis": "created", "tz": "UTC", "statuses": ["confirmed"]},
        )
        job_id = ExportJob.objects.get().pk  # queued: the task runs when the request's transaction commits
    job = ExportJob.objects.get()
    assert started.status_code == 302 and started["Location"].endswith(f"/exportjob/{job.pk}/change/")
    assert seen == [(2, 2)]
    assert (job.status, job.rows, job.user.username, job.filters["statuses"]) == ("done", 2, "finn", ["confirmed"])
    # While a job runs, its page shows rows done of total (from the cache) and refreshes itself.
    ExportJob.objects.filter(pk=job.pk).update(status="running")
    cache.set(export_jobs.progress_key(job.pk), (1, 2))
    running = client.get(f"/admin/payments/exportjob/{job.pk}/change/").content.decode()
    assert "1 of 2 (50%)" in running and 'http-equiv="refresh"' in running
    ExportJob.objects.filter(pk=job.pk).update(status="done")
    page = client.get(f"/admin/payments/exportjob/{job.pk}/change/").content.decode()
    assert "Download" in page and 'http-equiv="refresh"' not in page
    download = client.get(f"/admin/payments/exportjob/{job.pk}/download/")
    body = b"".join(download.streaming_content)
    assert download.status_code == 200 and hashlib.sha256(body).hexdigest() == job.checksum
    path = export_jobs.path_of(job)
    data, _, _ = read_zip(io.BytesIO(body))
    assert [r["status"] for r in data] == ["confirmed", "confirmed"]
    assert staff["operator"].get(f"/admin/payments/exportjob/{job.pk}/download/").status_code == 403
    # Downloads are audited; another finance user may not take finn's file without the
    # download_any_export permission.
    from django.contrib.auth.models import Group, Permission, User
    from django.test import Client

    from payments.roles import FINANCE

    fay = User.objects.create_user("fay", is_staff=True)
    fay.groups.add(Group.objects.get(name=FINANCE))
    other = Client()
    other.force_login(fay)
    assert other.get(f"/admin/payments/exportjob/{job.pk}/download/").status_code == 403
    fay.user_permissions.add(Permission.objects.get(codename="download_any_export"))
    allowed = other.get(f"/admin/payments/exportjob/{job.pk}/download/")
    assert allowed.status_code == 200 and b"".join(allowed.streaming_content) == body
    assert [d.user.username for d in job.downloads.all()] == ["finn", "fay"]
    assert "fay" in client.get(f"/admin/payments/exportjob/{job.pk}/change/").content.decode()

    ExportJob.objects.filter(pk=job.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert expire_exports() == 1
    job.refresh_from_db()
    assert job.status == "expired" and not path.exists() and job.checksum  # the audit stays
    assert client.get(f"/admin/payments/exportjob/{job.pk}/download/").status_code == 404


def test_xlsx_job_and_a_failed_job(ledger_rows, staff, inline_jobs, monkeypatch) -> None:
    with inline_jobs(execute=True):
        staff["finance"].post("/admin/payments/payment/export/", {"format": "xlsx", "basis": "money", "tz": "UTC"})
    job = ExportJob.objects.get()
    assert job.status == "done" and job.file_name.endswith(".xlsx") and job.rows == 6

    def broken(flt, path, progress):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setitem(export_jobs.WRITERS, "csv", broken)
    with pytest.raises(OSError), inline_jobs(execute=True):
        staff["finance"].post("/admin/payments/payment/export/", {"format": "csv", "basis": "created", "tz": "UTC"})
    failed = ExportJob.objects.get(status="failed")
    assert "disk full" in failed.error and not list(export_jobs.path_of(failed).parent.glob("*.zip"))


def test_who_may_see_the_ledger(ledger_rows, staff, demo_model) -> None:
    pages = [
        "/admin/payments/payment/",
        "/admin/payments/payment/export/",
        "/admin/payments/payment/reconciliation/",
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
    rows = read_csv(capsys.readouterr().out)
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


def test_an_export_whose_worker_died_is_taken_over(ledger_rows, settings, tmp_path) -> None:
    """acks_late: the broker hands a lost worker's task out again; a job running for an hour
    (a million rows take seconds) is taken over, a job running now is left to its worker."""
    settings.X402_EXPORT_DIR = tmp_path
    running = ExportJob.objects.create(source="admin", format="csv", status="running", started_at=timezone.now())
    assert export_jobs.run(running.pk).status == "running" and not list(tmp_path.iterdir())
    ExportJob.objects.filter(pk=running.pk).update(started_at=timezone.now() - timedelta(hours=2))
    taken = export_jobs.run(running.pk)
    assert taken.status == "done" and taken.rows == 6 and export_jobs.path_of(taken).exists()
