"""The payment gate: a DRF permission that answers unpaid requests with an x402 challenge.

The view says what the request costs (``get_charge``); this class issues the challenge, or
decodes and verifies the payment header (pure checks first, then one batched chain read) and
hands its answer to the view as ``request.x402`` (an ``Admission``; ``admit`` is the one
entry, which MCP calls too). Recording it in the ledger is the
view's job, in the same transaction as the prediction it buys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rest_framework.permissions import SAFE_METHODS, BasePermission

from payments import backpressure, idempotency, metrics, ratelimit, verification
from payments.exceptions import Challenge, PaymentRequired, ServiceUnavailable, SettlementBacklogged
from payments.models import Payment
from payments.options import configured
from payments.pricing import UsagePrice
from payments.schemes import CHANNEL_SCHEMES, SCHEMES
from payments.verification import Verification, VerificationUnavailable
from payments.x402.codec import DecodeError, decode_header
from payments.x402.types import HOLD_SLACK_SECONDS, Resource, named_in, parse_payload, resource_path
from payments.x402.verify import UNSUPPORTED_SCHEME, PaymentRejected
from x402site.authentication import is_operator
from x402site.conf import x402

if TYPE_CHECKING:
    from payments.channels.gate import ChannelPayment

log = logging.getLogger("payments.gate")

V2_HEADER = "PAYMENT-SIGNATURE"
RESOURCE_MISMATCH = "invalid_payment_resource_mismatch"
V1_HEADER = "X-PAYMENT"


@dataclass(frozen=True, slots=True)
class Charge:
    """What a request costs, from the view: price in USD(C) and what the payment buys.

    ``honoured``: earlier prices of this request whose challenges may still be answered (a
    price change never cheats an agent that signed against the previous challenge).
    """

    price: Decimal
    resource: Resource
    fingerprint: str
    honoured: tuple[Decimal, ...] = ()
    #: Runs without payment. Only this makes a request free: a paid model whose price for some
    #: input comes to 0 is a pricing error (refused as input), never a free run.
    free: bool = False
    #: Seconds the authorization must stay settleable after acceptance (the run, when the
    #: payment is settled only after it); see Requirement.hold_seconds.
    hold_seconds: int = 0
    #: x402 extensions for the challenge (e.g. ``bazaar`` discovery info) and the v1 outputSchema.
    extensions: dict[str, Any] = field(default_factory=dict)
    output_schema: dict[str, Any] | None = None
    example_input: dict[str, Any] = field(default_factory=dict)
    #: Pay per second (x402 ``upto``) as well: the price, the run's time limit (the permit is
    #: held through it, settled after), and whether it is offered before the fixed quote.
    usage: UsagePrice | None = None
    usage_hold_seconds: int = 0
    upto_first: bool = False
    #: Offer the channel schemes (``batch-settlement``) too, where the server enables them;
    #: paid per second on a channel (``channel_usage``: the voucher's ceiling is its maximum,
    #: the run is charged its measured cost).
    channels: bool = False
    channel_usage: UsagePrice | None = None

    def __post_init__(self) -> None:
        if not self.free and self.price <= 0:
            raise ValueError("a paid charge must cost more than 0")


def challenge_for(charge: Charge) -> Challenge:
    options = configured()
    if not options:
        raise ServiceUnavailable("No payment option is configured on this server.")

    # Each scheme's offers, the usage-priced ones first when the charge says so.
    schemes = sorted(SCHEMES.values(), key=lambda s: s.usage_priced != charge.upto_first)
    offered = [r for s in schemes for r in s.offers(charge, charge.price)]
    offered += [r for s in CHANNEL_SCHEMES.values() for r in s.offers(charge, charge.price)]
    # A price that just changed is still honoured (fixed prices: a usage price is not quoted).
    fixed = [*(s for s in SCHEMES.values() if not s.usage_priced), *CHANNEL_SCHEMES.values()]
    honoured = [r for old in charge.honoured for s in fixed for r in s.offers(charge, old) if r not in offered]
    return Challenge(
        requirements=offered,
        resource=charge.resource,
        honoured=honoured,
        extensions=charge.extensions,
        output_schema=charge.output_schema,
        price_usd=charge.price,
        example_input=charge.example_input,
    )


def honour_window_seconds(hold_seconds: int = 0) -> int:
    """How long a challenge's price is honoured after it changes: its longest validity (longer
    for a payment held through a run, see Requirement.max_timeout_seconds)."""
    longest = max((c.option.max_timeout_seconds for c in configured()), default=0)
    return max(longest, hold_seconds + HOLD_SLACK_SECONDS) + x402.verification.clock_skew_seconds


class X402Payment(BasePermission):
    """Allow safe methods and free resources; require a verified x402 payment otherwise. The
    view reads the gate's answer as ``request.x402`` (an ``Admission``)."""

    def has_permission(self, request, view) -> bool:  # type: ignore[no-untyped-def]
        if request.method in SAFE_METHODS:
            return True
        charge: Charge | None = view.get_charge(request)
        header = request.headers.get(V2_HEADER) or request.headers.get(V1_HEADER)
        request.x402 = admit(charge, header, request, path=request.path, missing=f"{V2_HEADER} header is required")
        return True


@dataclass(frozen=True, slots=True)
class Admission:
    """The gate's answer to a request it lets through: free (no charge, a free resource, or an
    operator), a newly verified payment, or the first payment of an idempotent retry."""

    charge: Charge | None = None
    challenge: Challenge | None = None
    verification: Verification | None = None
    replay_of: Payment | None = None
    #: A voucher on a payment channel (``batch-settlement``), instead of a verified payment.
    channel: ChannelPayment | None = None

    @property
    def free(self) -> bool:
        return self.challenge is None


def admit(charge: Charge | None, header: str | None, request: Any, *, path: str, missing: str) -> Admission:
    """The one gate every transport calls (the DRF permission, the MCP tools): let a free or
    operator request through, else take the payment in ``header`` (base64 JSON) for the resource
    at ``path``. ``request`` is the client's request (operator token, rate limits); ``missing``
    is the refusal's reason when no payment came, in the transport's own words.

    Raises PaymentRequired (a challenge, or a fresh one with the reason) or ServiceUnavailable.
    """
    if charge is None or charge.free or is_operator(request):
        return Admission(charge=charge)
    challenge = challenge_for(charge)
    if not header:
        ratelimit.hit(request, "challenge")
        raise challenge.reject(missing)
    try:
        accepted = check_payment(header, challenge, path)
    except PaymentRequired:
        ratelimit.hit(request, "failed")
        raise
    return Admission(charge, challenge, accepted.verification, accepted.replay_of, accepted.channel)


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``check_payment`` let through: newly verified, or the first payment of an idempotent retry."""

    verification: Verification | None = None
    replay_of: Payment | None = None
    channel: ChannelPayment | None = None


def check_payment(header: str, challenge: Challenge, path: str) -> Accepted:
    """The gate's checks of one payment (base64 JSON, as in ``PAYMENT-SIGNATURE``) for the
    resource at ``path`` (``admit``'s, for a paid request).

    Raises PaymentRequired (a fresh challenge with the reason) or ServiceUnavailable.
    """
    try:
        obj = decode_header(header)
        channel_scheme = CHANNEL_SCHEMES.get(named_in(obj).get("scheme")) if isinstance(obj, dict) else None
        if channel_scheme is not None:
            paid_for = resource_path(obj)
        else:
            payload = parse_payload(obj)
            paid_for = payload.resource_path
    except DecodeError as exc:
        log.info("payment header refused: invalid_payload (%s)", exc)
        raise challenge.reject(DecodeError.reason, str(exc)) from None
    # A v2 payload names the resource it was made for: it must be this one (the EIP-3009
    # signature itself does not bind the URL, nor does a voucher).
    if paid_for is not None and paid_for.rstrip("/") != path.rstrip("/"):
        raise challenge.reject(RESOURCE_MISMATCH, "this payment was made for another resource")
    if channel_scheme is not None:
        if not any(r.scheme == channel_scheme.name for r in challenge.requirements):
            raise challenge.reject(UNSUPPORTED_SCHEME, f"{channel_scheme.name} is not offered for this resource")
        return Accepted(channel=channel_scheme.accept(obj, challenge))
    # An idempotent retry (same payment-identifier, same payload) is answered before
    # verification: once settled, a resent payload would no longer verify. Nothing else in
    # a payload is secret once it settles, so nothing else identifies a retry.
    replay_of = idempotency.lookup(payload)
    if replay_of is not None:
        return Accepted(replay_of=replay_of)
    if backpressure.overloaded():
        # Refused before verification: the authorization stays unused, the agent may resend it.
        metrics.BACKPRESSURE.inc()
        raise SettlementBacklogged(x402.settlement.backpressure_retry_after_seconds)
    try:
        verified = verification.verify(payload, [*challenge.requirements, *challenge.honoured], challenge.resource)
    except PaymentRejected as exc:
        log.info("payment refused: %s (%s)", exc.reason, exc.message)
        raise challenge.reject(exc.reason, exc.message) from None
    except VerificationUnavailable:
        raise ServiceUnavailable() from None
    return Accepted(verification=verified)
