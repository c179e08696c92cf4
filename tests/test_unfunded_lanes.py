"""Issue 25, defect 7: a relayer lane that cannot pay for gas, on anvil, through a real Celery
worker and its beat (the reconciler every second, X402_STUCK_AFTER_SECONDS=0: every pass finds
the transaction stuck), for an option settled in batches and for one settled one payment per
transaction.

The lane is an account of the test's own (drained with ``anvil_setBalance``, nothing shared
is touched): its first settlement is refused ("insufficient funds"), the lane is flagged and
reported (metric, ``/readyz``, admin), its fees never climb however many passes resend it, it
takes no new transaction; refilled, the flag clears on the balance check and both payments
confirm with the fees of their signing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from django.test import Client, override_settings
from eth_account import Account

from payments.chain import devchain
from payments.chain.relayer import PRIORITY_FEE
from payments.models import Payment, RelayerNonce, SettlementTx
from predictions.models import Prediction
from tests.conftest import TEST_QUEUE, fresh_payer, option_settings, rpc, start_worker
from tests.payers import v2_header_for

pytestmark = [pytest.mark.chain, pytest.mark.django_db(transaction=True)]
URL = "/v1/models/demo/echo-text/predictions"
#: Reconciler passes the worker's beat runs while the lane cannot pay (one a second).
PASSES = 8
#: What the batcher logs when no lane can pay.
NO_BATCH = "no batch formed on eip155:31337: no relayer lane can pay for gas"


def pay(key: str, text: str) -> dict[str, Any]:
    body = {"input": {"text": text}}
    challenge = Client().post(URL, data=body, content_type="application/json")
    assert challenge.status_code == 402, challenge.content
    header = v2_header_for(key, challenge["PAYMENT-REQUIRED"])
    paid = Client().post(
        URL, data=body, content_type="application/json", headers={"PAYMENT-SIGNATURE": header}
    )
    assert paid.status_code == 201, paid.content
    return paid.json()


def wait_for(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def unfunded_passes(log: Path) -> int:
    """Reconciler passes the worker finished that sent an unmined transaction again."""
    return len(re.findall(r"payments\.tasks\.reconcile\[.*?succeeded.*'rebroadcast': [1-9]", log.read_text()))


@pytest.mark.parametrize("batched", [True, False], ids=["batches", "one-per-payment"])
def test_a_lane_that_cannot_pay_is_flagged_its_fees_never_climb_and_refilled_it_pays_normal_fees(
    chain, demo_model, staff, live_server, tmp_path, batched
) -> None:
    lane = Account.create()
    key = "0x" + lane.key.hex().removeprefix("0x")
    rpc(chain.rpc_url, "anvil_setBalance", [lane.address, "0x0"])  # our own lane, drained
    log = tmp_path / "worker.log"
    mine = {**option_settings(chain), "X402_RELAYER_KEYS": [key], "X402_RELAYER_KEY": key}
    env = {
        "X402_RELAYER_KEYS": key,
        "X402_STUCK_AFTER_SECONDS": "0",
        "X402_PUBLIC_URL": live_server.url,
        "X402_BATCH_SETTLEMENT": str(batched).lower(),
    }
    with override_settings(
        **mine, X402_STUCK_AFTER_SECONDS=0, X402_PUBLIC_URL=live_server.url, X402_BATCH_SETTLEMENT=batched
    ):
        worker = start_worker(chain, log, TEST_QUEUE, beat=True, env=env)
        try:
            first = pay(fresh_payer(chain)["private_key"], "first")
            wait_for(lambda: SettlementTx.objects.exists(), 30, "the settlement to be signed")
            tx = SettlementTx.objects.get()
            signed_fee, signed_hash = tx.max_fee_per_gas, tx.tx_hash
            wait_for(lambda: unfunded_passes(log) >= PASSES, 60, f"{PASSES} reconciler passes")

            # Resent as it was on every pass: same hash, same fees, nothing re-signed.
            tx.refresh_from_db()
            assert (tx.tx_hash, tx.max_fee_per_gas, tx.replaced_hashes) == (signed_hash, signed_fee, [])
            assert rpc(chain.rpc_url, "eth_getTransactionReceipt", [signed_hash]) is None

            # Flagged, and it takes no new transaction: the next payment waits, verified.
            row = RelayerNonce.objects.get(address=lane.address)
            assert row.unfunded_since is not None and "insufficient funds" in row.unfunded_reason.lower()
            refusals = log.read_text().count(NO_BATCH)
            second = pay(fresh_payer(chain)["private_key"], "second")
            waiting = Payment.objects.get(prediction__pk=second["id"])
            # Its settlement ran (the batcher, or its own task) and signed nothing.
            if batched:
                wait_for(lambda: log.read_text().count(NO_BATCH) > refusals, 60, "the batcher")
            else:
                wait_for(lambda: f"payment {waiting.pk} not signed" in log.read_text(), 60, "its settle task")
            assert SettlementTx.objects.count() == 1
            waiting.refresh_from_db()
            assert waiting.status == "verified"

            # Reported: /readyz (its only lane cannot pay: not ready, and why), the metric, the admin.
            ready = Client().get("/readyz")
            lanes = ready.json()["checks"]["lanes"]
            assert ready.status_code == 503 and not lanes["ok"]
            assert lane.address in lanes["error"] and "insufficient funds" in lanes["error"].lower()
            metrics = Client().get("/metrics").content.decode()
            assert (
                f'x402_relayer_lane_unfunded{{address="{lane.address}",network="{chain.network}"}} 1.0'
                in metrics
            )
            page = staff["operator"].get("/admin/payments/relayernonce/")
            assert page.status_code == 200 and lane.address.encode() in page.content
            assert b"nsufficient funds" in page.content

            # Refilled: the balance check clears the flag, the stored transaction pays as
            # signed, and the waiting payment is signed with the fees of its block.
            rpc(chain.rpc_url, "anvil_setBalance", [lane.address, hex(10**18)])
            done = ("succeeded", "failed", "canceled")
            wait_for(
                lambda: all(Prediction.objects.get(pk=p["id"]).status in done for p in (first, second)),
                60,
                "the runs",
            )
        finally:
            devchain.stop(worker)
        row.refresh_from_db()
        assert row.unfunded_since is None and row.unfunded_reason == ""
        assert Client().get("/readyz").json()["checks"]["lanes"] == {"ok": True}
    for p in (first, second):
        assert Prediction.objects.get(pk=p["id"]).status == "succeeded"
        payment = Payment.objects.get(prediction__pk=p["id"])
        assert payment.status == "confirmed" and payment.settlement_tx.replaced_hashes == []
        receipt = rpc(chain.rpc_url, "eth_getTransactionReceipt", [payment.settle_tx_hash])
        block = rpc(chain.rpc_url, "eth_getBlockByNumber", [receipt["blockNumber"], False])
        # Normal fees: the tip is our PRIORITY_FEE, never a bumped one.
        assert int(receipt["effectiveGasPrice"], 16) == int(block["baseFeePerGas"], 16) + PRIORITY_FEE
    assert Payment.objects.get(prediction__pk=first["id"]).settle_tx_hash == signed_hash


def test_readyz_is_degraded_while_another_lane_can_pay_and_the_balance_check_clears_the_flags(chain) -> None:
    """One of two lanes flagged: degraded (200), the public answer naming the check only; both
    flagged: not ready (503). Both hold gas money, so the reconciler's balance check clears them."""
    from django.utils import timezone

    from payments.tasks import reconcile

    keys = [chain.relayer_private_key, chain.spare_keys[1]]  # type: ignore[attr-defined]
    addresses = [Account.from_key(k).address for k in keys]
    with override_settings(**{**option_settings(chain), "X402_RELAYER_KEYS": keys}):
        for address in addresses:
            RelayerNonce.objects.create(network=chain.network, address=address, next_nonce=0)
        refused = "Insufficient funds for gas * price + value"
        RelayerNonce.objects.filter(address=addresses[1]).update(
            unfunded_since=timezone.now(), unfunded_reason=refused
        )
        degraded = Client().get("/readyz")
        assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
        assert addresses[1] in degraded.json()["checks"]["lanes"]["error"]
        public = Client(REMOTE_ADDR="203.0.113.9").get("/readyz").json()
        assert public["status"] == "degraded" and public["checks"]["lanes"] == {"ok": False}

        RelayerNonce.objects.update(unfunded_since=timezone.now(), unfunded_reason=refused)
        down = Client().get("/readyz")
        assert (
            down.status_code == 503 and "no relayer lane can pay" in down.json()["checks"]["lanes"]["error"]
        )

        reconcile()  # the beat's pass, its balance check: both hold gas money
        assert not RelayerNonce.objects.filter(unfunded_since__isnull=False).exists()
        assert Client().get("/readyz").json()["status"] == "ready"
