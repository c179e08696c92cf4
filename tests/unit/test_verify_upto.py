"""One test per check of the ``upto`` (Permit2) verifier, each asserting its reason code: the
pure checks (payments.x402.verify) and the chain's answers (payments.verification, with the
JSON-RPC batch scripted)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from eth_account import Account

from payments import verification
from payments.chain import node as chain
from payments.options import ConfiguredOption
from payments.x402 import verify as V
from payments.x402.codec import DecodeError
from payments.x402.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS
from payments.x402.types import SCHEME_UPTO, PaymentOption, Requirement, parse_payload
from tests.upto import sdk_upto_payload, sign_upto, upto_body

OPTION = PaymentOption(
    chain_id=84532,
    asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    asset_name="USDC",
    asset_version="2",
    pay_to="0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
    max_timeout_seconds=300,
)
FACILITATOR = Account.create().address
REQ = Requirement(OPTION, 90_000, scheme=SCHEME_UPTO, facilitators=(FACILITATOR,))
KEY = "0x" + Account.create().key.hex().removeprefix("0x")
OTHER = "0x" + "ab" * 20


def check(payload: dict[str, Any], now: int | None = None, **kw: Any) -> V.VerifiedPayment:
    return V.verify_payment(parse_payload(upto_body(REQ, payload)), [REQ], now or int(time.time()), **kw)


def rejected(payload: dict[str, Any], reason: str, **kw: Any) -> None:
    with pytest.raises(V.PaymentRejected) as info:
        check(payload, **kw)
    assert info.value.reason == reason


def test_the_sdk_clients_payment_verifies() -> None:
    verified = check(sdk_upto_payload(KEY, REQ))
    assert verified.requirement == REQ
    assert verified.payload.permit is not None and verified.payload.permit.maximum == 90_000
    assert verified.payload.authorization.value == 90_000  # the ledger's common view: the maximum


def test_the_challenge_carries_what_the_sdk_client_needs() -> None:
    wire = REQ.v2()
    assert wire["scheme"] == "upto" and wire["amount"] == "90000"
    assert wire["extra"]["facilitatorAddress"] == FACILITATOR
    assert wire["extra"]["assetTransferMethod"] == "permit2"


def test_another_spender_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, spender=OTHER), V.PERMIT2_INVALID_SPENDER)


def test_another_witness_destination_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, to=OTHER), V.PERMIT2_RECIPIENT_MISMATCH)


def test_another_facilitator_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, facilitator=OTHER), V.UPTO_FACILITATOR_MISMATCH)


def test_a_lapsing_deadline_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, deadline=int(time.time()) + 3), V.PERMIT2_DEADLINE_EXPIRED)


def test_a_deadline_too_far_ahead_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, deadline=int(time.time()) + 10 * 86400), V.PERMIT2_DEADLINE_TOO_FAR)


def test_a_deadline_must_cover_the_hold() -> None:
    held = Requirement(OPTION, 90_000, hold_seconds=600, scheme=SCHEME_UPTO, facilitators=(FACILITATOR,))
    payload = sign_upto(KEY, REQ)  # deadline now + 300: the run may take 600 s
    with pytest.raises(V.PaymentRejected) as info:
        V.verify_payment(parse_payload(upto_body(held, payload)), [held], int(time.time()))
    assert info.value.reason == V.PERMIT2_DEADLINE_EXPIRED


def test_valid_after_in_the_future_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, valid_after=int(time.time()) + 60), V.PERMIT2_NOT_YET_VALID)


def test_another_maximum_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, amount=90_001), V.PERMIT2_AMOUNT_MISMATCH)


def test_another_token_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, token=OTHER), V.PERMIT2_TOKEN_MISMATCH)


def test_a_signature_of_other_fields_is_refused() -> None:
    payload = sign_upto(KEY, REQ)
    payload["permit2Authorization"]["nonce"] = str(int(payload["permit2Authorization"]["nonce"]) ^ 1)
    rejected(payload, V.PERMIT2_INVALID_SIGNATURE)


def test_a_signature_for_another_chain_is_refused() -> None:
    rejected(sign_upto(KEY, REQ, chain_id=1), V.PERMIT2_INVALID_SIGNATURE)


def test_a_signature_by_someone_else_is_passed_on_as_a_contract_signature() -> None:
    payload = sign_upto(KEY, REQ, from_=OTHER)
    rejected(payload, V.PERMIT2_INVALID_SIGNATURE)
    assert check(payload, contract_signers=True).contract_signature


def test_accepted_must_be_the_offered_requirement() -> None:
    body = upto_body(REQ, sign_upto(KEY, REQ))
    body["accepted"]["amount"] = "1"
    with pytest.raises(V.PaymentRejected) as info:
        V.verify_payment(parse_payload(body), [REQ], int(time.time()))
    assert info.value.reason == V.PERMIT2_AMOUNT_MISMATCH


def test_upto_is_not_offered_means_unsupported() -> None:
    exact_only = Requirement(OPTION, 90_000)
    with pytest.raises(V.PaymentRejected) as info:
        V.verify_payment(parse_payload(upto_body(REQ, sign_upto(KEY, REQ))), [exact_only], int(time.time()))
    assert info.value.reason == V.NETWORK_MISMATCH


@pytest.mark.parametrize("path", [("nonce",), ("permitted", "amount"), ("witness", "to"), ("spender",)])
def test_malformed_fields_are_decode_errors(path: tuple[str, ...]) -> None:
    payload = sign_upto(KEY, REQ)
    target = payload["permit2Authorization"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "0xnot-a-number"
    with pytest.raises(DecodeError):
        parse_payload(upto_body(REQ, payload))


# The chain's answers: one batch of balanceOf, allowance(payer, Permit2), nonceBitmap, head.


def _scripted(monkeypatch: pytest.MonkeyPatch, balance: int, allowance: int, bitmap: int) -> list[Any]:
    seen: list[Any] = []

    def batch(url: str, calls: list[Any], timeout: Any = None, **kw: Any) -> list[Any]:
        seen.extend(calls)
        return [hex(balance), hex(allowance), hex(bitmap), "0x20"]

    monkeypatch.setattr(chain, "rpc_batch", batch)
    return seen


def _chain_check(balance: int, allowance: int, bitmap_of: Any, monkeypatch: pytest.MonkeyPatch) -> int | None:
    verified = check(sign_upto(KEY, REQ, nonce=(5 << 8) | 7))
    seen = _scripted(monkeypatch, balance, allowance, bitmap_of(7))
    conf = ConfiguredOption(option=OPTION, rpc_url="http://node")
    block = verification.ChainVerifier().check(conf, verified, None)  # type: ignore[arg-type]
    assert len(seen) == 4  # one round trip
    bitmap_call = seen[2][1][0]
    assert bitmap_call["to"] == PERMIT2_ADDRESS and bitmap_call["data"].endswith(hex(5)[2:].rjust(64, "0"))
    allowance_call = seen[1][1][0]
    assert allowance_call["data"].endswith(PERMIT2_ADDRESS[2:].lower().rjust(64, "0"))
    return block


def test_chain_check_passes_a_settleable_permit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _chain_check(90_000, 90_000, lambda bit: 1 << (bit + 1), monkeypatch) == 0x20


def test_a_used_nonce_bit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(V.PaymentRejected) as info:
        _chain_check(90_000, 90_000, lambda bit: 1 << bit, monkeypatch)
    assert info.value.reason == V.PERMIT2_NONCE_USED


def test_a_balance_below_the_maximum_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(V.PaymentRejected) as info:
        _chain_check(89_999, 90_000, lambda bit: 0, monkeypatch)
    assert info.value.reason == V.PERMIT2_INSUFFICIENT_BALANCE


def test_an_allowance_below_the_maximum_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(V.PaymentRejected) as info:
        _chain_check(90_000, 89_999, lambda bit: 0, monkeypatch)
    assert info.value.reason == V.PERMIT2_ALLOWANCE_REQUIRED


def test_no_permit2_on_the_chain_is_unavailable_not_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    verified = check(sign_upto(KEY, REQ))
    monkeypatch.setattr(chain, "rpc_batch", lambda url, calls, timeout=None, **kw: ["0x1", "0x1", "0x", "0x1"])
    with pytest.raises(verification.VerificationUnavailable):
        verification.ChainVerifier().check(ConfiguredOption(option=OPTION, rpc_url="http://node"), verified, None)  # type: ignore[arg-type]


def test_the_proxy_address_is_the_sdks() -> None:
    from x402.mechanisms.evm.constants import PERMIT2_ADDRESS as SDK_PERMIT2
    from x402.mechanisms.evm.constants import X402_UPTO_PERMIT2_PROXY_ADDRESS

    assert (PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS) == (SDK_PERMIT2, X402_UPTO_PERMIT2_PROXY_ADDRESS)


@pytest.mark.parametrize("non_canonical", ["v_0_1", "high_s"])
def test_a_non_canonical_signature_is_refused(non_canonical: str) -> None:
    """Issue 25: Permit2's ecrecover recovers nothing from v = 0/1 (the permit could never be
    settled, after a run already given), and we refuse a high s like the token: refused as
    ECDSA (an EOA's), so only an EIP-1271 wallet's approval on chain could still accept it."""
    from payments.x402.eip712 import SECP256K1_N

    payload = sign_upto(KEY, REQ)
    sig = bytes.fromhex(payload["signature"][2:])
    if non_canonical == "v_0_1":
        sig = sig[:64] + bytes([sig[64] - 27])
    else:
        s = int.from_bytes(sig[32:64], "big")
        sig = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    payload["signature"] = "0x" + sig.hex()
    rejected(payload, V.PERMIT2_INVALID_SIGNATURE)
    assert check(payload, contract_signers=True).contract_signature
