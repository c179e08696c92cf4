"""The x402 ``batch-settlement`` scheme on EVM (payment channels with cumulative vouchers): wire
types, strict parsing, EIP-712 hashing, and the server's checks against its mirror of a channel.

A payer deposits once into a channel of the settlement contract (a ``deposit`` payload carries an
EIP-3009 ``ReceiveWithAuthorization`` for the deposit collector and the first voucher); every
paid request then carries a ``voucher``: an EIP-712 ``Voucher(channelId, maxClaimableAmount)``
whose ceiling is what we have charged so far plus this request's price. A ``refund`` payload
asks for the unused balance back with a zero-charge voucher. The channel id is the EIP-712 hash
of the immutable ``ChannelConfig`` under the domain "x402 Batch Settlement" / "1" of the
settlement contract on its chain. See docs/channels.md (where the scheme stands) and the
x402 spec ``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md``.

Pure: no Django, no network. Signatures are accepted only in canonical form (65 bytes, low s,
v 27 or 28), the only form the contract accepts from an EOA; a channel whose voucher signer is
a contract wallet (``payerAuthorizer`` zero, EIP-1271) can only be checked on chain, which
``VerifiedVoucher.contract_signature`` tells the caller.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from typing import Any

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from .eip712 import SignatureError, domain_separator, recover
from .verify import PaymentRejected

SCHEME_BATCH_SETTLEMENT = "batch-settlement"
#: Canonical addresses (CREATE2, the same on every chain), as the x402 SDK uses them.
BATCH_SETTLEMENT_ADDRESS = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_DEPOSIT_COLLECTOR_ADDRESS = "0x4020806089470a89826cB9fB1f4059150b550004"
#: ``extra.assetTransferMethod`` of the deposits we take (the SDK's default).
EIP3009_TRANSFER_METHOD = "eip3009"
DOMAIN_NAME = "x402 Batch Settlement"
DOMAIN_VERSION = "1"
#: Bounds the contract enforces on ``withdrawDelay`` (seconds): 15 minutes to 30 days.
MIN_WITHDRAW_DELAY = 15 * 60
MAX_WITHDRAW_DELAY = 30 * 24 * 3600
UINT40_MAX = 2**40 - 1
UINT128_MAX = 2**128 - 1
UINT256_MAX = 2**256 - 1
#: Longest signature accepted on the wire (an EIP-1271 wallet's may exceed 65 bytes).
MAX_SIGNATURE_BYTES = 4096

ZERO_ADDRESS = bytes(20)
CHANNEL_CONFIG_TYPEHASH = keccak(
    b"ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
    b"address token,uint40 withdrawDelay,bytes32 salt)"
)
VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 maxClaimableAmount)")
REFUND_TYPEHASH = keccak(b"Refund(bytes32 channelId,uint256 nonce,uint128 amount)")
_CLAIM_ENTRY_TYPE = b"ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
CLAIM_ENTRY_TYPEHASH = keccak(_CLAIM_ENTRY_TYPE)
CLAIM_BATCH_TYPEHASH = keccak(b"ClaimBatch(ClaimEntry[] claims)" + _CLAIM_ENTRY_TYPE)
RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_BYTES32 = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX = re.compile(r"0x(?:[0-9a-fA-F]{2})+")
_UINT = re.compile(r"0|[1-9][0-9]{0,77}")


class PayloadType(StrEnum):
    """``payload.type`` of what a payer sends."""

    DEPOSIT = "deposit"
    VOUCHER = "voucher"
    REFUND = "refund"


class ErrorCode(StrEnum):
    """The scheme's reason codes, spelled as the spec and the SDKs spell them."""

    SCHEME = "invalid_batch_settlement_evm_scheme"
    NETWORK_MISMATCH = "invalid_batch_settlement_evm_network_mismatch"
    MISSING_EIP712_DOMAIN = "invalid_batch_settlement_evm_missing_eip712_domain"
    PAYLOAD_TYPE = "invalid_batch_settlement_evm_payload_type"
    DEPOSIT_PAYLOAD = "invalid_batch_settlement_evm_deposit_payload"
    VOUCHER_PAYLOAD = "invalid_batch_settlement_evm_voucher_payload"
    REFUND_PAYLOAD = "invalid_batch_settlement_evm_refund_payload"
    CHANNEL_ID_MISMATCH = "invalid_batch_settlement_evm_channel_id_mismatch"
    CHANNEL_NOT_FOUND = "invalid_batch_settlement_evm_channel_not_found"
    CHANNEL_BUSY = "invalid_batch_settlement_evm_channel_busy"
    CHANNEL_STATE_READ_FAILED = "invalid_batch_settlement_evm_channel_state_read_failed"
    MISSING_CHANNEL = "invalid_batch_settlement_evm_missing_channel"
    RECEIVER_MISMATCH = "invalid_batch_settlement_evm_receiver_mismatch"
    RECEIVER_AUTHORIZER_MISMATCH = "invalid_batch_settlement_evm_receiver_authorizer_mismatch"
    TOKEN_MISMATCH = "invalid_batch_settlement_evm_token_mismatch"
    WITHDRAW_DELAY_MISMATCH = "invalid_batch_settlement_evm_withdraw_delay_mismatch"
    WITHDRAW_DELAY_OUT_OF_RANGE = "invalid_batch_settlement_evm_withdraw_delay_out_of_range"
    VOUCHER_SIGNATURE = "invalid_batch_settlement_evm_voucher_signature"
    CUMULATIVE_AMOUNT_MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
    CUMULATIVE_BELOW_CLAIMED = "invalid_batch_settlement_evm_cumulative_below_claimed"
    CUMULATIVE_EXCEEDS_BALANCE = "invalid_batch_settlement_evm_cumulative_exceeds_balance"
    CHARGE_EXCEEDS_SIGNED_CUMULATIVE = "invalid_batch_settlement_evm_charge_exceeds_signed_cumulative"
    ERC3009_AUTHORIZATION_REQUIRED = "invalid_batch_settlement_evm_erc3009_authorization_required"
    RECEIVE_AUTHORIZATION_SIGNATURE = "invalid_batch_settlement_evm_receive_authorization_signature"
    VALID_AFTER = "invalid_batch_settlement_evm_payload_authorization_valid_after"
    VALID_BEFORE = "invalid_batch_settlement_evm_payload_authorization_valid_before"
    INSUFFICIENT_BALANCE = "invalid_batch_settlement_evm_insufficient_balance"
    DEPOSIT_SIMULATION_FAILED = "invalid_batch_settlement_evm_deposit_simulation_failed"
    DEPOSIT_TRANSACTION_FAILED = "invalid_batch_settlement_evm_deposit_transaction_failed"
    CLAIM_PAYLOAD = "invalid_batch_settlement_evm_claim_payload"
    CLAIM_SIMULATION_FAILED = "invalid_batch_settlement_evm_claim_simulation_failed"
    CLAIM_TRANSACTION_FAILED = "invalid_batch_settlement_evm_claim_transaction_failed"
    SETTLE_SIMULATION_FAILED = "invalid_batch_settlement_evm_settle_simulation_failed"
    SETTLE_TRANSACTION_FAILED = "invalid_batch_settlement_evm_settle_transaction_failed"
    NOTHING_TO_SETTLE = "invalid_batch_settlement_evm_nothing_to_settle"
    REFUND_AMOUNT_INVALID = "invalid_batch_settlement_evm_refund_amount_invalid"
    REFUND_NO_BALANCE = "invalid_batch_settlement_evm_refund_no_balance"
    REFUND_SIMULATION_FAILED = "invalid_batch_settlement_evm_refund_simulation_failed"
    REFUND_TRANSACTION_FAILED = "invalid_batch_settlement_evm_refund_transaction_failed"
    RPC_READ_FAILED = "invalid_batch_settlement_evm_rpc_read_failed"
    TRANSACTION_REVERTED = "invalid_batch_settlement_evm_transaction_reverted"


class ChannelRejected(PaymentRejected):
    """A batch-settlement payment we must refuse; ``code`` is its reason code."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(code.value, message)
        self.code = code


def hex_of(value: bytes) -> str:
    return "0x" + value.hex()


def checksum(address: bytes) -> str:
    return to_checksum_address(hex_of(address))


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: bytes) -> bytes:
    return b"\x00" * 12 + address


# ---------------------------------------------------------------------------- EIP-712


@lru_cache(maxsize=16)
def settlement_domain(chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS) -> bytes:
    """The settlement contract's EIP-712 domain separator on ``chain_id``."""
    return domain_separator(DOMAIN_NAME, DOMAIN_VERSION, chain_id, bytes.fromhex(contract[2:]))


def _typed_digest(chain_id: int, contract: str, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + settlement_domain(chain_id, contract) + struct_hash)


def voucher_digest(
    channel_id: bytes, max_claimable: int, chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS
) -> bytes:
    return _typed_digest(chain_id, contract, keccak(VOUCHER_TYPEHASH + channel_id + _word(max_claimable)))


def refund_digest(
    channel_id: bytes, nonce: int, amount: int, chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS
) -> bytes:
    """What the receiverAuthorizer signs for ``refundWithSignature`` (``nonce``: the channel's
    current ``refundNonce``)."""
    return _typed_digest(
        chain_id, contract, keccak(REFUND_TYPEHASH + channel_id + _word(nonce) + _word(amount))
    )


def recover_canonical(digest: bytes, signature: bytes) -> bytes:
    """The EOA that signed ``digest``, accepting only what the contract accepts: 65 bytes, low s,
    v 27 or 28 (SignatureError otherwise)."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise SignatureError("signature must be 65 bytes with v 27 or 28")
    return recover(digest, signature)


# ---------------------------------------------------------------------------- wire types


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """The immutable channel parameters; addresses as 20 bytes, ``salt`` as 32."""

    payer: bytes
    payer_authorizer: bytes
    receiver: bytes
    receiver_authorizer: bytes
    token: bytes
    withdraw_delay: int
    salt: bytes

    def struct_hash(self) -> bytes:
        return keccak(
            CHANNEL_CONFIG_TYPEHASH
            + _address_word(self.payer)
            + _address_word(self.payer_authorizer)
            + _address_word(self.receiver)
            + _address_word(self.receiver_authorizer)
            + _address_word(self.token)
            + _word(self.withdraw_delay)
            + self.salt
        )

    def channel_id(self, chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS) -> bytes:
        return _typed_digest(chain_id, contract, self.struct_hash())

    @property
    def contract_signer(self) -> bool:
        """Vouchers are the payer contract's (EIP-1271), not an authorizer key's."""
        return self.payer_authorizer == ZERO_ADDRESS

    def abi(self) -> tuple[str, str, str, str, str, int, bytes]:
        """The ``ChannelConfig`` tuple for a contract call (web3)."""
        return (
            checksum(self.payer),
            checksum(self.payer_authorizer),
            checksum(self.receiver),
            checksum(self.receiver_authorizer),
            checksum(self.token),
            self.withdraw_delay,
            self.salt,
        )

    def wire(self) -> dict[str, Any]:
        return {
            "payer": checksum(self.payer),
            "payerAuthorizer": checksum(self.payer_authorizer),
            "receiver": checksum(self.receiver),
            "receiverAuthorizer": checksum(self.receiver_authorizer),
            "token": checksum(self.token),
            "withdrawDelay": self.withdraw_delay,
            "salt": hex_of(self.salt),
        }


@dataclass(frozen=True, slots=True)
class Voucher:
    channel_id: bytes
    max_claimable: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class Erc3009Deposit:
    """The deposit part of a ``deposit`` payload: ``amount`` pulled from the payer by the EIP-3009
    collector under the payer's ``ReceiveWithAuthorization`` (``to``: the collector; nonce:
    ``keccak256(abi.encode(channelId, salt))``)."""

    amount: int
    valid_after: int
    valid_before: int
    salt: int
    signature: bytes

    def nonce(self, channel_id: bytes) -> bytes:
        return keccak(channel_id + _word(self.salt))

    def authorization_digest(self, payer: bytes, channel_id: bytes, token_domain: bytes) -> bytes:
        """The digest the payer signed; ``token_domain`` is the token's EIP-712 domain
        separator (``eip712.domain_separator(name, version, chain_id, token)``)."""
        struct_hash = keccak(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH
            + _address_word(payer)
            + _address_word(bytes.fromhex(ERC3009_DEPOSIT_COLLECTOR_ADDRESS[2:]))
            + _word(self.amount)
            + _word(self.valid_after)
            + _word(self.valid_before)
            + self.nonce(channel_id)
        )
        return keccak(b"\x19\x01" + token_domain + struct_hash)

    def collector_data(self) -> bytes:
        """``collectorData`` for ``deposit(config, amount, collector, collectorData)``."""
        return abi_encode(
            ["uint256", "uint256", "uint256", "bytes"],
            [self.valid_after, self.valid_before, self.salt, self.signature],
        )


@dataclass(frozen=True, slots=True)
class DepositPayload:
    config: ChannelConfig
    voucher: Voucher
    deposit: Erc3009Deposit

    type = PayloadType.DEPOSIT


@dataclass(frozen=True, slots=True)
class VoucherPayload:
    config: ChannelConfig
    voucher: Voucher

    type = PayloadType.VOUCHER


@dataclass(frozen=True, slots=True)
class RefundPayload:
    config: ChannelConfig
    voucher: Voucher
    #: The refund asked for; None: all of the unused balance.
    amount: int | None

    type = PayloadType.REFUND


ChannelPayload = DepositPayload | VoucherPayload | RefundPayload


@dataclass(frozen=True, slots=True)
class VoucherClaim:
    """One row of a ``claim``/``claimWithSignature`` batch: raise the channel's claimed total to
    ``total_claimed`` (at most the voucher's ``max_claimable``) on the payer's voucher."""

    config: ChannelConfig
    max_claimable: int
    signature: bytes
    total_claimed: int

    def abi(self) -> tuple[tuple[tuple[str, str, str, str, str, int, bytes], int], bytes, int]:
        return ((self.config.abi(), self.max_claimable), self.signature, self.total_claimed)

    def entry_hash(self, chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS) -> bytes:
        return keccak(
            CLAIM_ENTRY_TYPEHASH
            + self.config.channel_id(chain_id, contract)
            + _word(self.max_claimable)
            + _word(self.total_claimed)
        )


def claim_batch_digest(
    claims: Sequence[VoucherClaim], chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS
) -> bytes:
    """What the receiverAuthorizer signs for ``claimWithSignature(claims, signature)``."""
    entries = b"".join(c.entry_hash(chain_id, contract) for c in claims)
    return _typed_digest(chain_id, contract, keccak(CLAIM_BATCH_TYPEHASH + keccak(entries)))


# ---------------------------------------------------------------------------- parsing

_KEYS = {
    PayloadType.DEPOSIT: ({"type", "channelConfig", "voucher", "deposit"}, set()),
    PayloadType.VOUCHER: ({"type", "channelConfig", "voucher"}, set()),
    PayloadType.REFUND: ({"type", "channelConfig", "voucher"}, {"amount"}),
}
_MALFORMED = {
    PayloadType.DEPOSIT: ErrorCode.DEPOSIT_PAYLOAD,
    PayloadType.VOUCHER: ErrorCode.VOUCHER_PAYLOAD,
    PayloadType.REFUND: ErrorCode.REFUND_PAYLOAD,
}
_CONFIG_KEYS = {
    "payer",
    "payerAuthorizer",
    "receiver",
    "receiverAuthorizer",
    "token",
    "withdrawDelay",
    "salt",
}


class _Reader:
    """Field readers that raise the payload type's reason code, never echoing the input."""

    def __init__(self, code: ErrorCode) -> None:
        self.code = code

    def fail(self, what: str) -> ChannelRejected:
        return ChannelRejected(self.code, what)

    def obj(
        self,
        parent: dict[str, Any],
        key: str,
        keys: AbstractSet[str],
        optional: AbstractSet[str] = frozenset(),
    ) -> dict[str, Any]:
        value = parent.get(key)
        if not isinstance(value, dict):
            raise self.fail(f"{key} must be an object")
        self.keys(value, keys, optional, key)
        return value

    def keys(
        self, value: dict[str, Any], keys: AbstractSet[str], optional: AbstractSet[str], where: str
    ) -> None:
        present = set(value)
        if not keys <= present or not present <= keys | optional:
            raise self.fail(f"{where} must have exactly the fields {sorted(keys)}")

    def address(self, parent: dict[str, Any], key: str) -> bytes:
        value = parent.get(key)
        if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
            raise self.fail(f"{key} must be a 0x-prefixed 20-byte hex address")
        return bytes.fromhex(value[2:])

    def bytes32(self, parent: dict[str, Any], key: str) -> bytes:
        value = parent.get(key)
        if not isinstance(value, str) or not _BYTES32.fullmatch(value):
            raise self.fail(f"{key} must be 0x-prefixed 32-byte hex")
        return bytes.fromhex(value[2:])

    def signature(self, parent: dict[str, Any], key: str) -> bytes:
        value = parent.get(key)
        if (
            not isinstance(value, str)
            or len(value) > 2 + 2 * MAX_SIGNATURE_BYTES
            or not _HEX.fullmatch(value)
        ):
            raise self.fail(f"{key} must be 0x-prefixed hex of at most {MAX_SIGNATURE_BYTES} bytes")
        return bytes.fromhex(value[2:])

    def uint(self, parent: dict[str, Any], key: str, maximum: int, code: ErrorCode | None = None) -> int:
        """A decimal string (a JSON integer is tolerated: the SDK sends ``withdrawDelay`` as one)."""
        value = parent.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
            return value
        if not isinstance(value, str) or not _UINT.fullmatch(value) or int(value) > maximum:
            raise ChannelRejected(code or self.code, f"{key} must be a decimal integer of at most {maximum}")
        return int(value)


def _config(read: _Reader, payload: dict[str, Any]) -> ChannelConfig:
    raw = read.obj(payload, "channelConfig", _CONFIG_KEYS)
    config = ChannelConfig(
        payer=read.address(raw, "payer"),
        payer_authorizer=read.address(raw, "payerAuthorizer"),
        receiver=read.address(raw, "receiver"),
        receiver_authorizer=read.address(raw, "receiverAuthorizer"),
        token=read.address(raw, "token"),
        withdraw_delay=read.uint(raw, "withdrawDelay", UINT40_MAX),
        salt=read.bytes32(raw, "salt"),
    )
    if ZERO_ADDRESS in (config.payer, config.receiver, config.receiver_authorizer, config.token):
        raise read.fail("channelConfig addresses other than payerAuthorizer must not be zero")
    if not MIN_WITHDRAW_DELAY <= config.withdraw_delay <= MAX_WITHDRAW_DELAY:
        raise ChannelRejected(ErrorCode.WITHDRAW_DELAY_OUT_OF_RANGE)
    return config


def _voucher(read: _Reader, payload: dict[str, Any]) -> Voucher:
    raw = read.obj(payload, "voucher", {"channelId", "maxClaimableAmount", "signature"})
    return Voucher(
        channel_id=read.bytes32(raw, "channelId"),
        max_claimable=read.uint(raw, "maxClaimableAmount", UINT128_MAX),
        signature=read.signature(raw, "signature"),
    )


def _deposit(read: _Reader, payload: dict[str, Any]) -> Erc3009Deposit:
    raw = read.obj(payload, "deposit", {"amount", "authorization"})
    authorization = raw.get("authorization")
    if not isinstance(authorization, dict) or set(authorization) != {"erc3009Authorization"}:
        # Permit2 deposits (``permit2Authorization``) are not taken: USDC has EIP-3009.
        raise ChannelRejected(ErrorCode.ERC3009_AUTHORIZATION_REQUIRED)
    auth = read.obj(authorization, "erc3009Authorization", {"validAfter", "validBefore", "salt", "signature"})
    amount = read.uint(raw, "amount", UINT128_MAX)
    if amount == 0:
        raise read.fail("deposit.amount must be positive")
    return Erc3009Deposit(
        amount=amount,
        valid_after=read.uint(auth, "validAfter", UINT256_MAX),
        valid_before=read.uint(auth, "validBefore", UINT256_MAX),
        salt=int.from_bytes(read.bytes32(auth, "salt"), "big"),
        signature=read.signature(auth, "signature"),
    )


def parse_payload(payload: Any, chain_id: int, contract: str = BATCH_SETTLEMENT_ADDRESS) -> ChannelPayload:
    """The scheme's ``payload`` object (inside the x402 envelope), type-checked field by field
    (no field missing, none unknown, integers in their Solidity range) and bound: the voucher's
    ``channelId`` must be the channel id of ``channelConfig`` on ``chain_id``/``contract``."""
    if not isinstance(payload, dict):
        raise ChannelRejected(ErrorCode.PAYLOAD_TYPE, "payload must be an object")
    kind = payload.get("type")
    if kind not in _KEYS:
        raise ChannelRejected(ErrorCode.PAYLOAD_TYPE)
    kind = PayloadType(kind)
    read = _Reader(_MALFORMED[kind])
    read.keys(payload, *_KEYS[kind], "payload")
    config = _config(read, payload)
    voucher = _voucher(read, payload)
    if voucher.channel_id != config.channel_id(chain_id, contract):
        raise ChannelRejected(ErrorCode.CHANNEL_ID_MISMATCH)
    if kind is PayloadType.DEPOSIT:
        return DepositPayload(config, voucher, _deposit(read, payload))
    if kind is PayloadType.VOUCHER:
        return VoucherPayload(config, voucher)
    amount = None
    if "amount" in payload:
        amount = read.uint(payload, "amount", UINT128_MAX, ErrorCode.REFUND_AMOUNT_INVALID)
        if amount == 0:
            raise ChannelRejected(ErrorCode.REFUND_AMOUNT_INVALID)
    return RefundPayload(config, voucher, amount)


# ---------------------------------------------------------------------------- our side


@dataclass(frozen=True, slots=True)
class ChannelTerms:
    """What our 402 offers for a channel: ``payTo`` is the receiver, our key the
    receiverAuthorizer, the token and the withdraw delay ours too."""

    chain_id: int
    token: bytes
    receiver: bytes
    receiver_authorizer: bytes
    withdraw_delay: int
    contract: str = BATCH_SETTLEMENT_ADDRESS

    def check(self, config: ChannelConfig) -> None:
        """Refuse a channel that is not ours (the spec's verification order)."""
        if config.receiver != self.receiver:
            raise ChannelRejected(ErrorCode.RECEIVER_MISMATCH)
        if config.receiver_authorizer != self.receiver_authorizer:
            raise ChannelRejected(ErrorCode.RECEIVER_AUTHORIZER_MISMATCH)
        if config.token != self.token:
            raise ChannelRejected(ErrorCode.TOKEN_MISMATCH)
        if config.withdraw_delay != self.withdraw_delay:
            raise ChannelRejected(ErrorCode.WITHDRAW_DELAY_MISMATCH)

    def extra(self, token_name: str, token_version: str, min_deposit: int) -> dict[str, Any]:
        """``accepts[].extra`` of a ``batch-settlement`` requirement."""
        return {
            "receiverAuthorizer": checksum(self.receiver_authorizer),
            "withdrawDelay": self.withdraw_delay,
            "name": token_name,
            "version": token_version,
            "assetTransferMethod": EIP3009_TRANSFER_METHOD,
            "minDeposit": str(min_deposit),
        }


@dataclass(frozen=True, slots=True)
class ChannelMirror:
    """Our record of one channel: the chain's fields as last read (``balance``,
    ``total_claimed``, ``withdraw_requested_at``, ``refund_nonce``), what we have charged in
    total, and the latest voucher the payer signed (its ceiling and signature)."""

    balance: int
    total_claimed: int
    charged_cumulative: int
    signed_max_claimable: int
    signature: bytes
    withdraw_requested_at: int = 0
    refund_nonce: int = 0

    @classmethod
    def from_chain(
        cls, balance: int, total_claimed: int, withdraw_requested_at: int = 0, refund_nonce: int = 0
    ) -> ChannelMirror:
        """A channel we hold no record of: the baseline is the claimed total on chain (what we
        charged beyond it and did not claim is lost with the record)."""
        return cls(
            balance, total_claimed, total_claimed, total_claimed, b"", withdraw_requested_at, refund_nonce
        )

    def channel_state(self, channel_id: bytes) -> dict[str, Any]:
        """``extra.channelState`` of a payment response or a corrective 402."""
        return {
            "channelId": hex_of(channel_id),
            "balance": str(self.balance),
            "totalClaimed": str(self.total_claimed),
            "withdrawRequestedAt": self.withdraw_requested_at,
            "refundNonce": str(self.refund_nonce),
            "chargedCumulativeAmount": str(self.charged_cumulative),
        }

    def corrective_extra(self, extra: dict[str, Any], channel_id: bytes) -> dict[str, Any]:
        """``extra`` of the requirement in a corrective 402
        (``invalid_batch_settlement_evm_cumulative_amount_mismatch``): our channel snapshot and,
        when we hold one, the payer's latest voucher, which the payer checks before adopting our
        charged total."""
        corrected = {**extra, "channelState": self.channel_state(channel_id)}
        if self.signature:
            corrected["voucherState"] = {
                "signedMaxClaimable": str(self.signed_max_claimable),
                "signature": hex_of(self.signature),
            }
        return corrected

    def refundable(self) -> int:
        return max(self.balance - self.charged_cumulative, 0)


@dataclass(frozen=True, slots=True)
class VerifiedVoucher:
    payload: ChannelPayload
    channel_id: bytes
    #: The voucher signer is a contract (EIP-1271): only the chain can tell whether it approves
    #: the signature. The caller must check it there before accepting.
    contract_signature: bool = False


def verify_payload(
    payload: ChannelPayload, terms: ChannelTerms, mirror: ChannelMirror, price: int
) -> VerifiedVoucher:
    """Check a parsed payload against our terms and our mirror of its channel (``mirror``: our
    record, or ``ChannelMirror.from_chain`` when we have none, zeros for a new channel), for a
    request priced at most ``price``. Raises ChannelRejected; with
    ``CUMULATIVE_AMOUNT_MISMATCH`` the caller answers a corrective 402
    (``mirror.corrective_extra``)."""
    config, voucher = payload.config, payload.voucher
    channel_id = voucher.channel_id
    terms.check(config)
    if not config.contract_signer:
        try:
            signer = recover_canonical(
                voucher_digest(channel_id, voucher.max_claimable, terms.chain_id, terms.contract),
                voucher.signature,
            )
        except SignatureError:
            raise ChannelRejected(ErrorCode.VOUCHER_SIGNATURE) from None
        if signer != config.payer_authorizer:
            raise ChannelRejected(ErrorCode.VOUCHER_SIGNATURE)
    # After the signature (unlike the SDK's server): only the payer learns our channel state.
    refund = isinstance(payload, RefundPayload)
    if voucher.max_claimable != mirror.charged_cumulative + (0 if refund else price):
        raise ChannelRejected(ErrorCode.CUMULATIVE_AMOUNT_MISMATCH)
    balance = mirror.balance + (payload.deposit.amount if isinstance(payload, DepositPayload) else 0)
    if balance == 0:
        raise ChannelRejected(ErrorCode.CHANNEL_NOT_FOUND)
    if voucher.max_claimable > balance:
        raise ChannelRejected(ErrorCode.CUMULATIVE_EXCEEDS_BALANCE)
    if voucher.max_claimable < mirror.total_claimed or (
        not refund and voucher.max_claimable == mirror.total_claimed
    ):
        raise ChannelRejected(ErrorCode.CUMULATIVE_BELOW_CLAIMED)
    return VerifiedVoucher(payload, channel_id, contract_signature=config.contract_signer)


def charge(mirror: ChannelMirror, voucher: Voucher, amount: int) -> ChannelMirror:
    """The mirror once a request paid by ``voucher`` is charged ``amount`` (the measured cost,
    at most the price; 0 for a failed run): the charged total never exceeds what the payer
    signed nor the channel's balance."""
    if amount < 0:
        raise ValueError("a charge cannot be negative")
    charged = mirror.charged_cumulative + amount
    if charged > voucher.max_claimable:
        raise ChannelRejected(ErrorCode.CHARGE_EXCEEDS_SIGNED_CUMULATIVE)
    if charged > mirror.balance:
        raise ChannelRejected(ErrorCode.CUMULATIVE_EXCEEDS_BALANCE)
    return replace(
        mirror,
        charged_cumulative=charged,
        signed_max_claimable=voucher.max_claimable,
        signature=voucher.signature,
    )


def refund_amount(mirror: ChannelMirror, requested: int | None) -> int:
    """What a cooperative refund returns: all the unused balance, or the part asked for."""
    remainder = mirror.refundable()
    if remainder == 0 or (requested is not None and requested > remainder):
        raise ChannelRejected(ErrorCode.REFUND_NO_BALANCE)
    return remainder if requested is None else requested
