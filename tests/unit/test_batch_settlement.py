"""The pure batch-settlement module (payments/x402/batch_settlement.py) against payloads the
official x402 SDK's ``batch-settlement`` client produces for a channel on our test chain
(chain 31337, the canonical settlement contract): parsing, the channel id, the digests, and the
server's checks against its mirror of the channel."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.client.channel import update_channel_from_settle
from x402.mechanisms.evm.batch_settlement.constants import VOUCHER_TYPES
from x402.mechanisms.evm.batch_settlement.encoding import (
    build_erc3009_collector_data,
    build_erc3009_deposit_nonce,
)
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as SdkChannelConfig
from x402.mechanisms.evm.batch_settlement.types import VoucherClaim as SdkVoucherClaim
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id, get_batch_settlement_eip712_domain

from payments.x402 import batch_settlement as bs
from payments.x402.eip712 import SECP256K1_N, domain_separator, recover
from tests.batch_settlement import CHAIN_ID, NETWORK, WITHDRAW_DELAY, Agent, requirements

ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
AUTHORIZER = Account.from_key("0x" + "a1" * 32)
PRICE = 1_000


def _addr(text: str) -> bytes:
    return bytes.fromhex(text[2:])


TERMS = bs.ChannelTerms(CHAIN_ID, _addr(ASSET), _addr(PAY_TO), _addr(AUTHORIZER.address), WITHDRAW_DELAY)


@pytest.fixture
def agent() -> Agent:
    return Agent("0x" + "b2" * 32)


@pytest.fixture
def req() -> Any:
    return requirements(ASSET, PAY_TO, AUTHORIZER.address, PRICE)


def _rejected(code: bs.ErrorCode, fn: Any, *args: Any) -> None:
    with pytest.raises(bs.ChannelRejected) as exc:
        fn(*args)
    assert exc.value.code is code
    assert exc.value.reason == code.value


def _mirror(balance: int, charged: int, *, claimed: int = 0) -> bs.ChannelMirror:
    return bs.ChannelMirror(balance, claimed, charged, charged, b"")


# ---------------------------------------------------------------------------- ids and digests


def test_channel_id_is_the_sdks_and_the_eip712_hash_of_the_config(agent: Agent, req: Any) -> None:
    payload = bs.parse_payload(agent.pay(req), CHAIN_ID)
    config = payload.config
    sdk_config = SdkChannelConfig.from_dict(config.wire())
    assert bs.hex_of(config.channel_id(CHAIN_ID)) == compute_channel_id(sdk_config, NETWORK)
    typed = encode_typed_data(
        domain_data=get_batch_settlement_eip712_domain(CHAIN_ID),
        message_types={"ChannelConfig": bs_channel_config_types()},
        message_data=config.wire() | {"salt": config.salt},
    )
    from eth_hash.auto import keccak

    assert config.channel_id(CHAIN_ID) == keccak(b"\x19\x01" + typed.header + typed.body)
    # Bound to the chain and the contract.
    assert config.channel_id(8453) != config.channel_id(CHAIN_ID)
    assert config.channel_id(CHAIN_ID, "0x" + "11" * 20) != config.channel_id(CHAIN_ID)
    # The SDK client names the payer as its own voucher signer.
    assert config.payer == config.payer_authorizer == _addr(agent.account.address)
    assert (config.receiver, config.receiver_authorizer, config.token) == (
        TERMS.receiver,
        TERMS.receiver_authorizer,
        TERMS.token,
    )


def bs_channel_config_types() -> list[dict[str, str]]:
    from x402.mechanisms.evm.batch_settlement.constants import CHANNEL_CONFIG_TYPES

    return CHANNEL_CONFIG_TYPES["ChannelConfig"]


def test_voucher_refund_and_claim_batch_digests_are_what_the_sdk_signs(agent: Agent, req: Any) -> None:
    payload = bs.parse_payload(agent.voucher(req, charged=4_000, balance=10_000), CHAIN_ID)
    channel_id = payload.voucher.channel_id
    # The payer's voucher recovers to its authorizer through our digest.
    assert (
        recover(bs.voucher_digest(channel_id, 5_000, CHAIN_ID), payload.voucher.signature)
        == payload.config.payer
    )
    typed = encode_typed_data(
        domain_data=get_batch_settlement_eip712_domain(CHAIN_ID),
        message_types=VOUCHER_TYPES,
        message_data={"channelId": channel_id, "maxClaimableAmount": 5_000},
    )
    from eth_hash.auto import keccak

    assert bs.voucher_digest(channel_id, 5_000, CHAIN_ID) == keccak(b"\x19\x01" + typed.header + typed.body)
    # The receiver-authorizer signatures the SDK's server makes recover through our digests.
    signer = LocalAuthorizerSigner(AUTHORIZER)
    refund_sig = bytes.fromhex(sign_refund(signer, bs.hex_of(channel_id), 777, 3, NETWORK)[2:])
    assert recover(bs.refund_digest(channel_id, 3, 777, CHAIN_ID), refund_sig) == _addr(AUTHORIZER.address)
    other = bs.parse_payload(Agent("0x" + "c3" * 32).voucher(req, charged=0, balance=5_000), CHAIN_ID)
    claims = [
        bs.VoucherClaim(payload.config, 5_000, payload.voucher.signature, 4_500),
        bs.VoucherClaim(other.config, 1_000, other.voucher.signature, 1_000),
    ]
    sdk_claims = [
        SdkVoucherClaim(
            SdkChannelConfig.from_dict(c.config.wire()),
            str(c.max_claimable),
            bs.hex_of(c.signature),
            str(c.total_claimed),
        )
        for c in claims
    ]
    batch_sig = bytes.fromhex(sign_claim_batch(signer, sdk_claims, NETWORK)[2:])
    assert recover(bs.claim_batch_digest(claims, CHAIN_ID), batch_sig) == _addr(AUTHORIZER.address)
    assert bs.claim_batch_digest(claims[::-1], CHAIN_ID) != bs.claim_batch_digest(claims, CHAIN_ID)


# ---------------------------------------------------------------------------- parsing


def test_parses_the_sdk_deposit_payload(agent: Agent, req: Any) -> None:
    wire = agent.pay(req)
    payload = bs.parse_payload(wire, CHAIN_ID)
    assert isinstance(payload, bs.DepositPayload) and payload.type is bs.PayloadType.DEPOSIT
    assert payload.voucher.max_claimable == PRICE
    assert payload.deposit.amount == 5 * PRICE  # the SDK's default: five requests' worth
    auth = wire["deposit"]["authorization"]["erc3009Authorization"]
    channel_id = payload.voucher.channel_id
    # The collector's nonce and calldata are the SDK facilitator's.
    assert bs.hex_of(payload.deposit.nonce(channel_id)) == build_erc3009_deposit_nonce(
        bs.hex_of(channel_id), auth["salt"]
    )
    assert payload.deposit.collector_data() == build_erc3009_collector_data(
        auth["validAfter"], auth["validBefore"], auth["salt"], auth["signature"]
    )
    # The payer signed ReceiveWithAuthorization to the collector in the token's domain.
    token_domain = domain_separator("USD Coin", "2", CHAIN_ID, _addr(ASSET))
    digest = payload.deposit.authorization_digest(payload.config.payer, channel_id, token_domain)
    assert bs.recover_canonical(digest, payload.deposit.signature) == payload.config.payer


def test_parses_the_sdk_voucher_and_refund_payloads(agent: Agent, req: Any) -> None:
    voucher = bs.parse_payload(agent.voucher(req, charged=2_500, balance=10_000), CHAIN_ID)
    assert isinstance(voucher, bs.VoucherPayload)
    assert voucher.voucher.max_claimable == 3_500
    full = bs.parse_payload(agent.refund(req, charged=2_500), CHAIN_ID)
    assert isinstance(full, bs.RefundPayload) and full.amount is None and full.voucher.max_claimable == 2_500
    partial = bs.parse_payload(agent.refund(req, charged=2_500, amount=1_000), CHAIN_ID)
    assert isinstance(partial, bs.RefundPayload) and partial.amount == 1_000


def _set(wire: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(wire)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()
_E = bs.ErrorCode
_AUTH = "deposit.authorization.erc3009Authorization"


@pytest.mark.parametrize(
    ("path", "value", "code"),
    [
        ("type", "claim", _E.PAYLOAD_TYPE),
        ("type", None, _E.PAYLOAD_TYPE),
        ("extra", 1, _E.DEPOSIT_PAYLOAD),
        ("voucher", _DELETE, _E.DEPOSIT_PAYLOAD),
        ("voucher.nonce", "1", _E.DEPOSIT_PAYLOAD),
        ("voucher.maxClaimableAmount", str(2**128), _E.DEPOSIT_PAYLOAD),
        ("voucher.maxClaimableAmount", "-1", _E.DEPOSIT_PAYLOAD),
        ("voucher.maxClaimableAmount", "01000", _E.DEPOSIT_PAYLOAD),
        ("voucher.maxClaimableAmount", "1e3", _E.DEPOSIT_PAYLOAD),
        ("voucher.maxClaimableAmount", 1000.0, _E.DEPOSIT_PAYLOAD),
        ("voucher.maxClaimableAmount", True, _E.DEPOSIT_PAYLOAD),
        ("voucher.maxClaimableAmount", "9" * 5000, _E.DEPOSIT_PAYLOAD),
        ("voucher.signature", "0x" + "ab" * (bs.MAX_SIGNATURE_BYTES + 1), _E.DEPOSIT_PAYLOAD),
        ("voucher.signature", "0xabc", _E.DEPOSIT_PAYLOAD),
        ("voucher.channelId", "0x" + "00" * 31, _E.DEPOSIT_PAYLOAD),
        ("voucher.channelId", "0x" + "00" * 32, _E.CHANNEL_ID_MISMATCH),
        ("channelConfig.payer", "0x" + "12" * 19, _E.DEPOSIT_PAYLOAD),
        ("channelConfig.receiver", "0x" + "00" * 20, _E.DEPOSIT_PAYLOAD),
        ("channelConfig.receiver", "0x" + "34" * 20, _E.CHANNEL_ID_MISMATCH),
        ("channelConfig.salt", "0x" + "01" * 32, _E.CHANNEL_ID_MISMATCH),
        ("channelConfig.withdrawDelay", 899, _E.WITHDRAW_DELAY_OUT_OF_RANGE),
        ("channelConfig.withdrawDelay", 30 * 86400 + 1, _E.WITHDRAW_DELAY_OUT_OF_RANGE),
        ("channelConfig.withdrawDelay", 2**40, _E.DEPOSIT_PAYLOAD),
        ("channelConfig.withdrawDelay", True, _E.DEPOSIT_PAYLOAD),
        ("channelConfig.withdrawDelay", -900, _E.DEPOSIT_PAYLOAD),
        ("channelConfig.withdrawDelay", "900", None),
        ("voucher.maxClaimableAmount", 2**128, _E.DEPOSIT_PAYLOAD),
        ("channelConfig.extra", "x", _E.DEPOSIT_PAYLOAD),
        ("deposit.amount", "0", _E.DEPOSIT_PAYLOAD),
        ("deposit.amount", str(2**128), _E.DEPOSIT_PAYLOAD),
        ("deposit.authorization", {"permit2Authorization": {}}, _E.ERC3009_AUTHORIZATION_REQUIRED),
        (f"{_AUTH}.nonce", "0x" + "00" * 32, _E.DEPOSIT_PAYLOAD),
        (f"{_AUTH}.salt", "7", _E.DEPOSIT_PAYLOAD),
        (f"{_AUTH}.validBefore", str(2**256), _E.DEPOSIT_PAYLOAD),
    ],
)
def test_parsing_is_strict(agent: Agent, req: Any, path: str, value: Any, code: bs.ErrorCode | None) -> None:
    wire = agent.pay(req)
    assert bs.parse_payload(wire, CHAIN_ID)  # the untouched payload parses
    if code is None:  # a tolerated spelling
        assert bs.parse_payload(_set(wire, path, value), CHAIN_ID) == bs.parse_payload(wire, CHAIN_ID)
    else:
        _rejected(code, bs.parse_payload, _set(wire, path, value), CHAIN_ID)


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        ("0", _E.REFUND_AMOUNT_INVALID),
        ("-5", _E.REFUND_AMOUNT_INVALID),
        (str(2**128), _E.REFUND_AMOUNT_INVALID),
    ],
)
def test_refund_amount_must_be_a_positive_uint128(
    agent: Agent, req: Any, amount: str, code: bs.ErrorCode
) -> None:
    _rejected(code, bs.parse_payload, agent.refund(req, charged=0) | {"amount": amount}, CHAIN_ID)


def test_a_payload_is_bound_to_the_chain_and_contract(agent: Agent, req: Any) -> None:
    wire = agent.pay(req)
    _rejected(_E.CHANNEL_ID_MISMATCH, bs.parse_payload, wire, 8453)
    _rejected(_E.CHANNEL_ID_MISMATCH, bs.parse_payload, wire, CHAIN_ID, "0x" + "11" * 20)
    _rejected(_E.PAYLOAD_TYPE, bs.parse_payload, [wire], CHAIN_ID)


# ---------------------------------------------------------------------------- our checks


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"pay_to": "0x" + "34" * 20}, _E.RECEIVER_MISMATCH),
        (
            {"receiver_authorizer": Account.from_key("0x" + "d4" * 32).address},
            _E.RECEIVER_AUTHORIZER_MISMATCH,
        ),
        ({"asset": "0x" + "56" * 20}, _E.TOKEN_MISMATCH),
        ({"withdraw_delay": 3600}, _E.WITHDRAW_DELAY_MISMATCH),
    ],
)
def test_a_channel_that_is_not_ours_is_refused(
    agent: Agent, override: dict[str, Any], code: bs.ErrorCode
) -> None:
    fields = {"asset": ASSET, "pay_to": PAY_TO, "receiver_authorizer": AUTHORIZER.address} | override
    delay = fields.pop("withdraw_delay", WITHDRAW_DELAY)
    req = requirements(
        fields["asset"], fields["pay_to"], fields["receiver_authorizer"], PRICE, withdraw_delay=delay
    )
    payload = bs.parse_payload(agent.voucher(req, charged=0, balance=10_000), CHAIN_ID)
    _rejected(code, bs.verify_payload, payload, TERMS, _mirror(10_000, 0), PRICE)


def test_a_voucher_is_verified_against_the_mirror_and_charged_within_its_ceiling(
    agent: Agent, req: Any
) -> None:
    mirror = _mirror(10_000, 2_000)
    payload = bs.parse_payload(agent.voucher(req, charged=2_000, balance=10_000), CHAIN_ID)
    verified = bs.verify_payload(payload, TERMS, mirror, PRICE)
    assert verified.channel_id == payload.voucher.channel_id and not verified.contract_signature
    # A per-second model charges the measured cost, at most the ceiling.
    after = bs.charge(mirror, payload.voucher, 400)
    assert (after.charged_cumulative, after.signed_max_claimable, after.signature) == (
        2_400,
        3_000,
        payload.voucher.signature,
    )
    _rejected(_E.CHARGE_EXCEEDS_SIGNED_CUMULATIVE, bs.charge, mirror, payload.voucher, PRICE + 1)
    # A failed run charges nothing: the next voucher carries the same cumulative.
    unchanged = bs.charge(mirror, payload.voucher, 0)
    assert unchanged.charged_cumulative == 2_000
    assert bs.verify_payload(payload, TERMS, unchanged, PRICE)


def test_the_sdk_client_follows_our_payment_responses(agent: Agent, req: Any) -> None:
    """Our ``channelState`` and ``chargedAmount`` are what the SDK client adopts: its next voucher
    is exactly the one we expect, charge after charge (a per-second model charging less)."""
    deposit = bs.parse_payload(agent.pay(req), CHAIN_ID)
    mirror = bs.ChannelMirror.from_chain(0, 0)
    bs.verify_payload(deposit, TERMS, mirror, PRICE)
    mirror = replace(mirror, balance=deposit.deposit.amount)  # the deposit landed
    local: dict[str, Any] = {
        "channel_id": agent.channel_id(req),
        "request_amount": str(PRICE),
        "deposit_amount": str(deposit.deposit.amount),
    }
    payload = deposit
    for cost in (PRICE, 250, 0, 999):
        before = mirror.charged_cumulative
        mirror = bs.charge(mirror, payload.voucher, cost)
        state = mirror.channel_state(payload.voucher.channel_id)
        assert state["chargedCumulativeAmount"] == str(before + cost)
        update_channel_from_settle(
            agent.storage,
            {
                "server": {
                    "charged_amount": str(cost),
                    "charged_cumulative_amount": state["chargedCumulativeAmount"],
                },
                "local": local,
            },
        )
        local = {"channel_id": agent.channel_id(req), "request_amount": str(PRICE)}
        payload = bs.parse_payload(agent.pay(req), CHAIN_ID)
        assert isinstance(payload, bs.VoucherPayload)
        assert bs.verify_payload(payload, TERMS, mirror, PRICE)
    assert mirror.charged_cumulative == PRICE + 250 + 999


def test_replayed_or_lower_vouchers_get_a_corrective_402(agent: Agent, req: Any) -> None:
    mirror = _mirror(10_000, 2_000)
    payload = bs.parse_payload(agent.voucher(req, charged=2_000, balance=10_000), CHAIN_ID)
    mirror = bs.charge(mirror, payload.voucher, PRICE)
    # The same voucher again, and one below what we charged.
    _rejected(_E.CUMULATIVE_AMOUNT_MISMATCH, bs.verify_payload, payload, TERMS, mirror, PRICE)
    lower = bs.parse_payload(agent.voucher(req, charged=1_000, balance=10_000), CHAIN_ID)
    _rejected(_E.CUMULATIVE_AMOUNT_MISMATCH, bs.verify_payload, lower, TERMS, mirror, PRICE)
    extra = mirror.corrective_extra({"receiverAuthorizer": AUTHORIZER.address}, payload.voucher.channel_id)
    assert extra["channelState"]["chargedCumulativeAmount"] == "3000"
    assert extra["voucherState"] == {
        "signedMaxClaimable": "3000",
        "signature": bs.hex_of(payload.voucher.signature),
    }
    # What the SDK client checks before adopting our total: the voucher is its own.
    digest = bs.voucher_digest(payload.voucher.channel_id, 3_000, CHAIN_ID)
    assert recover(digest, bytes.fromhex(extra["voucherState"]["signature"][2:])) == _addr(
        agent.account.address
    )
    # With no voucher of the payer's (our record lost), no voucherState.
    assert "voucherState" not in bs.ChannelMirror.from_chain(10_000, 500).corrective_extra(
        {}, payload.voucher.channel_id
    )


def test_a_voucher_over_the_balance_or_below_the_claimed_total_is_refused(agent: Agent, req: Any) -> None:
    payload = bs.parse_payload(agent.voucher(req, charged=9_500, balance=20_000), CHAIN_ID)
    _rejected(_E.CUMULATIVE_EXCEEDS_BALANCE, bs.verify_payload, payload, TERMS, _mirror(10_000, 9_500), PRICE)
    _rejected(_E.CHANNEL_NOT_FOUND, bs.verify_payload, payload, TERMS, _mirror(0, 9_500), PRICE)
    _rejected(
        _E.CUMULATIVE_BELOW_CLAIMED,
        bs.verify_payload,
        payload,
        TERMS,
        _mirror(20_000, 9_500, claimed=10_500),
        PRICE,
    )
    # Charging can never pass the balance either.
    _rejected(_E.CUMULATIVE_EXCEEDS_BALANCE, bs.charge, _mirror(10_000, 9_500), payload.voucher, 600)


def test_forged_and_non_canonical_voucher_signatures_are_refused(agent: Agent, req: Any) -> None:
    mirror = _mirror(10_000, 0)
    wire = agent.voucher(req, charged=0, balance=10_000)
    payload = bs.parse_payload(wire, CHAIN_ID)
    digest = bs.voucher_digest(payload.voucher.channel_id, PRICE, CHAIN_ID)
    forger = Account.from_key("0x" + "e5" * 32)
    forged = forger.unsafe_sign_hash(digest).signature
    sig = payload.voucher.signature
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # the high-s twin, same signer
    assert recover_any(digest, twin) == payload.config.payer
    for bad in (forged, twin, sig[:64] + bytes([v - 27]), sig[:64], b"\x00" * 65):
        tampered = _set(wire, "voucher.signature", bs.hex_of(bad))
        _rejected(
            _E.VOUCHER_SIGNATURE,
            bs.verify_payload,
            bs.parse_payload(tampered, CHAIN_ID),
            TERMS,
            mirror,
            PRICE,
        )


def recover_any(digest: bytes, signature: bytes) -> bytes:
    """The signer, malleable or not (eth-account's view)."""
    from eth_keys import keys

    v = signature[64] - 27
    return (
        keys.Signature(signature[:64] + bytes([v]))
        .recover_public_key_from_msg_hash(digest)
        .to_canonical_address()
    )


def test_a_contract_wallet_voucher_is_left_to_the_chain(req: Any) -> None:
    agent = Agent("0x" + "f6" * 32, payer_authorizer="0x" + "00" * 20)
    payload = bs.parse_payload(agent.voucher(req, charged=0, balance=10_000), CHAIN_ID)
    assert payload.config.payer_authorizer == bs.ZERO_ADDRESS
    verified = bs.verify_payload(payload, TERMS, _mirror(10_000, 0), PRICE)
    assert verified.contract_signature


def test_refunds_are_zero_charge_and_return_the_unused_balance(agent: Agent, req: Any) -> None:
    mirror = _mirror(10_000, 3_200, claimed=1_000)
    full = bs.parse_payload(agent.refund(req, charged=3_200), CHAIN_ID)
    assert bs.verify_payload(full, TERMS, mirror, PRICE)
    assert bs.refund_amount(mirror, full.amount) == 6_800
    assert bs.refund_amount(mirror, 1_500) == 1_500
    _rejected(_E.REFUND_NO_BALANCE, bs.refund_amount, mirror, 6_801)
    _rejected(_E.REFUND_NO_BALANCE, bs.refund_amount, _mirror(3_200, 3_200), None)
    # A refund voucher carries our charged total, not one more request.
    charging = bs.parse_payload(agent.refund(req, charged=4_200), CHAIN_ID)
    _rejected(_E.CUMULATIVE_AMOUNT_MISMATCH, bs.verify_payload, charging, TERMS, mirror, PRICE)
    # A refund voucher may equal the claimed total (all charges claimed).
    assert bs.verify_payload(full, TERMS, _mirror(10_000, 3_200, claimed=3_200), PRICE)


def test_after_state_loss_the_baseline_is_the_claimed_total() -> None:
    mirror = bs.ChannelMirror.from_chain(10_000, 4_000, withdraw_requested_at=123, refund_nonce=2)
    assert (mirror.charged_cumulative, mirror.signed_max_claimable, mirror.signature) == (4_000, 4_000, b"")
    assert mirror.refundable() == 6_000
    assert mirror.channel_state(b"\x01" * 32) == {
        "channelId": "0x" + "01" * 32,
        "balance": "10000",
        "totalClaimed": "4000",
        "withdrawRequestedAt": 123,
        "refundNonce": "2",
        "chargedCumulativeAmount": "4000",
    }


def test_our_402_extra_is_what_the_sdk_client_builds_its_channel_from(agent: Agent) -> None:
    extra = TERMS.extra("USD Coin", "2", 10 * PRICE)
    req = requirements(
        ASSET,
        PAY_TO,
        extra.pop("receiverAuthorizer"),
        PRICE,
        **{k: v for k, v in extra.items() if k not in ("withdrawDelay", "name", "version")},
    )
    payload = bs.parse_payload(agent.pay(req), CHAIN_ID)
    assert isinstance(payload, bs.DepositPayload)
    assert payload.deposit.amount == 10 * PRICE  # the SDK deposits our announced minimum
    bs.verify_payload(payload, TERMS, bs.ChannelMirror.from_chain(0, 0), PRICE)
