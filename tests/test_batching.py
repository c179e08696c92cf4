"""Batched settlement on anvil (issue 17): one transaction for many payments, each payment still
judged by its own logs; failures isolated and classified by the chain (issue 13's rules); lanes;
crash safety; backpressure.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from eth_account import Account

from payments import backpressure
from payments.chain import batching, lapsing, tracking
from payments.chain import relayer as relayers
from payments.models import Payment, SettlementTx
from payments.options import configured
from payments.schemes.exact import calldata as exact_calldata
from payments.tasks import reconcile
from tests.conftest import fresh_payer, rpc, token_balance
from tests.test_settlement import PRICE, after_lapse, chain_nonce, record_payment, send_as, transfers_of

pytestmark = [pytest.mark.django_db(transaction=True)]
#: Ahead of our batch in the same block.
HIGH_TIP = {"maxPriorityFeePerGas": hex(10**10), "maxFeePerGas": hex(10**11)}


def drain(chain, payer: str, amount: int) -> str:
    """The payer moves ``amount`` of its tokens elsewhere."""
    elsewhere = Account.create().address
    data = "0xa9059cbb" + elsewhere[2:].lower().rjust(64, "0") + hex(amount)[2:].rjust(64, "0")
    return send_as(chain, payer, chain.asset, data, **HIGH_TIP)


def in_one_block(chain, *steps) -> None:
    """Run the steps (sends) with automine off, then mine them in one block."""
    rpc(chain.rpc_url, "anvil_setAutomine", [False])
    try:
        for step in steps:
            step()
        rpc(chain.rpc_url, "evm_mine", [])
    finally:
        rpc(chain.rpc_url, "anvil_setAutomine", [True])


def refreshed(payments: list[Payment]) -> list[Payment]:
    return [Payment.objects.select_related("settlement_tx").get(pk=p.pk) for p in payments]


def test_a_batch_with_a_front_run_an_expired_and_an_unfunded_item_settles_the_rest(
    chain_settings, monkeypatch
) -> None:
    """All seven items pass simulation; then, in the block that mines the batch, a third party
    submits one authorization first, a payer moves its funds away, and the block is stamped past a
    third one's validBefore. The four others are paid by the batch; the three are classified
    through LAPSING and the chain: paid (by the third party), failed, expired."""
    chain = chain_settings
    conf = configured()[0]
    good = [record_payment(fresh_payer(chain)["private_key"]) for _ in range(4)]
    front = record_payment(fresh_payer(chain)["private_key"])
    poor = fresh_payer(chain)
    unfunded = record_payment(poor["private_key"])
    expiring = record_payment(fresh_payer(chain)["private_key"], valid_before=int(time.time()) + 9)
    before = token_balance(chain, chain.pay_to)
    relayer_nonce = chain_nonce(chain, chain.relayer_address)
    runner = Account.from_key(chain.spare_keys[1]).address
    theirs: list[str] = []
    formed: list[batching.Formed] = []

    def sign_and_send() -> None:
        formed.append(batching.form(conf, force=True))
        relayers.broadcast(chain.rpc_url, formed[0].tx)

    in_one_block(
        chain,
        sign_and_send,
        lambda: theirs.append(send_as(chain, runner, chain.asset, exact_calldata(front), **HIGH_TIP)),
        lambda: drain(chain, poor["address"], token_balance(chain, poor["address"])),
        lambda: rpc(chain.rpc_url, "evm_setNextBlockTimestamp", [expiring.valid_before + 1]),
    )
    tx = formed[0].tx
    assert tx.items == 7 and not formed[0].dropped
    assert batching.follow([tx.pk], wait_seconds=5) == []
    assert int(rpc(chain.rpc_url, "eth_getTransactionReceipt", [tx.tx_hash])["status"], 16) == 1

    for p in refreshed(good):
        assert p.status == "confirmed" and p.settle_tx_hash == tx.tx_hash and p.settlement_tx_id == tx.pk
    front, unfunded, expiring = refreshed([front, unfunded, expiring])
    assert front.status == unfunded.status == expiring.status == "lapsing"
    assert unfunded.unpaid_reason == "settlement_reverted" and expiring.unpaid_reason == "not_settled_in_time"

    # The chain's word: the front-run one was paid, by the third party's transaction.
    front = lapsing.resolve_lapsing(front.pk)
    assert front.status == "confirmed" and front.settle_tx_hash == theirs[0] and front.settlement_tx is None
    after_lapse(monkeypatch, unfunded)
    reconcile()
    unfunded, expiring = refreshed([unfunded, expiring])
    assert unfunded.status == "failed" and expiring.status == "expired"

    assert token_balance(chain, chain.pay_to) == before + 5 * PRICE
    assert chain_nonce(chain, chain.relayer_address) == relayer_nonce + 1  # one transaction for seven
    tx.refresh_from_db()
    everyone = refreshed([*good, front, unfunded, expiring])
    assert sum(int(p.gas_cost_wei) for p in everyone) == int(tx.gas_cost_wei)  # shares add up exactly
    assert {p.gas_used for p in everyone} == {tx.gas_used // 7}


def test_items_that_would_fail_are_dropped_before_signing(chain_settings, monkeypatch) -> None:
    """Already used (front-run), too little balance, about to lapse: not put in the batch; each
    goes LAPSING, and the chain says what it became."""
    chain = chain_settings
    conf = configured()[0]
    good = [record_payment(fresh_payer(chain)["private_key"]) for _ in range(3)]
    front = record_payment(fresh_payer(chain)["private_key"])
    poor = fresh_payer(chain)
    unfunded = record_payment(poor["private_key"])
    late = record_payment(fresh_payer(chain)["private_key"], valid_before=int(time.time()) + 25)
    theirs = send_as(chain, Account.from_key(chain.spare_keys[1]).address, chain.asset, exact_calldata(front))
    drain(chain, poor["address"], token_balance(chain, poor["address"]))
    relayer_nonce = chain_nonce(chain, chain.relayer_address)

    monkeypatch.setattr(time, "time", lambda: late.valid_before - 1.0)  # too late to sign it
    sent = batching.run(conf, force=True)
    monkeypatch.undo()
    assert [tx.items for tx in sent] == [3]
    assert batching.follow([sent[0].pk], wait_seconds=5) == []
    assert chain_nonce(chain, chain.relayer_address) == relayer_nonce + 1
    assert {p.status for p in refreshed(good)} == {"confirmed"}
    front, unfunded, late = refreshed([front, unfunded, late])
    assert front.status == "confirmed" and front.settle_tx_hash == theirs and front.gas_used is None
    assert unfunded.status == "lapsing" and unfunded.failure_reason.startswith("simulation reverted")
    assert "balance" in unfunded.failure_reason  # the token's own reason, asked for that item alone
    assert late.status == "lapsing" and late.unpaid_reason == "not_settled_in_time"
    after_lapse(monkeypatch, unfunded)
    reconcile()
    unfunded, late = refreshed([unfunded, late])
    assert (unfunded.status, late.status) == ("failed", "expired")


def test_two_payments_of_one_payer_only_the_one_whose_authorization_was_used_is_paid(chain_settings) -> None:
    """Same payer, same price, one batch; the payer can cover only one when it is mined. A
    Transfer of the right amount is in the receipt, but only one authorization was used: the
    other payment must not be booked as paid."""
    chain = chain_settings
    conf = configured()[0]
    payer = fresh_payer(chain, amount=2 * PRICE)
    first, second = record_payment(payer["private_key"]), record_payment(payer["private_key"])
    formed: list[batching.Formed] = []

    def sign_and_send() -> None:
        formed.append(batching.form(conf, force=True))
        relayers.broadcast(chain.rpc_url, formed[0].tx)

    in_one_block(chain, sign_and_send, lambda: drain(chain, payer["address"], PRICE))
    assert formed[0].tx.items == 2
    batching.follow([formed[0].tx.pk], wait_seconds=5)
    first, second = refreshed([first, second])
    assert first.status == "confirmed"
    assert second.status == "lapsing" and second.unpaid_reason == "settlement_reverted"
    paid = [t for t in transfers_of(chain, payer["address"]) if t["transactionHash"] == formed[0].tx.tx_hash]
    assert len(paid) == 1


def test_two_lanes_one_stuck_transaction_the_other_keeps_settling(chain_settings, settings) -> None:
    """A batch whose transaction never reaches a block holds its lane's nonce; later batches go
    to the other lane (chosen by load) and confirm. The stuck one is rebroadcast later, as
    stored: everything is paid once."""
    chain = chain_settings
    conf = configured()[0]
    # Two lanes of their own: the dev chain's first account also mints the test payers' tokens,
    # and a mint would take the stuck transaction's nonce.
    lanes = [Account.create() for _ in range(2)]
    for lane in lanes:
        rpc(chain.rpc_url, "anvil_setBalance", [lane.address, hex(10**20)])
    settings.X402_RELAYER_KEYS = ["0x" + lane.key.hex().removeprefix("0x") for lane in lanes]
    settings.X402_RELAYER_KEY = settings.X402_RELAYER_KEYS[0]
    stuck_payments = [record_payment(fresh_payer(chain)["private_key"]) for _ in range(2)]
    rpc(chain.rpc_url, "anvil_setAutomine", [False])
    try:
        stuck = batching.form(conf, force=True).tx
        relayers.broadcast(chain.rpc_url, stuck)
        rpc(chain.rpc_url, "anvil_dropTransaction", [stuck.tx_hash])  # it never gets mined
    finally:
        rpc(chain.rpc_url, "anvil_setAutomine", [True])
    later = []
    for _ in range(3):
        batch = [record_payment(fresh_payer(chain)["private_key"]) for _ in range(2)]
        [tx] = batching.run(conf, force=True)
        assert tx.relayer != stuck.relayer
        assert batching.follow([tx.pk], wait_seconds=5) == []
        later += batch
    assert {p.status for p in refreshed(later)} == {"confirmed"}
    assert {p.status for p in refreshed(stuck_payments)} == {"settling"}
    assert relayers.loads(chain.network) == {stuck.relayer: 1}

    reconcile()  # rebroadcasts the stored transaction
    tracking.track_tx(stuck.pk)
    assert {p.status for p in refreshed(stuck_payments)} == {"confirmed"}
    for p in refreshed([*stuck_payments, *later]):
        assert len([t for t in transfers_of(chain, p.payer) if t["topics"][2].endswith(chain.pay_to[2:].lower())]) == 1


def test_parallel_batchers_form_disjoint_batches(chain_settings, settings, monkeypatch) -> None:
    """Four workers, two lanes, batches of ten: every payment in exactly one transaction, all
    confirmed, each lane's nonces contiguous."""
    chain = chain_settings
    conf = configured()[0]
    other = Account.create()
    rpc(chain.rpc_url, "anvil_setBalance", [other.address, hex(10**20)])
    settings.X402_RELAYER_KEYS = [chain.relayer_private_key, "0x" + other.key.hex().removeprefix("0x")]
    settings.X402_BATCH_MAX = 10
    monkeypatch.setattr(batching, "kick", lambda *a, **k: None)  # the workers here are threads
    payments = [record_payment(fresh_payer(chain)["private_key"]) for _ in range(40)]
    starts = {a.address: chain_nonce(chain, a.address) for a in relayers.lanes()}
    barrier = threading.Barrier(4)
    sent: list[SettlementTx] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            while Payment.objects.filter(status="verified").exists():
                sent.extend(batching.run(conf, force=True))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert batching.follow([tx.pk for tx in sent], wait_seconds=10) == []
    done = refreshed(payments)
    assert {p.status for p in done} == {"confirmed"}
    assert sum(tx.items for tx in sent) == 40 and len({p.settlement_tx_id for p in done}) == len(sent)
    for address, start in starts.items():
        nonces = sorted(tx.nonce for tx in sent if tx.relayer == address)
        assert nonces == list(range(start, start + len(nonces)))


def test_gas_per_payment_in_a_batch_of_fifty(chain_settings) -> None:
    conf = configured()[0]
    for _ in range(50):
        record_payment(fresh_payer(chain_settings)["private_key"])
    [tx] = batching.run(conf, force=True)
    assert batching.follow([tx.pk], wait_seconds=10) == []
    tx.refresh_from_db()
    assert tx.items == 50 and tx.gas_used / 50 < 45_000, tx.gas_used / 50


def test_a_contract_wallet_signature_is_settled_alone(chain_settings) -> None:
    """A signature that is not 65 bytes (EIP-1271 bytes) cannot ride in a batch: it goes through
    the single path, next to the batch."""
    conf = configured()[0]
    plain = record_payment(fresh_payer(chain_settings)["private_key"])
    odd = Payment.objects.get(pk=record_payment(fresh_payer(chain_settings)["private_key"]).pk)
    assert batching.batchable(plain, conf) and batching.batchable(odd, conf)
    odd.signature += "00"
    assert not batching.batchable(odd, conf)


def test_backpressure_answers_503_while_the_backlog_is_too_old(chain_settings, demo_model, settings) -> None:
    from tests.payers import v2_header
    from tests.test_api import URL, requirement

    waiting = record_payment(fresh_payer(chain_settings)["private_key"])
    Payment.objects.filter(pk=waiting.pk).update(settle_requested_at=timezone.now() - timedelta(seconds=200))
    backpressure.oldest_ready.forget()
    header = v2_header(fresh_payer(chain_settings)["private_key"], requirement())
    body = {"input": {"text": "later"}}
    refused = Client().post(URL, body, content_type="application/json", headers={"PAYMENT-SIGNATURE": header})
    assert refused.status_code == 503 and refused["Retry-After"] == str(settings.X402_BACKPRESSURE_RETRY_AFTER)
    assert refused["Content-Type"] == "application/problem+json" and "Settlement is behind" in refused.json()["detail"]
    assert Payment.objects.count() == 1  # nothing recorded: the authorization stays unused
    metrics = Client().get("/metrics").content.decode()
    assert "x402_backpressure_rejections_total 1.0" in metrics and "x402_settlement_backlog 1.0" in metrics

    Payment.objects.filter(pk=waiting.pk).update(settle_requested_at=timezone.now())  # caught up
    backpressure.oldest_ready.forget()
    accepted = Client().post(URL, body, content_type="application/json", headers={"PAYMENT-SIGNATURE": header})
    assert accepted.status_code == 201  # the same header, resent after Retry-After


def test_settlement_tasks_have_their_own_queue(settings) -> None:
    from x402site.celery import app, route_task

    assert route_task("payments.tasks.settle_batches", (), {}, {}) == {"queue": f"{app.conf.task_default_queue}-settlement"}
    assert route_task("predictions.tasks.run_prediction", (), {}, {}) is None
    assert route_task("payments.tasks.run_export", (), {}, {}) is None  # a long export holds no settlement slot
    settings.X402_SETTLEMENT_QUEUE = "money"
    assert route_task("payments.tasks.reconcile", (), {}, {}) == {"queue": "money"}
    assert route_task("payments.tasks.send_refund", (), {}, {}) == {"queue": "money"}


@pytest.mark.e2e
def test_worker_killed_between_signing_and_broadcasting_a_batch(
    chain_settings, demo_model, celery_worker_process, tmp_path
) -> None:
    """SIGKILL a worker after it stored a signed batch and before it broadcast it: the
    reconciler (the module worker's beat) broadcasts that same transaction; every payment is paid
    once, every prediction runs once, the relayer sent one transaction."""
    import os
    import signal

    from django.db import transaction

    from payments.tasks import settle_batches
    from predictions.models import Prediction
    from tests.conftest import start_worker
    from tests.test_e2e import wait_for_prediction

    chain = chain_settings
    payers = [fresh_payer(chain) for _ in range(5)]
    payments = [record_payment(p["private_key"]) for p in payers]
    Payment.objects.update(settle_requested_at=None)  # not ready until the doomed worker is up
    with transaction.atomic():
        predictions = [
            Prediction.objects.create(
                model=demo_model, version=demo_model.latest_version, input={"text": f"survives {i}"}, payment=p
            )
            for i, p in enumerate(payments)
        ]
    balances = [token_balance(chain, p["address"]) for p in payers]
    relayer_nonce = chain_nonce(chain, chain.relayer_address)
    doomed_queue = f"{celery_worker_process['queue']}-doomed"
    doomed = start_worker(
        chain,
        tmp_path / "doomed.log",
        doomed_queue,
        beat=False,
        env={"X402_FAULT_PAUSE_AFTER_SIGN": "60"},
        settlement=False,
    )
    try:
        # Ready an hour from now: the module worker's reconciler (every second) sweeps payments
        # ready for 2 s into a batcher of its own, and a loaded machine can take that long to
        # hand the doomed worker its task; the forced run below takes them whatever their age.
        Payment.objects.update(settle_requested_at=timezone.now() + timedelta(hours=1))
        settle_batches.apply_async(args=[chain.network, chain.asset], kwargs={"force": True}, queue=doomed_queue)
        deadline = time.monotonic() + 20
        while Payment.objects.filter(status="verified").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(doomed.pid, signal.SIGKILL)
    finally:
        doomed.wait(10)
    [tx] = SettlementTx.objects.all()
    assert tx.items == 5 and tx.raw_tx  # signed and stored before the kill (the reconciler sends it)

    finished = [wait_for_prediction(p.pk, timeout=30) for p in predictions]
    assert [f.status for f in finished] == ["succeeded"] * 5
    assert {p.status for p in refreshed(payments)} == {"confirmed"}
    assert [token_balance(chain, p["address"]) for p in payers] == [b - PRICE for b in balances]
    assert chain_nonce(chain, chain.relayer_address) == relayer_nonce + 1


def test_a_process_kicks_the_batcher_once_per_window(offline_options, monkeypatch, settings) -> None:
    """On the hot path a process that scheduled the batcher sends nothing more (not even a cache
    write) until that batcher runs; once it has started, the next payment kicks again."""
    from django.core.cache import cache

    from x402site import dispatch

    settings.X402_BATCH_MAX_AGE = 5.0
    sent, adds = [], []
    real_add = cache.add
    monkeypatch.setattr(dispatch, "send", lambda name, *args, **options: sent.append((name, args, options)))
    monkeypatch.setattr(cache, "add", lambda *a, **k: adds.append(a) or real_add(*a, **k))
    conf = configured()[0]
    for _ in range(5):
        batching.kick(conf)
    assert len(sent) == 1 and sent[0][2]["countdown"] == 5.0
    assert len(adds) == 1
    batching.started(conf)
    batching.kick(conf)
    assert len(sent) == 2 and len(adds) == 2
    # Another process's kick (the key is there, this process did not write it): trusted briefly.
    batching._scheduled_until.clear()
    batching.kick(conf)
    assert len(sent) == 2 and len(adds) == 3
    batching.kick(conf)
    assert len(adds) == 3
