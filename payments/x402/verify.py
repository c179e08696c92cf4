"""Verification of a payment against the requirements we offered: the parts every scheme
shares (the reason codes, the result, the signature check) and :func:`verify_payment`, which
hands the payload to its scheme's checks (``exact.py``, ``upto.py``, found in
:mod:`.mechanisms`).

Pure: the caller passes the clock. The chain checks (nonce unused, balance) come after, in the
caller, because they need the network.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import mechanisms
from .eip712 import SignatureError, recover
from .types import PaymentPayload, Requirement

UNSUPPORTED_SCHEME = "unsupported_scheme"
NETWORK_MISMATCH = "network_mismatch"
ASSET_MISMATCH = "invalid_exact_evm_asset_mismatch"
TOKEN_NAME_MISMATCH = "invalid_exact_evm_token_name_mismatch"
TOKEN_VERSION_MISMATCH = "invalid_exact_evm_token_version_mismatch"
RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"
VALIDITY_TOO_LONG = "invalid_exact_evm_payload_authorization_validity_too_long"
INVALID_SIGNATURE = "invalid_exact_evm_payload_signature"
NONCE_ALREADY_USED = "invalid_exact_evm_nonce_already_used"
INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
#: Either scheme, held until after the run: its settlement, simulated before the run, reverts.
SETTLEMENT_WOULD_REVERT = "settlement_simulation_reverted"

# ``upto`` (Permit2) reason codes, spelled as the x402 SDK spells them where it has one.
PERMIT2_INVALID_SPENDER = "invalid_permit2_spender"
PERMIT2_RECIPIENT_MISMATCH = "invalid_permit2_recipient_mismatch"
UPTO_FACILITATOR_MISMATCH = "upto_facilitator_mismatch"
PERMIT2_DEADLINE_EXPIRED = "permit2_deadline_expired"
PERMIT2_DEADLINE_TOO_FAR = "permit2_deadline_too_far"
PERMIT2_NOT_YET_VALID = "permit2_not_yet_valid"
PERMIT2_AMOUNT_MISMATCH = "permit2_amount_mismatch"
PERMIT2_TOKEN_MISMATCH = "permit2_token_mismatch"
PERMIT2_INVALID_SIGNATURE = "invalid_permit2_signature"
PERMIT2_ALLOWANCE_REQUIRED = "permit2_allowance_required"
PERMIT2_INSUFFICIENT_BALANCE = "permit2_insufficient_balance"
PERMIT2_NONCE_USED = "permit2_invalid_nonce"


class PaymentRejected(Exception):
    """A payment that must not be accepted; ``reason`` is the x402 reason code."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason


@dataclass(frozen=True, slots=True)
class VerifiedPayment:
    requirement: Requirement
    payload: PaymentPayload
    #: The signature is not an EOA's: the payer must be a contract wallet that approves it
    #: (EIP-1271), which only the chain can tell. The caller must check before accepting.
    contract_signature: bool = False

    @property
    def payer(self) -> bytes:
        return self.payload.authorization.from_


def same_address(a: object, b: str) -> bool:
    return isinstance(a, str) and a.lower() == b.lower()


def digest_of(verified: VerifiedPayment) -> bytes:
    """The EIP-712 digest the payer signed (what an EIP-1271 wallet is asked to approve)."""
    scheme = mechanisms.get(verified.payload.scheme)
    assert scheme is not None  # a verified payment's scheme is registered
    return scheme.digest(verified)


def verify_payment(
    payload: PaymentPayload,
    requirements: list[Requirement],
    now: int,
    *,
    settle_margin: int = 6,
    clock_skew: int = 30,
    contract_signers: bool = False,
) -> VerifiedPayment:
    """Return the requirement this payload validly pays, or raise PaymentRejected: its scheme's
    checks (``unsupported_scheme`` for a scheme we do not speak in the payload's x402 version).

    ``settle_margin``: seconds the authorization must still leave for the settlement to land.
    ``clock_skew``: tolerance for the payer's clock on the window length.
    ``contract_signers``: a signature that is not the payer's ECDSA signature is passed on as
    ``contract_signature`` (to be checked with EIP-1271 on chain) instead of refused.
    """
    scheme = mechanisms.get(payload.scheme, payload.x402_version)
    if scheme is None:
        raise PaymentRejected(UNSUPPORTED_SCHEME, f"scheme {payload.scheme!r} is not offered")
    return scheme.verify(
        payload,
        requirements,
        now,
        settle_margin=settle_margin,
        clock_skew=clock_skew,
        contract_signers=contract_signers,
    )


def signed(
    req: Requirement,
    payload: PaymentPayload,
    digest: bytes,
    owner: bytes,
    owner_field: str,
    reason: str,
    contract_signers: bool,
) -> VerifiedPayment:
    """The payment, if ``payload.signature`` is ``owner``'s ECDSA signature of ``digest``; else
    passed on as a contract signature (EIP-1271, checked on chain by the caller) when
    ``contract_signers``, or refused with ``reason``."""
    try:
        signer = recover(digest, payload.signature)
        problem = "" if signer == owner else f"signature does not recover to {owner_field}"
    except SignatureError as exc:
        problem = str(exc)
    if problem:
        if contract_signers:
            return VerifiedPayment(requirement=req, payload=payload, contract_signature=True)
        raise PaymentRejected(reason, problem)
    return VerifiedPayment(requirement=req, payload=payload)
