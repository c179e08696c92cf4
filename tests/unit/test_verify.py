"""One test per check of the exact EVM verifier, each asserting its reason code."""

import time

import pytest
from eth_account import Account

from payments.x402 import verify as V
from payments.x402.codec import DecodeError, decode_header
from payments.x402.exact import verify_exact
from payments.x402.types import PaymentOption, Requirement, parse_payload
from tests.payers import sign_authorization, v1_payload, v2_payload

OPTION = PaymentOption(
    chain_id=84532,
    asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    asset_name="USDC",
    asset_version="2",
    pay_to="0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
    max_timeout_seconds=300,
)
REQ = Requirement(OPTION, 10_000)
KEY = Account.create().key.hex()


def check(obj: dict, now: int | None = None, reqs: list[Requirement] | None = None) -> V.VerifiedPayment:
    return verify_exact(parse_payload(obj), reqs or [REQ], now or int(time.time()))


def rejected(obj: dict, reason: str, **kw) -> None:
    with pytest.raises(V.PaymentRejected) as info:
        check(obj, **kw)
    assert info.value.reason == reason


def test_valid_v2_and_v1_payments_verify() -> None:
    for build in (v2_payload, v1_payload):
        verified = check(build(REQ, sign_authorization(KEY, REQ)))
        assert verified.requirement == REQ
        assert "0x" + verified.payer.hex() == Account.from_key(KEY).address.lower()


def test_unsupported_scheme() -> None:
    obj = v2_payload(REQ, sign_authorization(KEY, REQ))
    obj["accepted"]["scheme"] = "batch-settlement"  # a scheme we do not offer
    rejected(obj, V.UNSUPPORTED_SCHEME)


def test_network_mismatch_v2_and_v1_names() -> None:
    obj = v2_payload(REQ, sign_authorization(KEY, REQ))
    obj["accepted"]["network"] = "eip155:8453"
    rejected(obj, V.NETWORK_MISMATCH)
    obj = v1_payload(REQ, sign_authorization(KEY, REQ))
    obj["network"] = "eip155:84532"  # v1 uses names, not CAIP-2
    rejected(obj, V.NETWORK_MISMATCH)


def test_accepted_must_echo_our_requirement() -> None:
    for key, value, reason in [
        ("asset", "0x" + "11" * 20, V.ASSET_MISMATCH),
        ("payTo", "0x" + "22" * 20, V.RECIPIENT_MISMATCH),
        ("amount", "9999", V.VALUE_MISMATCH),
        ("extra", {"name": "USD Coin", "version": "2"}, V.TOKEN_NAME_MISMATCH),
        ("extra", {"name": "USDC", "version": "1"}, V.TOKEN_VERSION_MISMATCH),
    ]:
        obj = v2_payload(REQ, sign_authorization(KEY, REQ))
        obj["accepted"][key] = value
        rejected(obj, reason)


def test_recipient_mismatch() -> None:
    rejected(v2_payload(REQ, sign_authorization(KEY, REQ, to="0x" + "33" * 20)), V.RECIPIENT_MISMATCH)


@pytest.mark.parametrize("value", [9_999, 10_001, 0, 10_000 * 10**12])
def test_value_must_equal_the_price_exactly(value: int) -> None:
    rejected(v2_payload(REQ, sign_authorization(KEY, REQ, value=value)), V.VALUE_MISMATCH)


def test_valid_before_must_leave_the_settle_margin() -> None:
    now = int(time.time())
    rejected(v2_payload(REQ, sign_authorization(KEY, REQ, valid_before=now + 5)), V.VALID_BEFORE, now=now)
    check(v2_payload(REQ, sign_authorization(KEY, REQ, valid_before=now + 6)), now=now)


def test_valid_after_in_the_future() -> None:
    """As the reference facilitator: a payment that could not be settled yet is refused now, not
    accepted and then failed at simulation."""
    now = int(time.time())
    rejected(v2_payload(REQ, sign_authorization(KEY, REQ, valid_after=now + 1)), V.VALID_AFTER, now=now)
    check(v2_payload(REQ, sign_authorization(KEY, REQ, valid_after=now)), now=now)


def test_a_held_payment_must_stay_valid_through_the_run() -> None:
    """A payment settled after the run (after_success) must outlive the run's time limit: the
    challenge's maxTimeoutSeconds grows to allow it, and a shorter validBefore is refused."""
    now = int(time.time())
    held = Requirement(OPTION, 10_000, hold_seconds=600)
    assert held.v2()["maxTimeoutSeconds"] == held.max_timeout_seconds >= 600 + 6
    rejected(
        v2_payload(held, sign_authorization(KEY, held, valid_before=now + 300)), V.VALID_BEFORE, now=now, reqs=[held]
    )
    check(v2_payload(held, sign_authorization(KEY, held, valid_before=now + 700)), now=now, reqs=[held])


def test_window_longer_than_offered() -> None:
    now = int(time.time())
    too_long = now + OPTION.max_timeout_seconds + 31
    rejected(
        v2_payload(REQ, sign_authorization(KEY, REQ, valid_before=too_long)), V.VALIDITY_TOO_LONG, now=now
    )


def test_signature_by_someone_else_or_other_domain() -> None:
    payload = sign_authorization(KEY, REQ)
    payload["authorization"]["from"] = Account.create().address
    rejected(v2_payload(REQ, payload), V.INVALID_SIGNATURE)
    for domain in (
        {"name": "USD Coin"},
        {"version": "1"},
        {"chainId": 8453},
        {"verifyingContract": "0x" + "44" * 20},
    ):
        rejected(v2_payload(REQ, sign_authorization(KEY, REQ, domain=domain)), V.INVALID_SIGNATURE)


def test_high_s_signature_is_refused() -> None:
    from payments.x402.eip712 import SECP256K1_N

    payload = sign_authorization(KEY, REQ)
    sig = bytes.fromhex(payload["signature"][2:])
    s = int.from_bytes(sig[32:64], "big")
    payload["signature"] = (
        "0x" + (sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])).hex()
    )
    rejected(v2_payload(REQ, payload), V.INVALID_SIGNATURE)


def test_second_option_on_same_network_is_found() -> None:
    other = Requirement(
        PaymentOption(**{**{f: getattr(OPTION, f) for f in OPTION.__slots__}, "asset": "0x" + "55" * 20}),
        10_000,
    )
    check(v2_payload(REQ, sign_authorization(KEY, REQ)), reqs=[other, REQ])


def test_v1_payment_on_several_options_picks_the_domain_it_was_signed_for() -> None:
    """A v1 payload names no asset. With contract wallets allowed, the first option with the
    right amount used to be taken as a contract signature for the wrong token."""
    other = Requirement(
        PaymentOption(**{**{f: getattr(OPTION, f) for f in OPTION.__slots__}, "asset": "0x" + "55" * 20}),
        10_000,
    )
    payload = parse_payload(v1_payload(REQ, sign_authorization(KEY, REQ)))
    verified = verify_exact(payload, [other, REQ], int(time.time()), contract_signers=True)
    assert verified.requirement == REQ and not verified.contract_signature
    # A signature neither domain recovers could be a contract wallet's for either: refused.
    stranger = sign_authorization(KEY, REQ, domain={"name": "Other"})
    with pytest.raises(V.PaymentRejected) as info:
        verify_exact(parse_payload(v1_payload(REQ, stranger)), [other, REQ], int(time.time()), contract_signers=True)
    assert info.value.reason == V.INVALID_SIGNATURE


def test_an_unparsable_resource_url_is_a_decode_error() -> None:
    obj = v2_payload(REQ, sign_authorization(KEY, REQ), resource_url="http://[::1")
    with pytest.raises(DecodeError):
        parse_payload(obj)
    obj["resource"] = "not an object"
    with pytest.raises(DecodeError):
        parse_payload(obj)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(x402Version=3),
        lambda o: o.update(x402Version=True),
        lambda o: o.pop("accepted"),
        lambda o: o["payload"].pop("authorization"),
        lambda o: o["payload"]["authorization"].update(value=1e4),
        lambda o: o["payload"]["authorization"].update(value="1e4"),
        lambda o: o["payload"]["authorization"].update(value="-1"),
        lambda o: o["payload"]["authorization"].update(value=str(2**256)),
        lambda o: o["payload"]["authorization"].update(validBefore=True),
        lambda o: o["payload"]["authorization"].update(nonce="0x1234"),
        lambda o: o["payload"]["authorization"].update(to="0xZZ" + "0" * 38),
        lambda o: o["payload"].update(signature="zz"),
        lambda o: o["payload"].update(signature=12),
    ],
)
def test_malformed_payloads_are_decode_errors(mutate) -> None:
    obj = v2_payload(REQ, sign_authorization(KEY, REQ))
    mutate(obj)
    with pytest.raises(DecodeError):
        parse_payload(obj)


def test_integers_as_json_numbers_are_tolerated() -> None:
    obj = v2_payload(REQ, sign_authorization(KEY, REQ))
    auth = obj["payload"]["authorization"]
    auth["value"], auth["validAfter"], auth["validBefore"] = 10000, 0, int(auth["validBefore"])
    check(obj)


def test_decode_header_then_parse() -> None:
    from payments.x402.codec import encode_header

    obj = v2_payload(REQ, sign_authorization(KEY, REQ))
    assert parse_payload(decode_header(encode_header(obj))).authorization.value == 10_000


def test_a_signature_with_v_0_or_1_is_refused() -> None:
    """Issue 25: the chain takes v only as 27/28; we settle the bytes we verified, so v = 0/1
    (which recovers here after normalising) is refused rather than accepted and rewritten."""
    payload = sign_authorization(KEY, REQ)
    sig = bytes.fromhex(payload["signature"][2:])
    payload["signature"] = "0x" + (sig[:64] + bytes([sig[64] - 27])).hex()
    rejected(v2_payload(REQ, payload), V.INVALID_SIGNATURE)
