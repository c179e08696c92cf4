"""Our side of batch-settlement channels (payments.channels) on the real anvil chain, paid with
the official SDK client's payloads: deposits relayed by our lanes, vouchers charged against the
mirror under the channel's lock, claims of many vouchers in one transaction signed by our
receiverAuthorizer, settle to pay-to, cooperative refunds, the sweep's reaction to a timed
withdrawal, and the mirror rebuilt from the chain when our state is lost."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from payments import tasks
from payments.chain import devchain
from payments.chain.devchain import DevChain
from payments.channels import charges, outbox, state, sweep
from payments.channels.models import Channel, ChannelCharge, ChannelStatus, ChannelTx, ChannelTxStatus
from payments.models import SettlementTx
from payments.options import ConfiguredOption, configured
from payments.x402 import batch_settlement as bs
from tests.batch_settlement import WITHDRAW_DELAY, Agent, requirements
from tests.conftest import fresh_payer, option_settings, rpc, token_balance, wait_mined

PRICE = 1_000
Kind = SettlementTx.Kind


@pytest.fixture(scope="module")
def contracts_placed(chain: DevChain) -> None:
    devchain.place_batch_settlement_contracts(chain.rpc_url)


@dataclass
class Side:
    """Our side for one test: a fresh pay-to (the channels' receiver), our receiverAuthorizer."""

    chain: DevChain
    conf: ConfiguredOption
    pay_to: str
    authorizer: LocalAccount

    def req(self, price: int = PRICE, **extra: Any) -> Any:
        return requirements(self.chain.asset, self.pay_to, self.authorizer.address, price, **extra)

    @property
    def terms(self) -> bs.ChannelTerms:
        return bs.ChannelTerms(
            self.chain.chain_id,
            bytes.fromhex(self.chain.asset[2:]),
            bytes.fromhex(self.pay_to[2:]),
            bytes.fromhex(self.authorizer.address[2:]),
            WITHDRAW_DELAY,
        )


def _side(chain: DevChain, **limits: Any) -> Iterator[Side]:
    pay_to = fresh_payer(chain, 0)["address"]
    authorizer = Account.create()
    key = "0x" + authorizer.key.hex().removeprefix("0x")
    with override_settings(
        **option_settings(chain, pay_to=pay_to), X402_CHANNEL_AUTHORIZER_KEY=key, **limits
    ):
        yield Side(chain, configured()[0], to_checksum_address(pay_to), authorizer)


@pytest.fixture
def side(chain: DevChain, contracts_placed: None) -> Iterator[Side]:
    """Every unclaimed charge is due at once."""
    yield from _side(chain, X402_CHANNEL_CLAIM_UNCLAIMED_MAX=1)


@pytest.fixture
def patient_side(chain: DevChain, contracts_placed: None) -> Iterator[Side]:
    """No threshold is ever reached: only a timed withdrawal makes a claim due."""
    yield from _side(
        chain,
        X402_CHANNEL_CLAIM_UNCLAIMED_MAX=10**30,
        X402_CHANNEL_CLAIM_TOTAL_MAX=10**30,
        X402_CHANNEL_CLAIM_MAX_AGE=10**9,
    )


def _agent(chain: DevChain) -> Agent:
    return Agent(fresh_payer(chain)["private_key"])


def _mined(side: Side, tx: SettlementTx | None) -> None:
    """Wait for ``tx``, then have it followed to its outcome: it must have succeeded."""
    assert tx is not None
    wait_mined(side.chain.rpc_url, tx.tx_hash)
    assert outbox.track(tx.pk) == ChannelTxStatus.MINED


def _open(side: Side, agent: Agent, req: Any) -> tuple[bs.DepositPayload, Channel]:
    """The agent's first payment, relayed by our lane; the channel as our mirror has it then."""
    payload = bs.parse_payload(agent.pay(req), side.chain.chain_id)
    assert isinstance(payload, bs.DepositPayload)
    _mined(side, outbox.deposit(side.conf, payload))
    return payload, Channel.objects.get(channel_id=bs.hex_of(payload.voucher.channel_id))


def _chain_channel(side: Side, channel: Channel) -> state.ChainChannel:
    (found,) = state.read_channels(side.chain.rpc_url, [channel.id_bytes])
    return found


def _pay(side: Side, channel: Channel, payload: bs.ChannelPayload, amount: int = PRICE) -> charges.Charged:
    """Verify ``payload`` against the mirror (as the gate will) and charge ``amount`` of PRICE."""
    channel.refresh_from_db()
    verified = bs.verify_payload(payload, side.terms, channel.mirror, PRICE)
    return charges.charge_voucher(verified, amount, price=PRICE, resource="/v1/test", fingerprint="f" * 64)


def _voucher(side: Side, agent: Agent, req: Any, charged: int, balance: int) -> bs.VoucherPayload:
    payload = bs.parse_payload(agent.voucher(req, charged=charged, balance=balance), side.chain.chain_id)
    assert isinstance(payload, bs.VoucherPayload)
    return payload


def _rejected(code: bs.ErrorCode, call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(bs.ChannelRejected) as exc:
        call(*args, **kwargs)
    assert exc.value.code is code, exc.value.code


def _eth(side: Side, address: str) -> int:
    return int(rpc(side.chain.rpc_url, "eth_getBalance", [address, "latest"]), 16)


def _charge_many(side: Side, agent: Agent, req: Any, channel: Channel, first: bs.ChannelPayload, n: int) -> int:
    """Charge ``first`` then n-1 more vouchers, each of a measured cost at most PRICE; their sum."""
    total = 0
    payload: bs.ChannelPayload = first
    for i in range(n):
        if i:
            payload = _voucher(side, agent, req, total, int(channel.balance))
        amount = PRICE - 37 * i
        _pay(side, channel, payload, amount)
        total += amount
    return total


# ---------------------------------------------------------------------------- deposit


@pytest.mark.django_db
def test_a_deposit_relayed_by_our_lane_opens_the_channel_and_the_mirror_agrees(side: Side) -> None:
    agent = _agent(side.chain)
    payer = agent.account.address
    tokens, gas_money = token_balance(side.chain, payer), _eth(side, payer)
    payload, channel = _open(side, agent, side.req())
    amount = payload.deposit.amount
    tx = SettlementTx.objects.get(kind=Kind.CHANNEL_DEPOSIT, channel_txs__channel=channel)
    assert tx.relayer == side.chain.relayer_address and tx.to == bs.BATCH_SETTLEMENT_ADDRESS
    assert tx.gas_used and tx.block_number
    assert token_balance(side.chain, payer) == tokens - amount
    assert _eth(side, payer) == gas_money  # the agent paid no gas
    on_chain = _chain_channel(side, channel)
    assert (on_chain.balance, on_chain.total_claimed) == (amount, 0)
    assert (int(channel.balance), int(channel.total_claimed), int(channel.charged_cumulative)) == (amount, 0, 0)
    assert channel.status == ChannelStatus.OPEN and channel.chain_read_at is not None
    assert channel.config == payload.config and channel.receiver == side.pay_to
    # The first voucher (in the deposit) is charged against the deposited balance.
    charged = _pay(side, channel, payload)
    assert charged.mirror.charged_cumulative == PRICE
    # The same deposit again: its authorization is spent, the simulation refuses it, nothing is signed.
    _rejected(bs.ErrorCode.DEPOSIT_SIMULATION_FAILED, outbox.deposit, side.conf, payload)
    assert SettlementTx.objects.filter(kind=Kind.CHANNEL_DEPOSIT).count() == 1


# ---------------------------------------------------------------------------- claim and settle


@pytest.mark.django_db
def test_twenty_vouchers_then_one_claim_and_one_settle_pay_exactly_the_charges(side: Side) -> None:
    req = side.req(minDeposit=str(30 * PRICE))
    agents = [_agent(side.chain), _agent(side.chain)]
    opened = [_open(side, a, req) for a in agents]
    total = 0
    for agent, (payload, channel) in zip(agents, opened, strict=True):
        total += _charge_many(side, agent, req, channel, payload, 20 if agent is agents[0] else 3)
    assert sum(int(c.amount) for c in ChannelCharge.objects.all()) == total
    assert token_balance(side.chain, side.pay_to) == 0
    # One sweep (the beat's task) claims both channels in one transaction...
    assert tasks.sweep_channels()["claimed"] == 2
    (claim,) = SettlementTx.objects.filter(kind=Kind.CHANNEL_CLAIM)
    wait_mined(side.chain.rpc_url, claim.tx_hash)
    # ...the next follows it and settles to pay-to in one more...
    assert sweep.sweep(side.conf) == {"tracked": 1, "claimed": 0, "settled": 1}
    (settle,) = SettlementTx.objects.filter(kind=Kind.CHANNEL_SETTLE)
    wait_mined(side.chain.rpc_url, settle.tx_hash)
    # ...and the last follows that: nothing more to do.
    assert sweep.sweep(side.conf) == {"tracked": 1, "claimed": 0, "settled": 0}
    assert token_balance(side.chain, side.pay_to) == total
    for _, channel in opened:
        channel.refresh_from_db()
        assert _chain_channel(side, channel).total_claimed == int(channel.total_claimed)
        assert int(channel.total_claimed) == int(channel.charged_cumulative) == sum(
            int(c.amount) for c in channel.charges.all()
        )
    assert state.receiver_state(side.chain.rpc_url, side.pay_to, side.chain.asset) == (total, total)
    assert set(ChannelTx.objects.values_list("status", flat=True)) == {ChannelTxStatus.MINED}
    assert SettlementTx.objects.filter(kind__in=[Kind.CHANNEL_CLAIM, Kind.CHANNEL_SETTLE]).count() == 2


@pytest.mark.django_db
def test_a_row_the_node_refuses_does_not_hold_back_the_others_claims(side: Side) -> None:
    req = side.req()
    agents = [_agent(side.chain), _agent(side.chain)]
    opened = [_open(side, a, req) for a in agents]
    for payload, channel in opened:
        _pay(side, channel, payload)
    (_, good), (_, bad) = opened
    # The voucher we hold for one channel is not the payer's (a corrupted record).
    Channel.objects.filter(pk=bad.pk).update(voucher_signature=bs.hex_of(b"\x01" * 64 + b"\x1b"))
    _mined(side, outbox.claim(side.conf, list(Channel.objects.order_by("pk"))))
    assert _chain_channel(side, good).total_claimed == PRICE
    assert _chain_channel(side, bad).total_claimed == 0
    assert list(ChannelTx.objects.filter(tx__kind=Kind.CHANNEL_CLAIM).values_list("channel", flat=True)) == [good.pk]
    # Alone, it is refused again: nothing is sent.
    assert outbox.claim(side.conf, [Channel.objects.get(pk=bad.pk)]) is None


@pytest.mark.django_db
def test_a_claim_whose_block_is_dropped_is_sent_again_and_counts_only_at_depth(side: Side) -> None:
    req = side.req(minDeposit=str(10 * PRICE))
    agent = _agent(side.chain)
    payload, channel = _open(side, agent, req)
    charged = _charge_many(side, agent, req, channel, payload, 3)
    url = side.chain.rpc_url
    with override_settings(**option_settings(side.chain, pay_to=side.pay_to, confirmations=3)):
        conf = configured()[0]
        snapshot = rpc(url, "evm_snapshot", [])
        tx = outbox.claim(conf, [channel])
        assert tx is not None
        wait_mined(url, tx.tx_hash)
        assert outbox.track(tx.pk) == ChannelTxStatus.SENT  # one confirmation of three
        assert _chain_channel(side, channel).total_claimed == charged
        assert rpc(url, "evm_revert", [snapshot])  # a reorg drops its block
        assert _chain_channel(side, channel).total_claimed == 0
        assert outbox.track(tx.pk) == ChannelTxStatus.SENT  # the same signed bytes, sent again
        wait_mined(url, tx.tx_hash)
        rpc(url, "anvil_mine", [hex(2)])
        assert outbox.track(tx.pk) == ChannelTxStatus.MINED
    channel.refresh_from_db()
    assert int(channel.total_claimed) == _chain_channel(side, channel).total_claimed == charged
    assert SettlementTx.objects.filter(kind=Kind.CHANNEL_CLAIM).count() == 1


# ---------------------------------------------------------------------------- attacks on a charge


@pytest.mark.django_db
def test_a_replayed_or_lower_voucher_is_never_charged(side: Side) -> None:
    req = side.req(minDeposit=str(10 * PRICE))
    agent = _agent(side.chain)
    payload, channel = _open(side, agent, req)
    verified = bs.verify_payload(payload, side.terms, channel.mirror, PRICE)
    charges.charge_voucher(verified, PRICE, price=PRICE)
    # Replayed: the voucher is no longer built on what we charged.
    _rejected(bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH, charges.charge_voucher, verified, PRICE, price=PRICE)
    # Two more, then a voucher built on an older total (lower cumulative).
    second = _voucher(side, agent, req, PRICE, 10 * PRICE)
    _pay(side, channel, second)
    third = _voucher(side, agent, req, 2 * PRICE, 10 * PRICE)
    _pay(side, channel, third)
    channel.refresh_from_db()
    _rejected(bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH, bs.verify_payload, second, side.terms, channel.mirror, PRICE)
    stale = bs.VerifiedVoucher(second, second.voucher.channel_id)  # as if verified before the others
    _rejected(bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH, charges.charge_voucher, stale, PRICE, price=PRICE)
    # More than the price, and a zero charge (a run that failed on our side) changes nothing.
    fourth = _voucher(side, agent, req, 3 * PRICE, 10 * PRICE)
    fresh = bs.verify_payload(fourth, side.terms, channel.mirror, PRICE)
    with pytest.raises(ValueError):
        charges.charge_voucher(fresh, PRICE + 1, price=PRICE)
    assert charges.charge_voucher(fresh, 0, price=PRICE).charge is None
    channel.refresh_from_db()
    assert int(channel.charged_cumulative) == 3 * PRICE
    assert [int(c.cumulative) for c in channel.charges.all()] == [PRICE, 2 * PRICE, 3 * PRICE]
    assert int(channel.signed_max_claimable) == 3 * PRICE


@pytest.mark.django_db
def test_a_voucher_over_the_balance_is_refused(side: Side) -> None:
    req = side.req(minDeposit=str(2 * PRICE))
    agent = _agent(side.chain)
    payload, channel = _open(side, agent, req)
    balance = payload.deposit.amount
    assert balance == 2 * PRICE
    _pay(side, channel, payload)
    _pay(side, channel, _voucher(side, agent, req, PRICE, balance))
    # The payer's client believes in a bigger balance and signs past ours.
    over = _voucher(side, agent, req, 2 * PRICE, 10 * balance)
    channel.refresh_from_db()
    _rejected(bs.ErrorCode.CUMULATIVE_EXCEEDS_BALANCE, bs.verify_payload, over, side.terms, channel.mirror, PRICE)
    unchecked = bs.VerifiedVoucher(over, over.voucher.channel_id)
    _rejected(bs.ErrorCode.CUMULATIVE_EXCEEDS_BALANCE, charges.charge_voucher, unchecked, PRICE, price=PRICE)
    channel.refresh_from_db()
    assert int(channel.charged_cumulative) == balance == sum(int(c.amount) for c in channel.charges.all())


def _race(work: list[Any]) -> list[Any]:
    """Run each callable in its own thread (its own database connection), all released at once."""
    results: list[Any] = [None] * len(work)
    start = threading.Barrier(len(work))

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work[i]()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test judges
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_charges_on_one_channel(side: Side) -> None:
    req = side.req(minDeposit=str(25 * PRICE))
    agent = _agent(side.chain)
    payload, channel = _open(side, agent, req)
    balance = payload.deposit.amount
    # The same voucher twenty times at once: one charge, the others busy or overtaken.
    verified = bs.verify_payload(payload, side.terms, channel.mirror, PRICE)
    results = _race([lambda: charges.charge_voucher(verified, PRICE, price=PRICE) for _ in range(20)])
    won = [r for r in results if isinstance(r, charges.Charged)]
    assert len(won) == 1, results
    assert {r.code for r in results if not isinstance(r, charges.Charged)} <= {
        bs.ErrorCode.CHANNEL_BUSY,
        bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH,
    }
    # Twenty successive vouchers (each built on the previous total) raced, waiting for the lock:
    # whatever the order, the total never exceeds what was signed nor the balance.
    vouchers = [_voucher(side, agent, req, k * PRICE, balance) for k in range(1, 21)]
    signed = max(v.voucher.max_claimable for v in vouchers)
    work = [
        (lambda v=v: charges.charge_voucher(bs.VerifiedVoucher(v, v.voucher.channel_id), PRICE, price=PRICE))
        for v in vouchers
    ]
    for _ in range(5):  # rounds: each round charges the vouchers whose turn it is
        _race(work)
    channel.refresh_from_db()
    charged = int(channel.charged_cumulative)
    assert charged <= min(signed, balance)
    cumulatives = [int(c.cumulative) for c in channel.charges.all()]
    assert cumulatives == sorted(set(cumulatives))
    assert sum(int(c.amount) for c in channel.charges.all()) == charged
    assert int(channel.signed_max_claimable) >= charged


# ---------------------------------------------------------------------------- withdrawal, lost state, refund


@pytest.fixture
def time_travel(chain: DevChain) -> Iterator[None]:
    """The chain's clock moves in this test; everything it did is reverted afterwards."""
    snapshot = rpc(chain.rpc_url, "evm_snapshot", [])
    try:
        yield
    finally:
        assert rpc(chain.rpc_url, "evm_revert", [snapshot])


@pytest.mark.django_db
def test_a_timed_withdrawal_has_the_channel_claimed_before_it_finalizes(
    patient_side: Side, time_travel: None
) -> None:
    side = patient_side
    req = side.req(minDeposit=str(10 * PRICE))
    agent = _agent(side.chain)
    payer = agent.account.address
    payload, channel = _open(side, agent, req)
    balance = payload.deposit.amount
    charged = _charge_many(side, agent, req, channel, payload, 3)
    assert sweep.sweep(side.conf)["claimed"] == 0  # no threshold reached
    # The payer starts its exit with everything unclaimed on chain.
    data = state.calldata("initiateWithdraw", payload.config.abi(), balance)
    wait_mined(
        side.chain.rpc_url,
        rpc(side.chain.rpc_url, "eth_sendTransaction", [{"from": payer, "to": bs.BATCH_SETTLEMENT_ADDRESS, "data": data}]),
    )
    assert sweep.sweep(side.conf)["claimed"] == 1
    channel.refresh_from_db()
    assert channel.status == ChannelStatus.WITHDRAWING and channel.withdraw_finalize_after is not None
    (claim,) = SettlementTx.objects.filter(kind=Kind.CHANNEL_CLAIM)
    wait_mined(side.chain.rpc_url, claim.tx_hash)
    sweep.sweep(side.conf)
    assert _chain_channel(side, channel).total_claimed == charged
    rpc(side.chain.rpc_url, "evm_increaseTime", [WITHDRAW_DELAY + 1])
    rpc(side.chain.rpc_url, "evm_mine", [])
    before = token_balance(side.chain, payer)
    data = state.calldata("finalizeWithdraw", payload.config.abi())
    wait_mined(
        side.chain.rpc_url,
        rpc(side.chain.rpc_url, "eth_sendTransaction", [{"from": payer, "to": bs.BATCH_SETTLEMENT_ADDRESS, "data": data}]),
    )
    assert token_balance(side.chain, payer) == before + balance - charged  # what we charged stayed ours
    sweep.sweep(side.conf)  # settles what was claimed
    (settle,) = SettlementTx.objects.filter(kind=Kind.CHANNEL_SETTLE)
    wait_mined(side.chain.rpc_url, settle.tx_hash)
    assert token_balance(side.chain, side.pay_to) == charged


@pytest.mark.django_db
def test_our_state_lost_the_mirror_is_rebuilt_from_the_claimed_total(side: Side) -> None:
    req = side.req(minDeposit=str(10 * PRICE))
    key = fresh_payer(side.chain)["private_key"]
    agent = Agent(key)
    payload, channel = _open(side, agent, req)
    claimed = _charge_many(side, agent, req, channel, payload, 4)
    _mined(side, outbox.claim(side.conf, [channel]))
    _pay(side, channel, _voucher(side, agent, req, claimed, payload.deposit.amount))  # charged, never claimed
    # Our records are gone.
    ChannelTx.objects.all().delete()
    ChannelCharge.objects.all().delete()
    Channel.objects.all().delete()
    rebuilt = state.channel_for(side.chain.rpc_url, side.conf.option.network, payload.config, payload.voucher.channel_id)
    assert int(rebuilt.charged_cumulative) == int(rebuilt.total_claimed) == claimed
    assert int(rebuilt.balance) == payload.deposit.amount
    # A client that lost its record too reads the same baseline from the chain and pays on.
    cold = Agent(key, signer=EthAccountSignerWithRPC(Account.from_key(key), side.chain.rpc_url))
    resumed = bs.parse_payload(cold.pay(req), side.chain.chain_id)
    assert resumed.voucher.max_claimable == claimed + PRICE
    assert _pay(side, rebuilt, resumed).mirror.charged_cumulative == claimed + PRICE
    # Nothing claimed is charged again: an old voucher on the lost total is refused.
    old = _voucher(side, agent, req, claimed - PRICE, payload.deposit.amount)
    rebuilt.refresh_from_db()
    _rejected(bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH, bs.verify_payload, old, side.terms, rebuilt.mirror, PRICE)


@pytest.mark.django_db
def test_a_cooperative_refund_returns_exactly_the_rest(side: Side) -> None:
    req = side.req(minDeposit=str(10 * PRICE))
    agent = _agent(side.chain)
    payer = agent.account.address
    payload, channel = _open(side, agent, req)
    balance = payload.deposit.amount
    charged = _charge_many(side, agent, req, channel, payload, 3)
    ask = bs.parse_payload(agent.refund(req, charged=charged), side.chain.chain_id)
    assert isinstance(ask, bs.RefundPayload)
    channel.refresh_from_db()
    bs.verify_payload(ask, side.terms, channel.mirror, PRICE)
    before = token_balance(side.chain, payer)
    tx = outbox.refund(side.conf, channel.channel_id, ask.amount)
    # The money on its way back is not ours to charge any more.
    channel.refresh_from_db()
    assert int(channel.balance) == charged
    late = _voucher(side, agent, req, charged, balance)
    _rejected(bs.ErrorCode.CUMULATIVE_EXCEEDS_BALANCE, bs.verify_payload, late, side.terms, channel.mirror, PRICE)
    _mined(side, tx)
    assert token_balance(side.chain, payer) == before + balance - charged
    on_chain = _chain_channel(side, channel)
    assert (on_chain.balance, on_chain.total_claimed, on_chain.refund_nonce) == (charged, charged, 1)
    channel.refresh_from_db()
    assert int(channel.refunded) == balance - charged and channel.status == ChannelStatus.CLOSED
    assert (int(channel.balance), int(channel.total_claimed)) == (charged, charged)
    _rejected(bs.ErrorCode.REFUND_NO_BALANCE, outbox.refund, side.conf, channel.channel_id)
    # What we charged (claimed in the refund's transaction) goes to pay-to.
    _mined(side, outbox.settle(side.conf))
    assert token_balance(side.chain, side.pay_to) == charged


# ---------------------------------------------------------------------------- when to claim


def _row(n: int, charged: int, claimed: int = 0, status: str = ChannelStatus.OPEN, age_seconds: int = 0) -> Channel:
    """A channel of the option (no chain needed) with ``charged`` charged in one charge."""
    option = configured()[0].option
    channel = Channel.objects.create(
        channel_id="0x" + f"{n:064x}",
        network=option.network,
        payer=option.pay_to,
        payer_authorizer=option.pay_to,
        receiver=option.pay_to,
        receiver_authorizer=option.pay_to,
        asset=option.asset,
        withdraw_delay=WITHDRAW_DELAY,
        salt="0x" + "00" * 32,
        status=status,
        balance=10**9,
        total_claimed=claimed,
        charged_cumulative=charged,
        signed_max_claimable=charged,
    )
    if charged > claimed:
        ChannelCharge.objects.create(
            channel=channel,
            amount=charged - claimed,
            cumulative=charged,
            max_claimable=charged,
            created_at=timezone.now() - timedelta(seconds=age_seconds),
        )
    return channel


@pytest.mark.django_db
def test_claims_are_due_per_channel_in_total_by_age_and_on_a_withdrawal(offline_options: DevChain) -> None:
    limits = {
        "X402_CHANNEL_CLAIM_UNCLAIMED_MAX": 5_000,
        "X402_CHANNEL_CLAIM_TOTAL_MAX": 20_000,
        "X402_CHANNEL_CLAIM_MAX_AGE": 3600,
    }
    with override_settings(**limits):
        conf = configured()[0]
        big = _row(1, 5_000)
        _row(2, 4_999)
        _row(3, 8_000, claimed=8_000)  # nothing unclaimed
        old = _row(4, 100, age_seconds=3601)
        leaving = _row(5, 10, status=ChannelStatus.WITHDRAWING)
        assert [c.pk for c in sweep.due(conf)] == [big.pk, old.pk, leaving.pk]
        # All together past the total: every channel with unclaimed charges.
        _row(6, 4_999, claimed=0)
        _row(7, 4_999, claimed=0)
        assert len(sweep.due(conf)) == 6


@pytest.mark.django_db
def test_a_balance_that_shrank_while_a_request_held_the_channel_cuts_its_charge(side: Side) -> None:
    """A withdrawal finalized while a request ran: its end charges what is left, never fails."""
    req = side.req(minDeposit=str(2 * PRICE))
    payload, channel = _open(side, _agent(side.chain), req)
    verified = bs.verify_payload(payload, side.terms, channel.mirror, PRICE)
    with transaction.atomic():
        charges.hold(verified, PRICE, "request-1", channel.pk)
    Channel.objects.filter(pk=channel.pk).update(balance=PRICE // 4)
    charged = charges.release(channel.pk, "request-1", PRICE)
    assert charged is not None and charged.charge is not None and int(charged.charge.amount) == PRICE // 4
    channel.refresh_from_db()
    assert int(channel.charged_cumulative) == PRICE // 4 and not channel.held_by
    assert charges.release(channel.pk, "request-1", PRICE) is None  # released once
