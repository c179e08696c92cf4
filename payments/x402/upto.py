"""The ``upto`` EVM scheme on the wire: a Permit2 witness transfer of at most a signed maximum,
settled for the charge through the x402 upto proxy; x402 v2 only. Its checks run in the SDK
facilitator's order, each with its own reason code; the chain checks (Permit2 allowance,
balance, the nonce's bit) are the caller's (``payments.schemes.upto``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from . import mechanisms
from .eip712 import Authorization
from .permit2 import UPTO_PROXY_ADDRESS, UptoPermit, permit2_domain_separator, upto_digest
from .types import (
    SCHEME_UPTO,
    PaymentPayload,
    Requirement,
    address_field,
    object_field,
    resource_path,
    signature_field,
    str_field,
    uint_field,
)
from .verify import (
    ASSET_MISMATCH,
    NETWORK_MISMATCH,
    PERMIT2_AMOUNT_MISMATCH,
    PERMIT2_DEADLINE_EXPIRED,
    PERMIT2_DEADLINE_TOO_FAR,
    PERMIT2_INVALID_SIGNATURE,
    PERMIT2_INVALID_SPENDER,
    PERMIT2_NOT_YET_VALID,
    PERMIT2_RECIPIENT_MISMATCH,
    PERMIT2_TOKEN_MISMATCH,
    UNSUPPORTED_SCHEME,
    UPTO_FACILITATOR_MISMATCH,
    PaymentRejected,
    VerifiedPayment,
    same_address,
    signed,
)

#: ``extra.assetTransferMethod`` of an ``upto`` requirement (the SDK's spelling).
PERMIT2_TRANSFER_METHOD = "permit2"


@lru_cache(maxsize=16)
def _permit2_separator(chain_id: int) -> bytes:
    return permit2_domain_separator(chain_id)


def _address_bytes(address: str) -> bytes:
    return bytes.fromhex(address[2:])


def parse_upto(obj: dict[str, Any], payload: dict[str, Any], accepted: dict[str, Any] | None) -> PaymentPayload:
    """An ``upto`` payload: ``{permit2Authorization: {from, permitted: {token, amount}, spender,
    nonce (a decimal uint256), deadline, witness: {to, facilitator, validAfter}}, signature}``."""
    auth = object_field(payload, "permit2Authorization")
    permitted, witness = object_field(auth, "permitted"), object_field(auth, "witness")
    permit = UptoPermit(
        owner=address_field(auth, "from"),
        token=address_field(permitted, "token"),
        maximum=uint_field(permitted, "amount"),
        spender=address_field(auth, "spender"),
        nonce=uint_field(auth, "nonce"),
        deadline=uint_field(auth, "deadline"),
        to=address_field(witness, "to"),
        facilitator=address_field(witness, "facilitator"),
        valid_after=uint_field(witness, "validAfter"),
    )
    accepted = accepted or {}
    return PaymentPayload(
        resource_path=resource_path(obj),
        x402_version=2,
        scheme=SCHEME_UPTO,
        network=str_field(accepted, "network"),
        signature=signature_field(payload),
        authorization=Authorization(
            from_=permit.owner,
            to=permit.to,
            value=permit.maximum,
            valid_after=permit.valid_after,
            valid_before=permit.deadline,
            nonce=permit.nonce.to_bytes(32, "big"),
        ),
        accepted=accepted,
        raw=obj,
        permit=permit,
    )


def _check_upto(
    payload: PaymentPayload, req: Requirement, now: int, settle_margin: int, clock_skew: int, contract_signers: bool
) -> VerifiedPayment:
    """The ``upto`` checks, one reason each, in the SDK facilitator's order."""
    permit = payload.permit
    assert permit is not None
    accepted = payload.accepted or {}
    if not same_address(accepted.get("asset"), req.option.asset):
        raise PaymentRejected(ASSET_MISMATCH, "accepted.asset is not an asset we accept")
    if not same_address(accepted.get("payTo"), req.option.pay_to):
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
    return signed(
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
    req = next((r for r in candidates if same_address(asset, r.option.asset)), candidates[0])
    return _check_upto(payload, req, now, settle_margin, clock_skew, contract_signers)


@dataclass(frozen=True, slots=True)
class UptoWire:
    """``upto``: v2 only; the requirement names the transfer method and the facilitator (the
    first of our lanes: the proxy lets only the witness's facilitator settle)."""

    name: str = SCHEME_UPTO
    versions: frozenset[int] = frozenset({2})

    def extra(self, req: Requirement) -> dict[str, str]:
        return {"assetTransferMethod": PERMIT2_TRANSFER_METHOD, "facilitatorAddress": req.facilitators[0]}

    def parse(self, obj: dict[str, Any], payload: dict[str, Any], accepted: dict[str, Any] | None) -> PaymentPayload:
        return parse_upto(obj, payload, accepted)

    def verify(
        self,
        payload: PaymentPayload,
        requirements: list[Requirement],
        now: int,
        *,
        settle_margin: int,
        clock_skew: int,
        contract_signers: bool,
    ) -> VerifiedPayment:
        return verify_upto(
            payload,
            requirements,
            now,
            settle_margin=settle_margin,
            clock_skew=clock_skew,
            contract_signers=contract_signers,
        )

    def digest(self, verified: VerifiedPayment) -> bytes:
        permit = verified.payload.permit
        assert permit is not None
        return upto_digest(_permit2_separator(verified.requirement.option.chain_id), permit)


UPTO = mechanisms.register(UptoWire())
