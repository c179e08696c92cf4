"""The ``exact`` EVM scheme on the wire: an EIP-3009 ``transferWithAuthorization`` of the price,
x402 v1 and v2. Its checks run in the order the reference facilitator uses, each with its own
reason code; the chain checks are the caller's (``payments.schemes.exact``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from . import mechanisms
from .eip712 import authorization_digest, domain_separator
from .types import SCHEME_EXACT, PaymentPayload, Requirement, parse_authorization
from .verify import (
    ASSET_MISMATCH,
    INVALID_SIGNATURE,
    NETWORK_MISMATCH,
    RECIPIENT_MISMATCH,
    TOKEN_NAME_MISMATCH,
    TOKEN_VERSION_MISMATCH,
    UNSUPPORTED_SCHEME,
    VALID_AFTER,
    VALID_BEFORE,
    VALIDITY_TOO_LONG,
    VALUE_MISMATCH,
    PaymentRejected,
    VerifiedPayment,
    same_address,
    signed,
)


@lru_cache(maxsize=64)
def _separator(name: str, version: str, chain_id: int, asset: str) -> bytes:
    return domain_separator(name, version, chain_id, bytes.fromhex(asset[2:]))


def _check_accepted(payload: PaymentPayload, req: Requirement) -> None:
    """v2 clients echo the requirement they chose: it must be one we offer, exactly."""
    accepted = payload.accepted
    if accepted is None:
        return
    if not same_address(accepted.get("asset"), req.option.asset):
        raise PaymentRejected(ASSET_MISMATCH, "accepted.asset is not an asset we accept")
    if not same_address(accepted.get("payTo"), req.option.pay_to):
        raise PaymentRejected(RECIPIENT_MISMATCH, "accepted.payTo is not our pay-to address")
    if str(accepted.get("amount")) != str(req.amount):
        raise PaymentRejected(VALUE_MISMATCH, "accepted.amount is not the current price")
    extra = accepted.get("extra")
    if isinstance(extra, dict):
        if extra.get("name", req.option.asset_name) != req.option.asset_name:
            raise PaymentRejected(TOKEN_NAME_MISMATCH)
        if extra.get("version", req.option.asset_version) != req.option.asset_version:
            raise PaymentRejected(TOKEN_VERSION_MISMATCH)


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
    return signed(
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


@dataclass(frozen=True, slots=True)
class ExactWire:
    """``exact``: v1 and v2; the payload is the EIP-3009 authorization itself."""

    name: str = SCHEME_EXACT
    versions: frozenset[int] = frozenset({1, 2})

    def extra(self, req: Requirement) -> dict[str, str]:
        return {}

    def parse(self, obj: dict[str, Any], payload: dict[str, Any], accepted: dict[str, Any] | None) -> PaymentPayload:
        return parse_authorization(obj, payload, accepted)

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
        return verify_exact(
            payload,
            requirements,
            now,
            settle_margin=settle_margin,
            clock_skew=clock_skew,
            contract_signers=contract_signers,
        )

    def digest(self, verified: VerifiedPayment) -> bytes:
        o = verified.requirement.option
        return authorization_digest(
            _separator(o.asset_name, o.asset_version, o.chain_id, o.asset), verified.payload.authorization
        )


EXACT = mechanisms.register(ExactWire())
