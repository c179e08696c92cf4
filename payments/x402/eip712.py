"""EIP-712 hashing and signer recovery for EIP-3009 ``TransferWithAuthorization``.

Written against the EIP rather than through eth-account's generic typed-data encoder: this one
struct is all we need, and the hand-rolled path (keccak + coincurve) is several times faster on
the paid-request hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from coincurve import PublicKey
from eth_hash.auto import keccak

#: secp256k1 group order and its half: signatures with s above HALF_N are malleable twins.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2

DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


class SignatureError(ValueError):
    """A signature that cannot be a valid, canonical EOA signature."""


@dataclass(frozen=True, slots=True)
class Authorization:
    """The signed EIP-3009 message; addresses as 20 bytes, the nonce as 32 bytes."""

    from_: bytes
    to: bytes
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes


def _u256(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: bytes) -> bytes:
    return b"\x00" * 12 + address


def domain_separator(name: str, version: str, chain_id: int, verifying_contract: bytes) -> bytes:
    return keccak(
        DOMAIN_TYPEHASH
        + keccak(name.encode("utf-8"))
        + keccak(version.encode("utf-8"))
        + _u256(chain_id)
        + _address_word(verifying_contract)
    )


def authorization_digest(separator: bytes, auth: Authorization) -> bytes:
    struct_hash = keccak(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH
        + _address_word(auth.from_)
        + _address_word(auth.to)
        + _u256(auth.value)
        + _u256(auth.valid_after)
        + _u256(auth.valid_before)
        + auth.nonce
    )
    return keccak(b"\x19\x01" + separator + struct_hash)


def split_signature(signature: bytes) -> tuple[int, int, int]:
    """(v, r, s) of a 65-byte ``r || s || v`` signature, refusing what the chain would refuse.

    The bytes are settled as they are: the token's ``ECRecover`` and Permit2's ``ecrecover``
    both take v only as 27 or 28 (v = 0/1 recovers nothing there), and the token refuses a high
    s. So a signature is accepted only in that canonical form (issue 25: what we accept we can
    settle)."""
    if len(signature) != 65:
        raise SignatureError("signature must be 65 bytes")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if v not in (27, 28):
        raise SignatureError("signature v must be 27 or 28 (v = 0/1 cannot be settled on chain)")
    if not 0 < r < SECP256K1_N or not 0 < s <= HALF_N:
        raise SignatureError("signature s is not in the lower half order (malleable)")
    return v, r, s


def recover(digest: bytes, signature: bytes) -> bytes:
    """The 20-byte address that signed ``digest``; SignatureError if none can."""
    v, r, s = split_signature(signature)
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v - 27])
    try:
        public = PublicKey.from_signature_and_message(compact, digest, hasher=None)
    except Exception as exc:  # coincurve raises plain Exception for unrecoverable input
        raise SignatureError("signature does not recover to a public key") from exc
    return keccak(public.format(compressed=False)[1:])[-20:]
