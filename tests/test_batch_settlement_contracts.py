"""Our x402 batch-settlement contract and its EIP-3009 deposit collector (contracts/), placed at
the canonical addresses on anvil, driven with payloads of the official SDK's batch-settlement
client: deposits through the collector, claims of many channels in one transaction on the
receiverAuthorizer's signature, settlement to pay-to, cooperative refund, the payer's timed
withdrawal, and the refusals the scheme relies on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as SdkChannelConfig
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.schemas import PaymentRequired

from payments.chain import contracts, devchain
from payments.chain.devchain import DevChain
from payments.x402 import batch_settlement as bs
from tests.batch_settlement import NETWORK, WITHDRAW_DELAY, Agent, requirements
from tests.conftest import fresh_payer, rpc, token_balance

PRICE = 1_000
COLLECTOR = bs.ERC3009_DEPOSIT_COLLECTOR_ADDRESS


@pytest.fixture(scope="module")
def settlement(chain: DevChain) -> Any:
    """The settlement contract and its collector placed on the test chain."""
    devchain.place_batch_settlement_contracts(chain.rpc_url)
    w3 = Web3(Web3.HTTPProvider(chain.rpc_url))
    return w3.eth.contract(
        address=bs.BATCH_SETTLEMENT_ADDRESS, abi=contracts.artifact("X402BatchSettlement")["abi"]
    )


@pytest.fixture
def side(chain: DevChain) -> dict[str, Any]:
    """Our side of the channels: a fresh pay-to (the receiver, holding nothing), our
    receiverAuthorizer key, and an unrelated account that relays the signed transactions."""
    return {
        "receiver": fresh_payer(chain, 0)["address"],
        "authorizer": Account.create(),
        "relay": fresh_payer(chain, 0)["address"],
    }


@pytest.fixture
def time_travel(chain: DevChain) -> Iterator[None]:
    """Let a test move the chain's clock: everything it did is reverted afterwards (time too), so
    the session's chain keeps the wall clock the other tests sign against."""
    snapshot = rpc(chain.rpc_url, "evm_snapshot", [])
    try:
        yield
    finally:
        assert rpc(chain.rpc_url, "evm_revert", [snapshot])


def _req(chain: DevChain, side: dict[str, Any], price: int = PRICE) -> Any:
    return requirements(chain.asset, side["receiver"], side["authorizer"].address, price)


def _agent(chain: DevChain, funds: int = 10**9) -> Agent:
    return Agent(fresh_payer(chain, funds)["private_key"])


def _mine(settlement: Any, call: Any, sender: str) -> Any:
    receipt = settlement.w3.eth.wait_for_transaction_receipt(call.transact({"from": sender}))
    assert receipt["status"] == 1
    return receipt


def _reverts(error: str, call: Any, sender: str) -> None:
    """``call`` from ``sender`` reverts with the contract's custom error ``error`` (a signature)."""
    with pytest.raises((ContractCustomError, ContractLogicError)) as exc:
        call.call({"from": sender})
    assert Web3.keccak(text=error)[:4].hex() in str(exc.value.data or exc.value), str(exc.value)


def _deposit_call(settlement: Any, payload: bs.DepositPayload) -> Any:
    return settlement.functions.deposit(
        payload.config.abi(), payload.deposit.amount, COLLECTOR, payload.deposit.collector_data()
    )


def _open(
    chain: DevChain, settlement: Any, side: dict[str, Any], agent: Agent, req: Any
) -> bs.DepositPayload:
    """The agent's first payment: the SDK client's deposit, relayed."""
    payload = bs.parse_payload(agent.pay(req), chain.chain_id)
    assert isinstance(payload, bs.DepositPayload)
    _mine(settlement, _deposit_call(settlement, payload), side["relay"])
    return payload


def _voucher(chain: DevChain, agent: Agent, req: Any, charged: int, balance: int) -> bs.VoucherPayload:
    payload = bs.parse_payload(agent.voucher(req, charged=charged, balance=balance), chain.chain_id)
    assert isinstance(payload, bs.VoucherPayload)
    return payload


def _claim(payload: bs.ChannelPayload, total: int) -> bs.VoucherClaim:
    return bs.VoucherClaim(payload.config, payload.voucher.max_claimable, payload.voucher.signature, total)


def _sign(key: LocalAccount, digest: bytes) -> bytes:
    return bytes(key.unsafe_sign_hash(digest).signature)


def _claim_args(chain: DevChain, claims: list[bs.VoucherClaim], key: LocalAccount) -> list[Any]:
    return [[c.abi() for c in claims], _sign(key, bs.claim_batch_digest(claims, chain.chain_id))]


def _claim_call(chain: DevChain, settlement: Any, claims: list[bs.VoucherClaim], key: LocalAccount) -> Any:
    return settlement.functions.claimWithSignature(*_claim_args(chain, claims, key))


def _channel(settlement: Any, payload: bs.ChannelPayload) -> tuple[int, int]:
    return tuple(settlement.functions.channels(payload.voucher.channel_id).call())


def _events(settlement: Any, name: str, receipt: Any) -> list[Any]:
    """The contract's ``name`` events in ``receipt`` (the token's logs skipped)."""
    return list(getattr(settlement.events, name)().process_receipt(receipt, errors=DISCARD))


def _pair(call: Any) -> tuple[int, int]:
    return tuple(call.call())


# ---------------------------------------------------------------------------- placement


def test_contracts_are_at_the_canonical_addresses(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    w3 = settlement.w3
    assert len(w3.eth.get_code(bs.BATCH_SETTLEMENT_ADDRESS)) > 0 and len(w3.eth.get_code(COLLECTOR)) > 0
    assert settlement.functions.DOMAIN_SEPARATOR().call() == bs.settlement_domain(chain.chain_id)
    payload = bs.parse_payload(_agent(chain).pay(_req(chain, side)), chain.chain_id)
    channel_id = settlement.functions.getChannelId(payload.config.abi()).call()
    assert channel_id == payload.voucher.channel_id == payload.config.channel_id(chain.chain_id)
    assert bs.hex_of(channel_id) == compute_channel_id(
        SdkChannelConfig.from_dict(payload.config.wire()), NETWORK
    )
    assert settlement.functions.getVoucherDigest(channel_id, 1234).call() == bs.voucher_digest(
        channel_id, 1234, chain.chain_id
    )
    assert settlement.functions.getRefundDigest(channel_id, 7, 99).call() == bs.refund_digest(
        channel_id, 7, 99, chain.chain_id
    )
    claims = [_claim(payload, 500), _claim(payload, 1000)]
    assert settlement.functions.getClaimBatchDigest(
        [c.abi() for c in claims]
    ).call() == bs.claim_batch_digest(claims, chain.chain_id)


# ---------------------------------------------------------------------------- deposits


def test_deposit_through_the_collector(chain: DevChain, settlement: Any, side: dict[str, Any]) -> None:
    agent, req = _agent(chain), _req(chain, side)
    payer = agent.account.address
    before = token_balance(chain, payer), token_balance(chain, bs.BATCH_SETTLEMENT_ADDRESS)
    payload = bs.parse_payload(agent.pay(req), chain.chain_id)
    assert isinstance(payload, bs.DepositPayload)
    amount = payload.deposit.amount
    receipt = _mine(settlement, _deposit_call(settlement, payload), side["relay"])
    assert token_balance(chain, payer) == before[0] - amount
    assert token_balance(chain, bs.BATCH_SETTLEMENT_ADDRESS) == before[1] + amount
    assert _channel(settlement, payload) == (amount, 0)
    (created,) = _events(settlement, "ChannelCreated", receipt)
    assert created["args"]["channelId"] == payload.voucher.channel_id
    assert created["args"]["config"]["payer"] == payer
    (deposited,) = _events(settlement, "Deposited", receipt)
    assert (deposited["args"]["amount"], deposited["args"]["newBalance"]) == (amount, amount)
    # The authorization is spent: the same deposit again fails in the token.
    with pytest.raises(ContractLogicError, match="authorization is used"):
        _deposit_call(settlement, payload).call({"from": side["relay"]})
    # A top-up is a second authorization; the channel is not created twice.
    agent.knows(req, charged=amount, balance=amount)
    top_up = bs.parse_payload(agent.pay(req), chain.chain_id)
    assert isinstance(top_up, bs.DepositPayload) and top_up.voucher.channel_id == payload.voucher.channel_id
    receipt = _mine(settlement, _deposit_call(settlement, top_up), side["relay"])
    assert not _events(settlement, "ChannelCreated", receipt)
    assert _channel(settlement, payload) == (amount + top_up.deposit.amount, 0)


def test_a_deposit_authorization_funds_only_its_channel(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    agent = _agent(chain)
    payload = bs.parse_payload(agent.pay(_req(chain, side)), chain.chain_id)
    assert isinstance(payload, bs.DepositPayload)
    attacker = fresh_payer(chain, 0)["address"]
    # Into a channel of the attacker's choosing (another receiver): the nonce binds the channel.
    other = replace(payload.config, receiver=bytes.fromhex(attacker[2:]))
    call = settlement.functions.deposit(
        other.abi(), payload.deposit.amount, COLLECTOR, payload.deposit.collector_data()
    )
    with pytest.raises(ContractLogicError, match="invalid signature"):
        call.call({"from": attacker})
    # Straight through the collector: only the settlement contract may call it.
    collector = settlement.w3.eth.contract(
        address=COLLECTOR, abi=contracts.artifact("X402ERC3009DepositCollector")["abi"]
    )
    _reverts(
        "OnlyX402BatchSettlement()",
        collector.functions.collect(
            agent.account.address,
            chain.asset,
            payload.deposit.amount,
            payload.voucher.channel_id,
            payload.deposit.collector_data(),
        ),
        attacker,
    )
    # A collector that sends nothing credits nothing.
    _reverts(
        "InvalidCollector()",
        settlement.functions.deposit(payload.config.abi(), 1, attacker, b""),
        attacker,
    )


# ---------------------------------------------------------------------------- claims and settle


def test_claim_two_channels_in_one_transaction_then_settle_to_pay_to(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    req = _req(chain, side)
    a, b = _agent(chain), _agent(chain)
    deposit_a, deposit_b = _open(chain, settlement, side, a, req), _open(chain, settlement, side, b, req)
    # Three requests on A (the last charged 400 of its 1000), one on B.
    voucher_a = _voucher(chain, a, req, charged=2 * PRICE, balance=deposit_a.deposit.amount)
    voucher_b = deposit_b
    claims = [_claim(voucher_a, 2 * PRICE + 400), _claim(voucher_b, PRICE)]
    receipt = _mine(settlement, _claim_call(chain, settlement, claims, side["authorizer"]), side["relay"])
    events = _events(settlement, "Claimed", receipt)
    assert [(e["args"]["channelId"], e["args"]["claimAmount"]) for e in events] == [
        (voucher_a.voucher.channel_id, 2_400),
        (voucher_b.voucher.channel_id, 1_000),
    ]
    assert _channel(settlement, voucher_a) == (deposit_a.deposit.amount, 2_400)
    assert _channel(settlement, voucher_b) == (deposit_b.deposit.amount, 1_000)
    assert _pair(settlement.functions.receivers(side["receiver"], chain.asset)) == (3_400, 0)
    # Claiming moved no money; settling sends it all to pay-to in one transfer.
    assert token_balance(chain, side["receiver"]) == 0
    receipt = _mine(settlement, settlement.functions.settle(side["receiver"], chain.asset), side["relay"])
    (settled,) = _events(settlement, "Settled", receipt)
    assert settled["args"]["amount"] == 3_400
    assert token_balance(chain, side["receiver"]) == 3_400
    assert _pair(settlement.functions.receivers(side["receiver"], chain.asset)) == (3_400, 3_400)
    # Nothing left: settling again moves nothing.
    receipt = _mine(settlement, settlement.functions.settle(side["receiver"], chain.asset), side["relay"])
    assert not _events(settlement, "Settled", receipt)
    assert token_balance(chain, side["receiver"]) == 3_400


def test_a_replayed_voucher_claims_nothing_more(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    req = _req(chain, side)
    agent = _agent(chain)
    deposit = _open(chain, settlement, side, agent, req)
    voucher = _voucher(chain, agent, req, charged=PRICE, balance=deposit.deposit.amount)
    claims = [_claim(voucher, 2 * PRICE)]
    _mine(settlement, _claim_call(chain, settlement, claims, side["authorizer"]), side["relay"])
    # The same claim again changes nothing (cumulative totals: the spec's no-op).
    receipt = _mine(settlement, _claim_call(chain, settlement, claims, side["authorizer"]), side["relay"])
    assert not _events(settlement, "Claimed", receipt)
    assert _channel(settlement, voucher) == (deposit.deposit.amount, 2 * PRICE)
    # The old voucher cannot claim past its ceiling...
    _reverts(
        "ClaimExceedsCeiling()",
        _claim_call(chain, settlement, [_claim(voucher, 2 * PRICE + 1)], side["authorizer"]),
        side["relay"],
    )
    # ...nor be replayed on another channel of the same payer (another salt).
    other_agent = Agent("0x" + agent.account.key.hex().removeprefix("0x"), salt="0x" + "07" * 32)
    other = _open(chain, settlement, side, other_agent, req)
    assert other.voucher.channel_id != voucher.voucher.channel_id
    replayed = bs.VoucherClaim(other.config, voucher.voucher.max_claimable, voucher.voucher.signature, PRICE)
    _reverts(
        "InvalidSignature()", _claim_call(chain, settlement, [replayed], side["authorizer"]), side["relay"]
    )


def test_a_cumulative_above_the_balance_reverts(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    req = _req(chain, side)
    agent = _agent(chain)
    deposit = _open(chain, settlement, side, agent, req)
    balance = deposit.deposit.amount
    # The payer signs past its balance (its client believed in a bigger one).
    over = _voucher(chain, agent, req, charged=balance, balance=10 * balance)
    assert over.voucher.max_claimable == balance + PRICE
    _reverts(
        "ClaimExceedsBalance()",
        _claim_call(chain, settlement, [_claim(over, balance + 1)], side["authorizer"]),
        side["relay"],
    )
    # Up to the balance it claims.
    _mine(
        settlement, _claim_call(chain, settlement, [_claim(over, balance)], side["authorizer"]), side["relay"]
    )
    assert _channel(settlement, over) == (balance, balance)


def test_non_canonical_voucher_signatures_are_refused(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    from payments.x402.eip712 import SECP256K1_N

    req = _req(chain, side)
    agent = _agent(chain)
    deposit = _open(chain, settlement, side, agent, req)
    sig = deposit.voucher.signature
    twin = (
        sig[:32]
        + (SECP256K1_N - int.from_bytes(sig[32:64], "big")).to_bytes(32, "big")
        + bytes([55 - sig[64]])
    )
    for bad in (twin, sig[:64] + bytes([sig[64] - 27])):
        claim = bs.VoucherClaim(deposit.config, PRICE, bad, PRICE)
        _reverts(
            "InvalidSignature()", _claim_call(chain, settlement, [claim], side["authorizer"]), side["relay"]
        )


def test_an_attacker_cannot_claim_with_another_receiver_authorizers_signature(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    req = _req(chain, side)
    victim = _agent(chain)
    deposit = _open(chain, settlement, side, victim, req)
    attacker = Account.create()
    relay = side["relay"]
    # Signing the victim channel's row with the attacker's key.
    row = _claim(deposit, PRICE)
    _reverts("InvalidSignature()", _claim_call(chain, settlement, [row], attacker), relay)
    # Hiding it behind a row of the attacker's own channel (where the attacker is authorizer).
    own_side = {"receiver": attacker.address, "authorizer": attacker, "relay": relay}
    own_req = _req(chain, own_side)
    own = _open(chain, settlement, own_side, _agent(chain), own_req)
    _reverts(
        "NotReceiverAuthorizer()", _claim_call(chain, settlement, [_claim(own, PRICE), row], attacker), relay
    )
    # Claiming directly, or refunding on its own signature.
    _reverts("NotAuthorizedToClaim()", settlement.functions.claim([row.abi()]), attacker.address)
    nonce = settlement.functions.refundNonce(deposit.voucher.channel_id).call()
    forged = _sign(attacker, bs.refund_digest(deposit.voucher.channel_id, nonce, 1, chain.chain_id))
    _reverts(
        "InvalidSignature()",
        settlement.functions.refundWithSignature(deposit.config.abi(), 1, nonce, forged),
        relay,
    )
    _reverts("NotAuthorizedToRefund()", settlement.functions.refund(deposit.config.abi(), 1), relay)
    assert _channel(settlement, deposit) == (deposit.deposit.amount, 0)
    # Our own authorizer's signature does claim it.
    _mine(settlement, _claim_call(chain, settlement, [row], side["authorizer"]), relay)
    assert _channel(settlement, deposit) == (deposit.deposit.amount, PRICE)


# ---------------------------------------------------------------------------- refunds and withdrawals


def test_cooperative_refund_returns_exactly_the_rest(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    req = _req(chain, side)
    agent = _agent(chain)
    payer = agent.account.address
    deposit = _open(chain, settlement, side, agent, req)
    channel_id, balance = deposit.voucher.channel_id, deposit.deposit.amount
    # Two requests charged 1,000 and 700; the refund voucher carries 1,700 (zero charge).
    refund = bs.parse_payload(agent.refund(req, charged=1_700), chain.chain_id)
    assert isinstance(refund, bs.RefundPayload)
    mirror = bs.ChannelMirror(balance, 0, 1_700, 2_000, b"")
    amount = bs.refund_amount(mirror, refund.amount)
    assert amount == balance - 1_700
    # As the SDK's facilitator does it: claim the outstanding charges and refund, atomically.
    nonce = settlement.functions.refundNonce(channel_id).call()
    claim_args = _claim_args(chain, [_claim(refund, 1_700)], side["authorizer"])
    refund_signature = _sign(side["authorizer"], bs.refund_digest(channel_id, nonce, amount, chain.chain_id))
    refund_args = [refund.config.abi(), amount, nonce, refund_signature]
    calls = [
        settlement.encode_abi("claimWithSignature", args=claim_args),
        settlement.encode_abi("refundWithSignature", args=refund_args),
    ]
    before = token_balance(chain, payer)
    receipt = _mine(settlement, settlement.functions.multicall(calls), side["relay"])
    assert token_balance(chain, payer) == before + amount
    assert _channel(settlement, refund) == (1_700, 1_700)
    assert settlement.functions.refundNonce(channel_id).call() == nonce + 1
    (refunded,) = _events(settlement, "Refunded", receipt)
    assert refunded["args"]["amount"] == amount
    # The signature is good once.
    _reverts("InvalidRefundNonce()", settlement.functions.refundWithSignature(*refund_args), side["relay"])
    # Nothing unclaimed is left: a refund by the receiver itself moves nothing but the nonce.
    receipt = _mine(settlement, settlement.functions.refund(refund.config.abi(), 1), side["receiver"])
    assert not _events(settlement, "Refunded", receipt)
    assert settlement.functions.refundNonce(channel_id).call() == nonce + 2
    assert token_balance(chain, payer) == before + amount


def test_timed_withdrawal_respects_the_delay(
    chain: DevChain, settlement: Any, side: dict[str, Any], time_travel: None
) -> None:
    req = _req(chain, side)
    agent = _agent(chain)
    payer = agent.account.address
    deposit = _open(chain, settlement, side, agent, req)
    config, channel_id, balance = deposit.config.abi(), deposit.voucher.channel_id, deposit.deposit.amount
    _reverts(
        "WithdrawAmountExceedsAvailable()", settlement.functions.initiateWithdraw(config, balance + 1), payer
    )
    _reverts("InvalidChannel()", settlement.functions.initiateWithdraw(config, balance), side["relay"])
    receipt = _mine(settlement, settlement.functions.initiateWithdraw(config, balance), payer)
    started = settlement.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    (initiated,) = _events(settlement, "WithdrawInitiated", receipt)
    assert initiated["args"]["finalizeAfter"] == started + WITHDRAW_DELAY
    assert _pair(settlement.functions.pendingWithdrawals(channel_id)) == (balance, started)
    _reverts("WithdrawalAlreadyPending()", settlement.functions.initiateWithdraw(config, 1), payer)
    _reverts("WithdrawDelayNotElapsed()", settlement.functions.finalizeWithdraw(config), payer)
    rpc(chain.rpc_url, "evm_increaseTime", [WITHDRAW_DELAY - 60])
    rpc(chain.rpc_url, "evm_mine", [])
    _reverts("WithdrawDelayNotElapsed()", settlement.functions.finalizeWithdraw(config), payer)
    # Within the delay, we claim what the payer owes us.
    voucher = _voucher(chain, agent, req, charged=PRICE, balance=balance)
    _mine(
        settlement,
        _claim_call(chain, settlement, [_claim(voucher, 2 * PRICE)], side["authorizer"]),
        side["relay"],
    )
    rpc(chain.rpc_url, "evm_increaseTime", [61])
    rpc(chain.rpc_url, "evm_mine", [])
    _reverts(
        "NotAuthorizedToFinalizeWithdraw()", settlement.functions.finalizeWithdraw(config), side["relay"]
    )
    before = token_balance(chain, payer)
    receipt = _mine(settlement, settlement.functions.finalizeWithdraw(config), payer)
    (finalized,) = _events(settlement, "WithdrawFinalized", receipt)
    assert finalized["args"]["amount"] == balance - 2 * PRICE  # capped to what was left unclaimed
    assert token_balance(chain, payer) == before + balance - 2 * PRICE
    assert _channel(settlement, voucher) == (2 * PRICE, 2 * PRICE)
    assert _pair(settlement.functions.pendingWithdrawals(channel_id)) == (0, 0)
    # What we claimed is still ours to settle.
    _mine(settlement, settlement.functions.settle(side["receiver"], chain.asset), side["relay"])
    assert token_balance(chain, side["receiver"]) == 2 * PRICE


# ---------------------------------------------------------------------------- the SDK client


def test_the_sdk_client_recovers_from_our_corrective_402_and_the_chain(
    chain: DevChain, settlement: Any, side: dict[str, Any]
) -> None:
    """A client that lost its channel record reads ``channels(channelId)`` from our contract; one
    told by our corrective 402 checks our ``voucherState`` and adopts our charged total."""
    req = _req(chain, side)
    key = fresh_payer(chain)["private_key"]
    first = Agent(key)
    deposit = _open(chain, settlement, side, first, req)
    _mine(
        settlement,
        _claim_call(chain, settlement, [_claim(deposit, PRICE)], side["authorizer"]),
        side["relay"],
    )
    signer = EthAccountSignerWithRPC(Account.from_key(key), chain.rpc_url)
    # Cold start: the baseline is the claimed total on chain.
    cold = Agent(key, signer=signer)
    payload = bs.parse_payload(cold.pay(req), chain.chain_id)
    assert isinstance(payload, bs.VoucherPayload) and payload.voucher.max_claimable == 2 * PRICE
    # We charged more than was claimed: our corrective 402 tells the client.
    mirror = bs.charge(bs.ChannelMirror(deposit.deposit.amount, PRICE, 0, 0, b""), deposit.voucher, PRICE)
    second = bs.parse_payload(
        first.voucher(req, charged=PRICE, balance=deposit.deposit.amount), chain.chain_id
    )
    mirror = bs.charge(mirror, second.voucher, 300)
    terms = bs.ChannelTerms(
        chain.chain_id,
        bytes.fromhex(chain.asset[2:]),
        bytes.fromhex(side["receiver"][2:]),
        bytes.fromhex(side["authorizer"].address[2:]),
        WITHDRAW_DELAY,
    )
    with pytest.raises(bs.ChannelRejected) as exc:
        bs.verify_payload(payload, terms, mirror, PRICE)
    assert exc.value.code is bs.ErrorCode.CUMULATIVE_AMOUNT_MISMATCH
    accept = req.model_dump(by_alias=True) | {
        "extra": mirror.corrective_extra(req.extra, payload.voucher.channel_id)
    }
    corrective = PaymentRequired(x402_version=2, error=exc.value.reason, accepts=[accept])
    assert cold.client.process_corrective_payment_required(corrective)
    retry = bs.parse_payload(cold.pay(req), chain.chain_id)
    assert retry.voucher.max_claimable == PRICE + 300 + PRICE
    assert bs.verify_payload(retry, terms, mirror, PRICE)
