"""The one verification service: the payment gate and our facilitator API both call :func:`verify`.

A proof is valid only when its signature verifies for exactly these fields (the pure checks in
``payments.x402.verify``) and the chain, or the option's facilitator, says it can still be
settled: nonce unused, balance sufficient, a contract wallet approving its signature. Nothing
here consults the ledger: payer and nonce are public once a payment settles, so knowing them
proves nothing.

Verifiers are registered by the option's mode (our own chain reads, or a remote facilitator);
callers never branch on it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from payments.chain.node import ChainUnavailable
from payments.facilitator import FacilitatorClient, FacilitatorUnavailable
from payments.models import VerificationMethod
from payments.options import ConfiguredOption, SettlementMode, for_payment
from payments.schemes import scheme_of
from payments.x402.types import PaymentPayload, Requirement, Resource, wire_requirement
from payments.x402.verify import PaymentRejected, VerifiedPayment, digest_of, verify_payment
from x402site.conf import x402

log = logging.getLogger("payments.verification")


class VerificationUnavailable(Exception):
    """The chain or the facilitator could not say: the caller answers 503, never a pass."""


@dataclass(frozen=True, slots=True)
class Verification:
    """A payment proven settleable now, and how it was proven."""

    payment: VerifiedPayment
    conf: ConfiguredOption
    method: str
    #: The chain head the proof was checked at, when we read the chain ourselves.
    block: int | None = None


class Verifier(Protocol):
    method: str

    def check(self, conf: ConfiguredOption, verified: VerifiedPayment, resource: Resource) -> int | None:
        """Raise PaymentRejected for a no, VerificationUnavailable when it cannot say; else
        return the chain head the answer is from (None if unknown)."""
        ...


class ChainVerifier:
    """Our own node: nonce unused, balance sufficient (and, for ``upto``, Permit2's allowance),
    EIP-1271 approval, in one batch: the payment's scheme's chain reads."""

    method = VerificationMethod.LOCAL

    def check(self, conf: ConfiguredOption, verified: VerifiedPayment, resource: Resource) -> int | None:
        contract = (digest_of(verified), verified.payload.signature) if verified.contract_signature else None
        try:
            state = scheme_of(verified.payload.scheme).chain_state(conf, verified, contract)
        except ChainUnavailable as exc:
            log.warning("chain check failed for %s: %s", conf.option.network, exc)
            raise VerificationUnavailable(str(exc)) from None
        return state.block


class FacilitatorVerifier:
    """The option's x402 facilitator answers ``/verify``."""

    method = VerificationMethod.FACILITATOR

    def check(self, conf: ConfiguredOption, verified: VerifiedPayment, resource: Resource) -> int | None:
        payload = verified.payload
        requirement = wire_requirement(verified.requirement, payload.x402_version, resource)
        try:
            answer = FacilitatorClient(conf.facilitator_url, conf.facilitator_auth).verify(
                payload.x402_version, payload.raw, requirement
            )
        except FacilitatorUnavailable as exc:
            log.warning("facilitator verify failed for %s: %s", conf.option.network, exc)
            raise VerificationUnavailable(str(exc)) from None
        if answer.get("isValid") is not True:
            reason = str(answer.get("invalidReason") or "invalid_payment")[:100]
            raise PaymentRejected(reason, str(answer.get("invalidMessage") or reason)[:500])
        return None


VERIFIERS: dict[str, Verifier] = {
    SettlementMode.RELAYER: ChainVerifier(),
    SettlementMode.BATCH: ChainVerifier(),
    SettlementMode.FACILITATOR: FacilitatorVerifier(),
}


def verify(
    payload: PaymentPayload, requirements: list[Requirement], resource: Resource, now: int | None = None
) -> Verification:
    """Verify ``payload`` against the requirements we offered, in pure code and then on chain.

    Raises PaymentRejected (with the x402 reason code) or VerificationUnavailable.
    """
    verified = verify_payment(
        payload,
        requirements,
        int(time.time()) if now is None else now,
        settle_margin=x402.verification.settle_margin_seconds,
        clock_skew=x402.verification.clock_skew_seconds,
        contract_signers=True,  # a non-ECDSA signature is checked on chain (EIP-1271)
    )
    option = verified.requirement.option
    conf = for_payment(option.network, option.asset)
    verifier = VERIFIERS[conf.mode]
    block = verifier.check(conf, verified, resource)
    return Verification(payment=verified, conf=conf, method=verifier.method, block=block)
