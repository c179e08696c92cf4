"""Verification of an ``exact`` EVM (EIP-3009) or ``upto`` (Permit2) payment against the
requirements we offered.

Pure: the caller passes the clock. The checks run in the order the reference facilitator uses,
each with its own reason code; the chain checks (nonce unused, balance) come after, in the
caller, because they need the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .eip712 import SignatureError, authorization_digest, domain_separator, recover
from .permit2 import UPTO_PROXY_ADDRESS, permit2_domain_separator, upto_digest
from .types import SCHEME_EXACT, SCHEME_UPTO, PaymentPayload, Requirement

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


@lru_cache(maxsize=64)
def _separator(name: str, version: str, chain_id: int, asset: str) -> bytes:
    return domain_separator(name, version, chain_id, bytes.fromhex(asset[2:]))


def _same_address(a: object, b: str) -> bool:
    return isinstance(a, str) and a.lower() == b.lower()


def _check_accepted(payload: PaymentPayload, req: Requirement) -> None:
    """v2 clients echo the requirement they chose: it must be one we offer, exactly."""
    accepted = payload.accepted
    if accepted is None:
        return
    if not _same_address(accepted.get("asset"), req.option.asset):
        raise PaymentRejected(ASSET_MISMATCH, "accepted.asset is not an asset we accept")
    if not _same_address(accepted.get("payTo"), req.option.pay_to):
        raise PaymentRejected(RECIPIENT_MISMATCH, "accepted.payTo is not our pay-to address")
    if str(accepted.get("amount")) != str(req.amount):
        raise PaymentRejected(VALUE_MISMATCH, "accepted.amount is not the current price")
    extra = accepted.get("extra")
    if isinstance(extra, dict):
        if extra.get("name", req.option.asset_name) != req.option.asset_name:
            raise PaymentRejected(TOKEN_NAME_MISMATCH)
        if extra.get("version", req.option.asset_version) != req.option.asset_version:
            raise PaymentRejected(TOKEN_VERSION_MISMATCH)


def digest_of(verified: VerifiedPayment) -> bytes:
    """The EIP-712 digest the payer signed (what an EIP-1271 wallet is asked to approve)."""
    o = verified.requirement.option
    if verified.payload.permit is not None:
        return upto_digest(_permit2_separator(o.chain_id), verified.payload.permit)
    return authorization_digest(
        _separator(o.asset_name, o.asset_version, o.chain_id, o.asset), verified.payload.authorization
    )


def _check_one(
    payload: PaymentPayload,
    req: Requirement,
    now: int,
    settle_margin: int,
    clock_skew: int,
    contract_signers: bool,
) -> VerifiedPayment:
    _check_accepted(payload, req)
    auth = payload.authorization
    if auth.to != bytes.fromhex(req.option.pay_to[2:]):
        raise PaymentRejected(RECIPIENT_MISMATCH, "authorization.to is not our pay-to address")
    if auth.value != req.amount:
        raise PaymentRejected(VALUE_MISMATCH, f"authorization.value must be exactly {req.amount}")
    if auth.valid_before < now + settle_margin + req.hold_seconds:
        needed = settle_margin + req.hold_seconds
        why = f" (the run may take {req.hold_seconds}s and is settled after it)" if req.hold_seconds else ""
        raise PaymentRejected(VALID_BEFORE, f"validBefore must leave at least {needed}s to settle{why}")
    if auth.valid_after > now:  # as the reference facilitator: it could not be settled yet
        raise PaymentRejected(VALID_AFTER, "validAfter is in the future")
    if auth.valid_before > now + req.max_timeout_seconds + clock_skew:
        raise PaymentRejected(
            VALIDITY_TOO_LONG,
            f"validBefore may be at most maxTimeoutSeconds ({req.max_timeout_seconds}s) ahead",
        )
    separator = _separator(
        req.option.asset_name, req.option.asset_version, req.option.chain_id, req.option.asset
    )
    return _signed(
        req,
        payload,
        authorization_digest(separator, auth),
        auth.from_,
        "authorization.from",
        INVALID_SIGNATURE,
        contract_signers,
    )


def verify_exact(
    payload: PaymentPayload,
    requirements: list[Requirement],
    now: int,
    *,
    settle_margin: int = 6,
    clock_skew: int = 30,
    contract_signers: bool = False,
) -> VerifiedPayment:
    """Return the requirement this payload validly pays, or raise PaymentRejected.

    ``settle_margin``: seconds ``validBefore`` must still leave for the settlement to land.
    ``clock_skew``: tolerance for the payer's clock on the window length.
    ``contract_signers``: a signature that is not ``from``'s ECDSA signature is passed on as
    ``contract_signature`` (to be checked with EIP-1271 on chain) instead of refused.

    Several requirements may share the payload's network (a v1 payload names no asset): the one
    whose EIP-712 domain the signature recovers under wins; a contract signature must be
    unambiguous, since only the chain can say which domain it approves.
    """
    if payload.scheme != SCHEME_EXACT:
        raise PaymentRejected(UNSUPPORTED_SCHEME, f"scheme {payload.scheme!r} is not offered")
    candidates = [
        r
        for r in requirements
        if r.scheme == SCHEME_EXACT and r.option.matches_network(payload.network, payload.x402_version)
    ]
    if not candidates:
        raise PaymentRejected(NETWORK_MISMATCH, f"network {payload.network!r} is not offered")
    first_error: PaymentRejected | None = None
    contract: list[VerifiedPayment] = []
    for req in candidates:
        try:
            verified = _check_one(payload, req, now, settle_margin, clock_skew, contract_signers)
        except PaymentRejected as exc:
            first_error = first_error or exc
            continue
        if not verified.contract_signature:
            return verified
        contract.append(verified)
    if len(contract) == 1:
        return contract[0]
    if contract:
        raise PaymentRejected(
            INVALID_SIGNATURE,
            "not from's ECDSA signature, and several assets on this network could be meant: pay with x402 v2",
        )
    assert first_error is not None
    raise first_error


@lru_cache(maxsize=16)
def _permit2_separator(chain_id: int) -> bytes:
    return permit2_domain_separator(chain_id)


def _address_bytes(address: str) -> bytes:
    return bytes.fromhex(address[2:])


def _check_upto(
    payload: PaymentPayload, req: Requirement, now: int, settle_margin: int, clock_skew: int, contract_signers: bool
) -> VerifiedPayment:
    """The ``upto`` checks, one reason each, in the SDK facilitator's order."""
    permit = payload.permit
    assert permit is not None
    accepted = payload.accepted or {}
    if not _same_address(accepted.get("asset"), req.option.asset):
        raise PaymentRejected(ASSET_MISMATCH, "accepted.asset is not an asset we accept")
    if not _same_address(accepted.get("payTo"), req.option.pay_to):
        raise PaymentRejected(PERMIT2_RECIPIENT_MISMATCH, "accepted.payTo is not our pay-to address")
    if str(accepted.get("amount")) != str(req.amount):
        raise PaymentRejected(PERMIT2_AMOUNT_MISMATCH, "accepted.amount is not the current maximum")
    if permit.spender != _address_bytes(UPTO_PROXY_ADDRESS):
        raise PaymentRejected(PERMIT2_INVALID_SPENDER, f"spender must be the x402 upto proxy {UPTO_PROXY_ADDRESS}")
    if permit.to != _address_bytes(req.option.pay_to):
        raise PaymentRejected(PERMIT2_RECIPIENT_MISMATCH, "witness.to is not our pay-to address")
    if permit.facilitator not in {_address_bytes(f) for f in req.facilitators}:
        raise PaymentRejected(UPTO_FACILITATOR_MISMATCH, "witness.facilitator is not an address that settles for us")
    if permit.deadline < now + settle_margin + req.hold_seconds:
        needed = settle_margin + req.hold_seconds
        raise PaymentRejected(
            PERMIT2_DEADLINE_EXPIRED, f"deadline must leave at least {needed}s (the run, then its settlement)"
        )
    if permit.deadline > now + req.max_timeout_seconds + clock_skew:
        raise PaymentRejected(
            PERMIT2_DEADLINE_TOO_FAR, f"deadline may be at most maxTimeoutSeconds ({req.max_timeout_seconds}s) ahead"
        )
    if permit.valid_after > now:
        raise PaymentRejected(PERMIT2_NOT_YET_VALID, "witness.validAfter is in the future")
    if permit.maximum != req.amount:
        raise PaymentRejected(PERMIT2_AMOUNT_MISMATCH, f"permitted.amount must be exactly {req.amount}")
    if permit.token != _address_bytes(req.option.asset):
        raise PaymentRejected(PERMIT2_TOKEN_MISMATCH, "permitted.token is not the asset")
    return _signed(
        req,
        payload,
        upto_digest(_permit2_separator(req.option.chain_id), permit),
        permit.owner,
        "permit2Authorization.from",
        PERMIT2_INVALID_SIGNATURE,
        contract_signers,
    )


def verify_upto(
    payload: PaymentPayload,
    requirements: list[Requirement],
    now: int,
    *,
    settle_margin: int = 6,
    clock_skew: int = 30,
    contract_signers: bool = False,
) -> VerifiedPayment:
    """Return the ``upto`` requirement this payload validly pays, or raise PaymentRejected.

    v2 only: the payload echoes the requirement it answers, so its asset picks the one candidate.
    The chain checks (Permit2 allowance, balance, the nonce's bit) are the caller's.
    """
    if payload.scheme != SCHEME_UPTO or payload.permit is None:
        raise PaymentRejected(UNSUPPORTED_SCHEME, f"scheme {payload.scheme!r} is not offered")
    candidates = [
        r for r in requirements if r.scheme == SCHEME_UPTO and r.option.matches_network(payload.network, 2)
    ]
    if not candidates:
        raise PaymentRejected(NETWORK_MISMATCH, f"upto on network {payload.network!r} is not offered")
    asset = (payload.accepted or {}).get("asset")
    req = next((r for r in candidates if _same_address(asset, r.option.asset)), candidates[0])
    return _check_upto(payload, req, now, settle_margin, clock_skew, contract_signers)


def verify_payment(
    payload: PaymentPayload,
    requirements: list[Requirement],
    now: int,
    *,
    settle_margin: int = 6,
    clock_skew: int = 30,
    contract_signers: bool = False,
) -> VerifiedPayment:
    """:func:`verify_exact` or :func:`verify_upto`, by the payload's scheme."""
    verifier = verify_upto if payload.scheme == SCHEME_UPTO else verify_exact
    return verifier(
        payload,
        requirements,
        now,
        settle_margin=settle_margin,
        clock_skew=clock_skew,
        contract_signers=contract_signers,
    )


def _signed(
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
