#!/usr/bin/env python
"""Make the README's finance screenshots from a real run: anvil with the test USDC, a fresh
database (``x402_shots``, or ``X402_SHOTS_DATABASE``), payments settled in one batch on chain,
a direct transfer to pay-to and a ledger row without its transaction (the reconciliation
flags both; the dashboard shows the day), then a large synthetic ledger, the dev server and a Celery worker (the export runs in
the background while Chromium looks at its page).

    .venv/bin/python scripts/finance_screenshots.py      # writes docs/img/finance-*.png

Development only; needs node, npm playwright-core and Debian's chromium (``make tools``).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMG = ROOT / "docs" / "img"
#: Synthetic settled payments, so that the export runs long enough to be seen in progress.
SYNTHETIC_ROWS = int(os.environ.get("X402_SHOTS_ROWS", "400000"))


def main() -> int:
    from payments.chain import devchain
    from tests.conftest import free_port

    tmp = Path(tempfile.mkdtemp(prefix="x402-shots-"))
    procs = []
    port = free_port()
    anvil, config = devchain.start_anvil(port, accounts=12, log_path=tmp / "anvil.log")
    procs.append(anvil)
    try:
        chain = devchain.deploy(f"http://127.0.0.1:{port}", config, payer_count=8)
        chain.write(tmp / "devchain.json")
        env = {
            **os.environ,
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{os.environ.get('X402_SHOTS_DATABASE', 'x402_shots')}",
            "X402_DEVCHAIN_FILE": str(tmp / "devchain.json"),
            "DJANGO_DEBUG": "true",
            "CELERY_BROKER_URL": os.environ.get("X402_SHOTS_REDIS", "redis://127.0.0.1:6379/12"),
            "CELERY_TASK_DEFAULT_QUEUE": f"shots-{secrets.token_hex(3)}",
            "CACHE_URL": os.environ.get("X402_SHOTS_REDIS", "redis://127.0.0.1:6379/12"),
            "X402_EXPORT_DIR": str(tmp / "exports"),
            "X402_LOG_LEVEL": "WARNING",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith(("DATABASE", "X402", "CELERY", "CACHE", "DJANGO"))})
        os.environ["DJANGO_SETTINGS_MODULE"] = "x402site.settings"
        import django

        django.setup()
        from payments.management.commands.quickstart import ensure_database

        ensure_database(fresh=True)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        since = seed(chain)
        web = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "manage.py", "runserver", f"127.0.0.1:{web}", "--noreload"],
                cwd=ROOT, env=env, stdout=open(tmp / "web.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "x402site", "worker", "-l", "warning", "-c", "1",
                 "-Q", env["CELERY_TASK_DEFAULT_QUEUE"]],
                cwd=ROOT, env=env, stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            )
        )
        base = f"http://127.0.0.1:{web}"
        devchain.wait_http(base + "/")
        login = ["--base-url", base, "--user", "finn", "--password", "finance-pw"]
        day = since.date().isoformat()
        subprocess.run(
            ["node", "scripts/screenshot.mjs", *login, "--height", "900",
             f"/admin/payments/payment/reconciliation/?since={day}&until={day}&tz=UTC={IMG / 'finance-reconciliation.png'}",
             f"/admin/payments/payment/dashboard/?since={day}&until={day}&basis=money&tz=UTC={IMG / 'finance-dashboard.png'}"],
            cwd=ROOT, check=True,
        )
        synthetic_ledger(chain)  # after the pages above: a large ledger for the export to work through
        subprocess.run(
            ["node", "scripts/screenshot_export.mjs", *login, "--wait-ms", "400", "--out", str(IMG / "finance-export-progress.png")],
            cwd=ROOT, check=True,
        )
    finally:
        for proc in reversed(procs):
            devchain.stop(proc)
    return 0


def seed(chain) -> datetime:  # type: ignore[no-untyped-def]
    """The ledger and the chain the screenshots show; the start of the reconciled day."""
    from django.contrib.auth.models import Group, User
    from django.utils import timezone

    from payments.chain import batching
    from payments.finance import reconciliation
    from payments.models import NativeTokenRate, Payment
    from payments.options import configured, payment_options
    from payments.roles import FINANCE, ensure_roles
    from payments.x402.types import Requirement
    from tests.conftest import fresh_payer, rpc
    from tests.payers import record
    from tests.test_settlement import send_as

    ensure_roles()
    finn = User.objects.create_user("finn", password="finance-pw", is_staff=True)
    finn.groups.add(Group.objects.get(name=FINANCE))
    NativeTokenRate.objects.create(
        network=chain.network, usd_per_token="3012.50", source="Coinbase ETH-USD close 2026-11-25", set_by=finn
    )
    since = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    for amount in (10_000, 10_000, 25_000, 50_000, 120_000, 10_000):
        record(fresh_payer(chain)["private_key"], Requirement(payment_options()[0], amount))
    sent = batching.run(configured()[0], force=True)
    batching.follow([tx.pk for tx in sent], wait_seconds=20)
    direct = fresh_payer(chain)
    to = chain.pay_to[2:].lower().rjust(64, "0")
    send_as(chain, direct["address"], chain.asset, "0xa9059cbb" + to + hex(75_000)[2:].rjust(64, "0"))
    head = int(rpc(chain.rpc_url, "eth_blockNumber", []), 16)
    ghost = Payment.objects.create(
        status="confirmed", x402_version=2, network=chain.network, asset=chain.asset,
        payer="0x" + secrets.token_hex(20), pay_to=chain.pay_to, amount=30_000,
        nonce="0x" + secrets.token_hex(32), valid_after=0, valid_before=2**40, signature="0x00", payload={},
        requirement={}, resource="http://shots/", request_fingerprint="x",
        settle_tx_hash="0x" + secrets.token_hex(32), block_number=head, settled_at=timezone.now(),
        confirmed_at=timezone.now(),
    )
    reconciliation.annotate(f"payment:{ghost.pk}", "restored from a backup by hand: tx hash mistyped, ticket FIN-42", author=finn)
    refund_a_failed_run(chain, finn)
    return since


def refund_a_failed_run(chain, approver) -> None:  # type: ignore[no-untyped-def]
    """A before_run prediction paid through the API whose run fails: its refund is owed,
    approved and sent back by the refund wallet, then confirmed (tasks run in this process)."""
    import time

    from django.test import Client

    from payments import refunds
    from payments.models import Refund
    from predictions.models import Model, ModelVersion
    from tests.conftest import fresh_payer
    from tests.payers import v2_header_for
    from x402site.celery import app

    app.conf.task_always_eager = True
    try:
        model = Model.objects.create(owner="demo", name="flaky", price="0.02", settlement_policy="before_run")
        ModelVersion.objects.create(
            id="flaky-v1", model=model, runner="python", predictor="tests.predictors.Boom",
            input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        )
        url, body = "/v1/models/demo/flaky/predictions", {"input": {"text": "hello"}}
        challenge = Client().post(url, data=body, content_type="application/json")
        header = v2_header_for(fresh_payer(chain)["private_key"], challenge["PAYMENT-REQUIRED"])
        Client().post(url, data=body, content_type="application/json", headers={"PAYMENT-SIGNATURE": header})
        refund = Refund.objects.get()
        refunds.approve(refund.pk, approver)
        deadline = time.monotonic() + 20
        while Refund.objects.get(pk=refund.pk).status != "confirmed" and time.monotonic() < deadline:
            refunds.reconcile()
            time.sleep(0.1)
    finally:
        app.conf.task_always_eager = False


def synthetic_ledger(chain) -> None:  # type: ignore[no-untyped-def]
    """SYNTHETIC_ROWS settled payments on another network (written straight to the table)."""
    from payments.models import Payment

    now = datetime.now(UTC)
    batch = []
    for i in range(SYNTHETIC_ROWS):
        batch.append(
            Payment(
                status="confirmed", x402_version=2, network="eip155:8453", asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
                payer="0x" + secrets.token_hex(20), pay_to=chain.pay_to, amount=10_000 + i % 7,
                nonce="0x" + secrets.token_hex(32), valid_after=0, valid_before=2**40, signature="0x00", payload={},
                requirement={}, resource="http://shots/", request_fingerprint="x",
                settle_tx_hash="0x" + secrets.token_hex(32), block_number=1, confirmations=5, settled_at=now,
                confirmed_at=now, gas_cost_wei=41_632 * 10**7, created_at=now,
            )
        )
        if len(batch) == 20_000:
            Payment.objects.bulk_create(batch, batch_size=5000)
            batch = []
    Payment.objects.bulk_create(batch, batch_size=5000)


if __name__ == "__main__":
    raise SystemExit(main())
