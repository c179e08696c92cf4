import secrets

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from payments.x402.eip712 import (
    HALF_N,
    SECP256K1_N,
    Authorization,
    SignatureError,
    authorization_digest,
    domain_separator,
    recover,
)

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"


def _typed(auth: dict, chain_id: int = 84532, name: str = "USDC") -> dict:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": name, "version": "2", "chainId": chain_id, "verifyingContract": ASSET},
        "message": auth,
    }


def _random_case() -> tuple[Account, dict, Authorization]:
    account = Account.create()
    to = Account.create().address
    nonce = secrets.token_bytes(32)
    msg = {
        "from": account.address,
        "to": to,
        "value": 10000,
        "validAfter": 0,
        "validBefore": 1_900_000_000,
        "nonce": nonce,
    }
    auth = Authorization(
        bytes.fromhex(account.address[2:]), bytes.fromhex(to[2:]), 10000, 0, 1_900_000_000, nonce
    )
    return account, msg, auth


def test_digest_matches_eth_account_and_recovers_the_signer() -> None:
    account, msg, auth = _random_case()
    signable = encode_typed_data(full_message=_typed(msg))
    signed = account.sign_message(signable)
    separator = domain_separator("USDC", "2", 84532, bytes.fromhex(ASSET[2:]))
    digest = authorization_digest(separator, auth)
    assert digest == bytes(signed.message_hash)
    assert recover(digest, bytes(signed.signature)) == auth.from_


def test_other_domain_name_recovers_someone_else() -> None:
    account, msg, auth = _random_case()
    signed = account.sign_message(encode_typed_data(full_message=_typed(msg, name="USD Coin")))
    digest = authorization_digest(domain_separator("USDC", "2", 84532, bytes.fromhex(ASSET[2:])), auth)
    assert recover(digest, bytes(signed.signature)) != auth.from_


def test_high_s_twin_is_refused() -> None:
    account, msg, auth = _random_case()
    sig = bytes(account.sign_message(encode_typed_data(full_message=_typed(msg))).signature)
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    assert s <= HALF_N
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28
    with pytest.raises(SignatureError, match="lower half"):
        recover(b"\x00" * 32, twin)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 64, b"\x01" * 64 + b"\x1d", b"\x00" * 65])
def test_malformed_signatures_are_refused(bad: bytes) -> None:
    with pytest.raises(SignatureError):
        recover(b"\x00" * 32, bad)
