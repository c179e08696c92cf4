"""EIP-712 hashing for the x402 ``upto`` scheme: a Permit2 ``PermitWitnessTransferFrom``.

The payer signs, in Permit2's domain ``{name: "Permit2", chainId, verifyingContract}`` (no
version), a transfer of at most ``permitted.amount`` of ``permitted.token`` by ``spender`` (the
x402 upto proxy), with an unordered ``nonce`` (a bit in Permit2's bitmap: word ``nonce >> 8``,
bit ``nonce & 255``), a ``deadline``, and a witness ``{to, facilitator, validAfter}`` that binds
the destination, the only address allowed to settle, and the earliest settlement time. The
struct's type string is Permit2's stub completed by the proxy's witness type string, which is
what both the SDK's typed-data signer and the contract hash.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_hash.auto import keccak

#: Canonical addresses (CREATE2, the same on every chain), as the x402 SDK uses them.
PERMIT2_ADDRESS = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY_ADDRESS = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"

PERMIT2_DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
TOKEN_PERMISSIONS_TYPE = b"TokenPermissions(address token,uint256 amount)"
TOKEN_PERMISSIONS_TYPEHASH = keccak(TOKEN_PERMISSIONS_TYPE)
UPTO_WITNESS_TYPE = b"Witness(address to,address facilitator,uint256 validAfter)"
UPTO_WITNESS_TYPEHASH = keccak(UPTO_WITNESS_TYPE)
#: What the proxy passes to Permit2 as ``witnessTypeString``.
UPTO_WITNESS_TYPE_STRING = b"Witness witness)" + TOKEN_PERMISSIONS_TYPE + UPTO_WITNESS_TYPE
UPTO_PERMIT_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    + UPTO_WITNESS_TYPE_STRING
)


@dataclass(frozen=True, slots=True)
class UptoPermit:
    """The signed Permit2 message of an ``upto`` payment; addresses as 20 bytes."""

    owner: bytes
    token: bytes
    maximum: int
    spender: bytes
    nonce: int
    deadline: int
    to: bytes
    facilitator: bytes
    valid_after: int

    @property
    def nonce_word(self) -> int:
        """Position of the nonce's word in Permit2's ``nonceBitmap(owner, word)``."""
        return self.nonce >> 8

    @property
    def nonce_bit(self) -> int:
        return 1 << (self.nonce & 255)


def _u256(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: bytes) -> bytes:
    return b"\x00" * 12 + address


def permit2_domain_separator(chain_id: int, permit2: bytes = bytes.fromhex(PERMIT2_ADDRESS[2:])) -> bytes:
    return keccak(PERMIT2_DOMAIN_TYPEHASH + keccak(b"Permit2") + _u256(chain_id) + _address_word(permit2))


def witness_hash(permit: UptoPermit) -> bytes:
    return keccak(
        UPTO_WITNESS_TYPEHASH
        + _address_word(permit.to)
        + _address_word(permit.facilitator)
        + _u256(permit.valid_after)
    )


def upto_digest(separator: bytes, permit: UptoPermit) -> bytes:
    """The EIP-712 digest the payer signs (and Permit2 recovers, with the proxy as spender)."""
    permissions = keccak(TOKEN_PERMISSIONS_TYPEHASH + _address_word(permit.token) + _u256(permit.maximum))
    struct_hash = keccak(
        UPTO_PERMIT_TYPEHASH
        + permissions
        + _address_word(permit.spender)
        + _u256(permit.nonce)
        + _u256(permit.deadline)
        + witness_hash(permit)
    )
    return keccak(b"\x19\x01" + separator + struct_hash)
