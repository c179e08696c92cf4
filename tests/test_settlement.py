"""Settlement and reconciliation on anvil under the faults a chain produces.

Each test records a payment through the ledger's one write path, then drives settlement
directly (tasks are thin wrappers around these functions) while the chain misbehaves.
"""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction
from django.test import override_settings
from eth_account import Account

from payments import ledger
from payments.chain import evidence, lapsing, settlement, tracking
from payments.chain.abi import TRANSFER_TOPIC
from payments.chain.node import ChainUnavailable
from payments.models import Payment, PaymentEvent
from payments.options import payment_options
from payments.schemes.exact import calldata as exact_calldata
from payments.tasks import reconcile
from payments.x402.types import Requirement
from tests.conftest import fresh_payer, option_settings, rpc, token_balance, wait_mined
from tests.payers import record
from tests.rpc_proxy import rpc_proxy

pytestmark = [pytest.mark.django_db(transaction=True)]
PRICE = 10_000


def record_payment(key: str, price: int = PRICE, **sign) -> Payment:
    return record(key, Requirement(payment_options()[0], price), **sign)


def chain_nonce(chain, address: str) -> int:
    return int(rpc(chain.rpc_url, "eth_getTransactionCount", [address, "latest"]), 16)


def send_as(chain, sender: str, to: str, data: str, **extra) -> str:
    """Send a transaction from an unlocked account; with automine on, wait until it is mined
    (anvil answers before the receipt exists)."""
    tx = rpc(chain.rpc_url, "eth_sendTransaction", [{"from": sender, "to": to, "data": data, **extra}])
    automine = rpc(chain.rpc_url, "anvil_getAutomine", [])
    deadline = time.monotonic() + 10
    while automine and rpc(chain.rpc_url, "eth_getTransactionReceipt", [tx]) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return tx


def transfers_of(chain, payer: str) -> list[dict]:
    word = "0x" + payer[2:].lower().rjust(64, "0")
    return rpc(
        chain.rpc_url,
        "eth_getLogs",
        [{"address": chain.asset, "fromBlock": "0x0", "toBlock": "latest", "topics": [TRANSFER_TOPIC, word]}],
    )


def statuses(p: Payment) -> list[str]:
    return list(PaymentEvent.objects.filter(payment=p).values_list("to_status", flat=True))


def test_normal_settlement_and_confirmation(chain_settings) -> None:
    payer = chain_settings.payers[0]
    p = record_payment(payer["private_key"])
    p = settlement.settle(p.pk)
    assert p.status == "confirmed" and p.gas_used > 50_000 and p.gas_cost_wei > 0
    assert statuses(p) == ["verified", "settling", "confirmed"]
    assert settlement.settle(p.pk).status == "confirmed"  # idempotent: nothing more happens


def test_front_run_settlement_is_paid_once(chain_settings) -> None:
    chain = chain_settings
    payer = chain.payers[1]
    p = record_payment(payer["private_key"])
    runner = Account.from_key(chain.spare_keys[1]).address
    relayer_nonce = chain_nonce(chain, chain.relayer_address)
    before = token_balance(chain, chain.pay_to)
    theirs = send_as(chain, runner, chain.asset, exact_calldata(p))  # someone else settles first
    p = settlement.settle(p.pk)
    assert p.status == "confirmed" and p.settle_tx_hash == theirs
    assert p.gas_used is None  # we paid no gas
    assert chain_nonce(chain, chain.relayer_address) == relayer_nonce  # and sent nothing
    assert token_balance(chain, chain.pay_to) == before + PRICE


def after_lapse(monkeypatch, p: Payment) -> None:
    """Move our clock past the point where no block can use ``p``'s authorization any more."""
    monkeypatch.setattr(time, "time", lambda: p.valid_before + evidence.LAPSE_MARGIN_SECONDS + 1)


def test_payer_drains_funds_before_settlement(chain_settings, monkeypatch) -> None:
    chain = chain_settings
    payer = fresh_payer(chain)
    p = record_payment(payer["private_key"])
    balance = token_balance(chain, payer["address"])
    elsewhere = Account.create().address
    send_as(
        chain,
        payer["address"],
        chain.asset,
        "0xa9059cbb" + elsewhere[2:].lower().rjust(64, "0") + hex(balance)[2:].rjust(64, "0"),
    )
    relayer_nonce = chain_nonce(chain, chain.relayer_address)
    p = settlement.settle(p.pk)
    # Not settled, but the authorization could still be used until it lapses: not final yet.
    assert p.status == "lapsing" and "simulation reverted" in p.failure_reason
    assert chain_nonce(chain, chain.relayer_address) == relayer_nonce  # simulated, never sent
    after_lapse(monkeypatch, p)
    reconcile()
    p.refresh_from_db()
    assert p.status == "failed" and p.unpaid_reason == "simulation_reverted"
    assert PaymentEvent.objects.filter(payment=p, to_status="failed").get().detail["chain"]["authorization_used"] is False


def test_settlement_reverts_when_the_payer_moves_funds_in_the_same_block(chain_settings, monkeypatch) -> None:
    chain = chain_settings
    payer = fresh_payer(chain)
    p = record_payment(payer["private_key"])
    rpc(chain.rpc_url, "anvil_setAutomine", [False])
    try:
        p = settlement.prepare(p.pk)
        settlement.broadcast(p)
        balance = token_balance(chain, payer["address"])
        drain = (
            "0xa9059cbb"
            + Account.create().address[2:].lower().rjust(64, "0")
            + hex(balance)[2:].rjust(64, "0")
        )
        send_as(
            chain,
            payer["address"],
            chain.asset,
            drain,
            maxPriorityFeePerGas=hex(10**10),
            maxFeePerGas=hex(10**11),
        )
        rpc(chain.rpc_url, "evm_mine", [])
    finally:
        rpc(chain.rpc_url, "anvil_setAutomine", [True])
    p = tracking.track(p.pk)
    assert p.status == "lapsing" and p.failure_reason == "settlement transaction reverted"
    assert p.gas_used and p.gas_cost_wei  # the gas we lost is on the books
    after_lapse(monkeypatch, p)
    assert lapsing.resolve_lapsing(p.pk).status == "failed"
    assert transfers_of(chain, payer["address"])[-1]["topics"][2] != "0x" + chain.pay_to[2:].lower().rjust(
        64, "0"
    )


def test_expired_authorization_is_marked_expired(chain_settings, monkeypatch) -> None:
    p = record_payment(chain_settings.payers[4]["private_key"], valid_before=int(time.time()) + 10)
    after_lapse(monkeypatch, p)
    assert settlement.settle(p.pk).status == "expired"
    p.refresh_from_db()
    assert p.failure_reason.startswith("authorization expired") and p.unpaid_reason == "not_settled_in_time"
    assert statuses(p) == ["verified", "lapsing", "expired"]


def test_rpc_outage_loses_nothing(chain) -> None:
    with rpc_proxy(chain.rpc_url) as proxy, override_settings(**option_settings(chain, rpc_url=proxy.url)):
        p = record_payment(chain.payers[5]["private_key"])
        proxy.mode = "down"
        with pytest.raises(ChainUnavailable):
            settlement.settle(p.pk)
        assert Payment.objects.get(pk=p.pk).status == "verified"
        # The node takes the transaction but the answer is lost: unknown, not failed, not resent.
        proxy.mode = "drop_send"
        p = settlement.prepare(p.pk)
        with pytest.raises(ChainUnavailable):
            settlement.broadcast(p)
        assert Payment.objects.get(pk=p.pk).status == "settling"
        proxy.mode = "down"
        stats = reconcile()
        assert stats["errors"] == 1 and Payment.objects.get(pk=p.pk).status == "settling"
        proxy.mode = "up"
        reconcile()
        p.refresh_from_db()
    assert p.status == "confirmed"
    assert (
        len(
            [
                t
                for t in transfers_of(chain, chain.payers[5]["address"])
                if t["transactionHash"] == p.settle_tx_hash
            ]
        )
        == 1
    )


def test_reorg_is_undone_and_recovered(chain) -> None:
    with override_settings(**option_settings(chain, confirmations=3)):
        p = record_payment(chain.payers[6]["private_key"])
        snapshot = rpc(chain.rpc_url, "evm_snapshot", [])
        p = settlement.settle(p.pk, wait_seconds=0.5)
        assert p.status == "settled" and p.confirmations == 1
        mined_in = p.block_hash
        lost_at = int(rpc(chain.rpc_url, "eth_getBlockByHash", [mined_in, False])["timestamp"], 16)
        rpc(chain.rpc_url, "evm_revert", [snapshot])  # the block holding it is gone
        # The block that mines it again gets a later timestamp: with the same parent, number,
        # timestamp and transaction it would be byte-identical to the lost one (the same hash),
        # which happens when blocks come faster than one a second (anvil then counts +1 s each).
        rpc(chain.rpc_url, "evm_setNextBlockTimestamp", [lost_at + 1])
        assert rpc(chain.rpc_url, "eth_getTransactionReceipt", [p.settle_tx_hash]) is None
        reconcile()
        p.refresh_from_db()
        assert p.status in ("settling", "settled")
        assert "settling" in statuses(p)[2:]  # went back to settle after the reorg
        rpc(chain.rpc_url, "anvil_mine", [3])
        reconcile()
        p.refresh_from_db()
    assert p.status == "confirmed" and p.block_hash != mined_in
    mine = [
        t for t in transfers_of(chain, chain.payers[6]["address"]) if t["transactionHash"] == p.settle_tx_hash
    ]
    assert len(mine) == 1  # the same stored transaction, mined once on the new chain


def test_stuck_transaction_is_replaced(chain) -> None:
    with override_settings(**option_settings(chain), X402_STUCK_AFTER_SECONDS=0):
        p = record_payment(chain.payers[7]["private_key"])
        rpc(chain.rpc_url, "anvil_setAutomine", [False])
        try:
            p = settlement.prepare(p.pk)
            settlement.broadcast(p)
            stuck = p.settle_tx_hash
            # Dropped by the node: not re-signed (a higher fee cannot help what the node does
            # not hold), the same bytes are sent again (issue 25: one rule for every transaction).
            rpc(chain.rpc_url, "anvil_dropTransaction", [stuck])
            tracking.reconcile_batch([p.pk])
            p.refresh_from_db()
            assert p.settle_tx_hash == stuck and rpc(chain.rpc_url, "eth_getTransactionByHash", [stuck])
            tracking.reconcile_batch([p.pk])  # in the pool and not mined: its fee is too low
            p.refresh_from_db()
            assert p.settle_tx_hash != stuck and p.settlement_tx.replaced_hashes == [stuck]
            rpc(chain.rpc_url, "evm_mine", [])
        finally:
            rpc(chain.rpc_url, "anvil_setAutomine", [True])
        p = tracking.track(p.pk)
    assert p.status == "confirmed" and p.settle_tx_hash != stuck


def test_a_stuck_transaction_at_the_fee_cap_is_rebroadcast_not_replaced(chain) -> None:
    """X402_MAX_FEE_PER_GAS: a stuck settlement already offering the most we pay is only sent
    again (same hash), however many passes find it stuck."""
    with override_settings(**option_settings(chain), X402_STUCK_AFTER_SECONDS=0):
        p = record_payment(fresh_payer(chain)["private_key"])
        rpc(chain.rpc_url, "anvil_setAutomine", [False])
        try:
            p = settlement.prepare(p.pk)
            settlement.broadcast(p)
            stuck = p.settle_tx_hash
            with override_settings(X402_MAX_FEE_PER_GAS=p.settlement_tx.max_fee_per_gas):
                for _ in range(3):
                    tracking.reconcile_batch([p.pk])
            p.refresh_from_db()
            assert p.settle_tx_hash == stuck and p.settlement_tx.replaced_hashes == []
            rpc(chain.rpc_url, "evm_mine", [])
        finally:
            rpc(chain.rpc_url, "anvil_setAutomine", [True])
        p = tracking.track(p.pk)
    assert p.status == "confirmed" and p.settle_tx_hash == stuck


def test_many_payments_settled_concurrently_without_nonce_collisions(chain_settings, settings) -> None:
    """One transaction per payment (batching off): six threads, contiguous nonces."""
    chain = chain_settings
    settings.X402_BATCH_SETTLEMENT = False
    keys = [Account.create() for _ in range(24)]
    for acct in keys:  # fund fresh payers
        send_as(
            chain,
            chain.relayer_address,
            chain.asset,
            "0x40c10f19" + acct.address[2:].lower().rjust(64, "0") + hex(PRICE)[2:].rjust(64, "0"),
        )
    payments = [record_payment(acct.key.hex()) for acct in keys]
    start = chain_nonce(chain, chain.relayer_address)
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def worker(chunk: list[Payment]) -> None:
        try:
            barrier.wait()
            for p in chunk:
                settlement.settle(p.pk)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(payments[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    settled = Payment.objects.filter(pk__in=[p.pk for p in payments])
    assert set(settled.values_list("status", flat=True)) == {"confirmed"}
    nonces = sorted(settled.values_list("settlement_tx__nonce", flat=True))
    assert nonces == list(range(start, start + len(payments)))  # contiguous, no collision, no gap
    assert chain_nonce(chain, chain.relayer_address) == start + len(payments)


# --- A terminal state is written only when the chain agrees (issue 13, defect 2) ------------------


def test_front_run_in_the_same_block_is_paid_once(chain_settings) -> None:
    """A third party mines the same authorization in the block that holds ours, ahead of it:
    ours reverts, and the ledger must not say FAILED while the money moved."""
    chain = chain_settings
    payer = fresh_payer(chain)
    p = record_payment(payer["private_key"])
    before = token_balance(chain, chain.pay_to)
    runner = Account.from_key(chain.spare_keys[1]).address
    rpc(chain.rpc_url, "anvil_setAutomine", [False])
    try:
        p = settlement.prepare(p.pk)
        settlement.broadcast(p)
        ours = p.settle_tx_hash
        theirs = send_as(
            chain, runner, chain.asset, exact_calldata(p), maxPriorityFeePerGas=hex(10**10), maxFeePerGas=hex(10**11)
        )
        rpc(chain.rpc_url, "evm_mine", [])
    finally:
        rpc(chain.rpc_url, "anvil_setAutomine", [True])
    assert int(rpc(chain.rpc_url, "eth_getTransactionReceipt", [ours])["status"], 16) == 0  # ours reverted
    p = tracking.track(p.pk)
    assert p.status == "lapsing"
    p = lapsing.resolve_lapsing(p.pk)
    assert p.status == "confirmed" and p.settle_tx_hash == theirs
    assert p.gas_used and p.gas_cost_wei  # our reverted attempt's gas stays on the books
    assert token_balance(chain, chain.pay_to) == before + PRICE


def test_a_released_authorization_the_payer_then_submits_is_paid(chain_settings) -> None:
    """Released (its prediction canceled before settlement), the authorization is still valid:
    the payer (or anyone holding it) may submit it. The ledger must follow the chain."""
    chain = chain_settings
    payer = fresh_payer(chain)
    p = record_payment(payer["private_key"])
    with transaction.atomic():
        ledger.release(p, "the prediction was canceled")
    p.refresh_from_db()
    assert p.status == "lapsing" and p.unpaid_reason == "released"
    theirs = send_as(chain, payer["address"], chain.asset, exact_calldata(p))
    reconcile()
    p.refresh_from_db()
    assert p.status == "confirmed" and p.settle_tx_hash == theirs


def test_a_lapsed_payment_someone_else_settled_is_paid_and_its_prediction_runs(
    chain_settings, demo_model, eager_celery, monkeypatch
) -> None:
    """VERIFIED, never settled by us (say the broker lost the task), but a third party submitted
    it before it lapsed: once lapsed, the reconciler must book it as paid, and run what it bought."""
    from predictions.models import Prediction

    chain = chain_settings
    p = record_payment(fresh_payer(chain)["private_key"], valid_before=int(time.time()) + 30)
    prediction = Prediction.objects.create(
        model=demo_model, version=demo_model.latest_version, input={"text": "paid by a stranger"}, payment=p
    )
    send_as(chain, Account.from_key(chain.spare_keys[1]).address, chain.asset, exact_calldata(p))
    after_lapse(monkeypatch, p)
    reconcile()
    p.refresh_from_db()
    prediction.refresh_from_db()
    assert p.status == "confirmed"
    assert prediction.status == "succeeded" and prediction.output == "paid by a stranger"


# --- The reconciler: row isolation, shared hashes, no overlapping passes (defect 3) ---------------


def test_one_poisoned_row_does_not_stop_the_reconciler(chain_settings) -> None:
    chain = chain_settings
    good = []
    payers = [fresh_payer(chain) for _ in range(2)]  # minted before our relayer takes nonces
    for payer in payers:
        good.append(settlement.prepare(record_payment(payer["private_key"]).pk))
    rpc(chain.rpc_url, "anvil_setAutomine", [False])
    try:
        for p in good:
            settlement.broadcast(p)
        rpc(chain.rpc_url, "evm_mine", [])
    finally:
        rpc(chain.rpc_url, "anvil_setAutomine", [True])
    poisoned = record_payment(fresh_payer(chain)["private_key"])
    Payment.objects.filter(pk=poisoned.pk).update(status="settling", settle_tx_hash="0x1234")  # not a hash
    orphan = record_payment(fresh_payer(chain)["private_key"])
    Payment.objects.filter(pk=orphan.pk).update(status="settling", settle_tx_hash="0x" + "ab" * 32, network="eip155:999")
    stats = reconcile()
    assert stats["errors"] == 2, stats
    assert set(Payment.objects.filter(pk__in=[p.pk for p in good]).values_list("status", flat=True)) == {"confirmed"}
    for bad in (poisoned, orphan):
        bad.refresh_from_db()
        assert bad.status == "settling" and bad.reconcile_failures == 1 and bad.reconcile_after is not None
    assert reconcile().get("errors", 0) == 0  # backing off: not retried at once, and the pass is clean
    # Undo the fabricated states before the ledger-versus-chain check.
    Payment.objects.filter(pk__in=[poisoned.pk, orphan.pk]).update(
        status="verified", settle_tx_hash=None, network=chain.network
    )


def test_several_payments_may_share_a_settlement_hash(chain_settings) -> None:
    first = record_payment(fresh_payer(chain_settings)["private_key"])
    second = record_payment(fresh_payer(chain_settings)["private_key"])
    shared = "0x" + "cd" * 32
    Payment.objects.filter(pk__in=[first.pk, second.pk]).update(settle_tx_hash=shared)  # one batch transaction
    assert Payment.objects.filter(settle_tx_hash=shared).count() == 2
    Payment.objects.filter(pk__in=[first.pk, second.pk]).update(settle_tx_hash=None)


def test_reconcile_passes_never_overlap(chain_settings) -> None:
    from payments.locks import advisory_lock

    started, release = threading.Event(), threading.Event()

    def holder() -> None:
        with advisory_lock("payments.reconcile") as mine:
            assert mine
            started.set()
            release.wait(10)
        connection.close()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        started.wait(10)
        assert reconcile() == {"skipped": 1}
    finally:
        release.set()
        thread.join()
    assert "skipped" not in reconcile()


@pytest.mark.parametrize("variant", ["to_someone_else", "one_unit_to_us"])
def test_a_nonce_spent_on_another_authorization_is_failed_once(chain_settings, monkeypatch, variant) -> None:
    """The payer signs a second authorization with the same nonce and has it mined first: ours
    can never move money. It must end FAILED (the chain's word: used, without our Transfer),
    not loop between settling and lapsing, and not be booked as paid."""
    from tests.payers import sign_authorization

    chain = chain_settings
    payer = fresh_payer(chain)
    req = Requirement(payment_options()[0], PRICE)
    p = record(payer["private_key"], req)
    other = {"to": Account.create().address} if variant == "to_someone_else" else {"value": 1}
    spent = sign_authorization(payer["private_key"], req, nonce=p.nonce, **other)
    twin = Payment(
        payer=p.payer,
        pay_to=spent["authorization"]["to"],
        amount=int(spent["authorization"]["value"]),
        valid_after=0,
        valid_before=int(spent["authorization"]["validBefore"]),
        nonce=p.nonce,
        signature=spent["signature"],
        asset=p.asset,
    )
    send_as(chain, Account.from_key(chain.spare_keys[1]).address, chain.asset, exact_calldata(twin))
    p = settlement.settle(p.pk)
    for _ in range(3):
        reconcile()
    p.refresh_from_db()
    assert p.status == "failed" and p.unpaid_reason == "nonce_used_elsewhere", (p.status, p.failure_reason)
    assert PaymentEvent.objects.filter(payment=p).count() <= 5  # no settling/lapsing loop


def test_a_replaced_exact_settlement_whose_replacement_reverts_ends_failed(chain_settings, settings) -> None:
    """The exact scheme under the upto case of review A: our transaction replaced, the payer
    spends the authorization's nonce elsewhere, our replacement reverts. The token logs who used
    the nonce, so the chain's answer does not wait for the replaced signature's receipt."""
    from payments.models import UnpaidReason
    from tests.payers import sign_authorization

    chain = chain_settings
    settings.X402_STUCK_AFTER_SECONDS = 0
    payer = fresh_payer(chain)
    before = token_balance(chain, payer["address"])
    p = record_payment(payer["private_key"])
    rpc(chain.rpc_url, "anvil_setAutomine", [False])
    try:
        p = settlement.prepare(p.pk)
        settlement.broadcast(p)
        replaced = p.settle_tx_hash
        tracking.reconcile_batch([p.pk])  # stuck in the pool: re-signed with higher fees
        p.refresh_from_db()
        replacement = p.settle_tx_hash
        assert replacement != replaced and p.settlement_tx.replaced_hashes == [replaced]
        rpc(chain.rpc_url, "anvil_dropTransaction", [replacement])
    finally:
        rpc(chain.rpc_url, "anvil_setAutomine", [True])
    # The payer uses the same nonce for 1 unit to itself.
    other = sign_authorization(
        payer["private_key"], Requirement(payment_options()[0], 1), to=payer["address"], nonce=p.nonce,
        valid_before=p.valid_before,
    )
    elsewhere = Payment(
        payer=p.payer, pay_to=payer["address"], amount=1, valid_after=0, valid_before=p.valid_before,
        nonce=p.nonce, signature=other["signature"],
    )
    send_as(chain, payer["address"], chain.asset, exact_calldata(elsewhere))
    settlement.broadcast(p)  # the replacement mines now, and reverts (the nonce is spent)
    wait_mined(chain.rpc_url, replacement)
    p = tracking.track(p.pk)
    assert rpc(chain.rpc_url, "eth_getTransactionReceipt", [replaced]) is None
    assert int(rpc(chain.rpc_url, "eth_getTransactionReceipt", [replacement])["status"], 16) == 0
    p = lapsing.resolve_lapsing(p.pk)
    assert p.status == "failed" and p.unpaid_reason == UnpaidReason.NONCE_USED_ELSEWHERE
    assert token_balance(chain, payer["address"]) == before  # 1 unit to itself
