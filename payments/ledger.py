"""The one write path that puts an accepted payment into the ledger."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Collection
from datetime import timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from eth_utils import to_checksum_address
from kombu.exceptions import OperationalError

from payments import idempotency
from payments.chain import batching
from payments.metrics import ACCEPTED
from payments.models import PAID_STATUSES, UNPAID_STATUSES, Payment, PaymentEvent, PaymentStatus, UnpaidReason
from payments.options import SettlementMode, for_payment
from payments.pricing import UsagePrice, atomic_amount
from payments.schemes import scheme_of
from payments.verification import Verification
from payments.x402.types import Resource, settle_response, wire_requirement
from payments.x402.verify import VerifiedPayment
from x402site import dispatch, rows
from x402site.conf import x402

#: Settlement not finished (the x402 SDK's reason code): we answer before the transfer is mined.
SETTLEMENT_PENDING = "settlement_pending"
#: The x402 specification's reason for a settlement that failed on chain.
SETTLEMENT_FAILED = "invalid_transaction_state"

#: PostgreSQL's SQLSTATE for a unique-constraint violation.
UNIQUE_VIOLATION = "23505"


def request_fingerprint(resource: str, body: Any) -> str:
    """What a payment buys: the resource and its canonical input, hashed."""
    canonical = json.dumps([resource, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record(
    verification: Verification,
    *,
    resource: Resource,
    fingerprint: str,
    settle_now: bool = True,
    method: str | None = None,
    usage: UsagePrice | None = None,
) -> Payment:
    """Insert the ledger row of a verified payment (call inside ``transaction.atomic()``).

    An ``upto`` payment (``usage``: the price it was accepted at) records the signed maximum as
    both ``maximum`` and, until the run is measured (:func:`charge_usage`), ``amount``.

    The database's unique (network, asset, payer, nonce) constraint makes a second insert of
    the same authorization raise IntegrityError, whatever process attempts it.
    """
    verified = verification.payment
    req, payload = verified.requirement, verified.payload
    auth = payload.authorization
    usage_priced = scheme_of(payload.scheme).usage_priced
    payment = Payment(
        status=PaymentStatus.VERIFIED,
        x402_version=payload.x402_version,
        scheme=payload.scheme,
        network=req.option.network,
        asset=req.option.asset,
        decimals=req.option.decimals,
        payer=to_checksum_address(auth.from_),
        pay_to=req.option.pay_to,
        amount=auth.value,
        maximum=auth.value if usage_priced else None,
        usage_price=usage.snapshot() if usage is not None and usage_priced else {},
        nonce="0x" + auth.nonce.hex(),
        valid_after=auth.valid_after,
        valid_before=auth.valid_before,
        signature="0x" + payload.signature.hex(),
        payload=payload.raw,
        requirement=wire_requirement(req, payload.x402_version, resource),
        verification=method or verification.method,
        search_from_block=verification.block,
        resource=resource.url[:512],
        request_fingerprint=fingerprint,
        settle_requested_at=timezone.now() if settle_now else None,
    )
    rows.insert(payment, PaymentEvent(payment=payment, to_status=PaymentStatus.VERIFIED))
    idempotency.remember(payment, payload)
    transaction.on_commit(lambda: ACCEPTED.labels(network=payment.network).inc())
    return payment


def same_proof(verified: VerifiedPayment, *, recorded_by: str) -> Payment | None:
    """The ledger row holding exactly this proof (same authorization fields and signature),
    recorded by ``recorded_by`` (a VerificationMethod), if any.

    Only a caller that has just verified the proof may use this: a row found by payer and nonce
    alone proves nothing, since both are public once a payment settles. And a caller answers
    only for the rows it recorded itself: the facilitator API must never settle a payment the
    gate holds until after its run (issue 25).
    """
    auth = verified.payload.authorization
    return (
        Payment.objects.filter(verification=recorded_by)
        .of_authorization(
            verified.requirement.option.network,
            verified.requirement.option.asset,
            to_checksum_address(auth.from_),
            "0x" + auth.nonce.hex(),
        )
        .filter(
            pay_to=verified.requirement.option.pay_to,
            # What was signed: the amount, or a usage-priced permit's maximum (its amount is the charge).
            **({"maximum": auth.value} if scheme_of(verified.payload.scheme).usage_priced else {"amount": auth.value}),
            valid_after=auth.valid_after,
            valid_before=auth.valid_before,
            signature="0x" + verified.payload.signature.hex(),
        )
        .first()
    )


def start_settlement(payment: Payment) -> None:
    """Get a payment whose settlement was asked for on its way (after commit): the option's
    batcher is kicked (one cache write per batch window), else the payment's own task is queued.
    Raises the broker's error for the latter (the caller decides; the sweep retries)."""

    if batching.is_batched(payment.network, payment.asset):
        batching.kick(for_payment(payment.network, payment.asset))
    else:
        dispatch.send(dispatch.SETTLE_PAYMENT, str(payment.pk))


def request_settlement(payment: Payment) -> None:
    """Ask for a payment to be settled now (after_success: its prediction succeeded)."""
    Payment.objects.filter(pk=payment.pk, settle_requested_at=None).update(settle_requested_at=timezone.now())

    def enqueue() -> None:
        # With the broker down, the reconciler's sweep enqueues it later.
        with contextlib.suppress(OperationalError, OSError):
            start_settlement(payment)

    transaction.on_commit(enqueue)


def is_usage_priced(payment: Payment) -> bool:
    return payment.maximum is not None and bool(payment.usage_price)


class RunEnd(StrEnum):
    """How a pay-per-second run ended: what decides its charge."""

    #: Served: its seconds' price, at least one atomic unit (a served run is never free).
    SUCCEEDED = "succeeded"
    #: Stopped at its time limit, or canceled by the payer: the compute was used as asked, so
    #: it costs its seconds' price like a success (capped at the signed maximum).
    STOPPED = "stopped"
    #: Failed on our side (the predictor raised, the runner was lost): the price's
    #: ``on_failure`` charge (nothing, or the minimum).
    FAILED = "failed"


#: Run seconds are recorded to the nanosecond (the resolution of the clocks that measure them),
#: and the charge is computed from the recorded value, so the books reproduce it exactly.
RUN_SECONDS_QUANTUM = Decimal("1e-9")


def usage_charge(price: UsagePrice, run_seconds: Decimal, end: RunEnd, *, maximum: int, decimals: int) -> int:
    """Atomic units charged for a run (0: nothing, the permit is released), never above ``maximum``."""
    if end == RunEnd.FAILED:
        return min(maximum, atomic_amount(price.failure_charge(), decimals))
    amount = min(maximum, price.charge_atomic(run_seconds, decimals))
    return max(amount, 1) if end == RunEnd.SUCCEEDED else amount


def charge_usage(payment: Payment, run_seconds: Decimal, end: RunEnd, *, reason: str = "") -> None:
    """Charge a pay-per-second (``upto``) payment for its measured run (inside the transaction
    that ends the run, payment locked): ``amount`` becomes the charge (:func:`usage_charge`),
    and settlement is asked for; a charge of 0 releases the permit instead (nothing moves, the
    ledger ends EXPIRED with ``unpaid_reason`` released once the permit lapses).
    """
    locked = Payment.objects.select_for_update().get(pk=payment.pk)
    if locked.status != PaymentStatus.VERIFIED or locked.settle_requested_at is not None:
        return  # already charged (a second report of the run) or no longer chargeable
    run_seconds = max(run_seconds, Decimal(0)).quantize(RUN_SECONDS_QUANTUM)
    price = UsagePrice.from_snapshot(locked.usage_price)
    amount = usage_charge(price, run_seconds, end, maximum=int(locked.maximum), decimals=locked.decimals)
    fields = {"run_seconds": run_seconds}
    if amount <= 0:
        Payment.objects.filter(pk=locked.pk).update(**fields)
        payment.run_seconds = fields["run_seconds"]
        release(locked, reason or "the run failed: nothing to charge")
        return
    Payment.objects.filter(pk=locked.pk).update(amount=amount, **fields)
    payment.amount, payment.run_seconds = amount, fields["run_seconds"]
    request_settlement(payment)


def is_duplicate(exc: IntegrityError) -> bool:
    """The insert broke a uniqueness constraint (the same authorization, or its prediction), not
    another constraint (a check, a foreign key): only the former is a replay."""
    return getattr(exc.__cause__, "sqlstate", None) == UNIQUE_VIOLATION


def retry(payment: Payment) -> Payment:
    """A failed attempt whose identical proof was just verified again (nonce unused, balance
    sufficient) is settled again: LAPSING -> VERIFIED. Our own decision not to settle (a
    release) is never undone."""
    with transaction.atomic():
        locked = Payment.objects.select_for_update().get(pk=payment.pk)
        if locked.status == PaymentStatus.LAPSING and UnpaidReason(locked.unpaid_reason).retryable:
            # The earlier attempt was mined without paying (or never signed): nothing of it is
            # left to watch; its hash stays in the event. A third party's later use of the
            # authorization is found by the next attempt's simulation and resolve_lapsing.
            locked.advance(
                PaymentStatus.VERIFIED,
                unpaid_reason="",
                failure_reason="",
                settle_requested_at=timezone.now(),
                settle_tx_hash=None,
                settlement_tx=None,
                settlement_index=None,
                detail={"retry": "the identical proof verified again", "earlier_tx": locked.settle_tx_hash},
            )
        return locked


def release(payment: Payment, reason: str) -> None:
    """We will not settle this VERIFIED authorization (the agent is not charged).

    It goes LAPSING, not EXPIRED: anyone holding it may still submit it until it lapses, and
    only the chain can say afterwards that it was never used (``lapsing.resolve_lapsing``).
    """
    locked = Payment.objects.select_for_update().get(pk=payment.pk)
    if locked.status == PaymentStatus.VERIFIED:
        locked.advance(
            PaymentStatus.LAPSING,
            unpaid_reason=UnpaidReason.RELEASED,
            failure_reason=f"released unsettled: {reason}",
        )


def settlement_answer(payment: Payment) -> dict[str, Any]:
    """The x402 ``SettleResponse`` for ``payment`` as it stands now (``PAYMENT-RESPONSE``, the
    MCP result's ``_meta``).

    ``success`` is true only once the transfer is mined (settled or confirmed), and then carries
    its transaction hash: the specification requires a hash with every success. Settlement
    is deferred here (in batches, after the answer), so until then the answer is ``success:
    false`` with ``errorReason: settlement_pending`` (the SDK's code for a settlement not yet
    final) and the hash of a transaction already broadcast, if any; the request was accepted
    all the same (2xx), and the prediction's ``payment`` shows the outcome later. A payment
    that ended unpaid, or that we released (an upto run charged nothing, a failed
    ``after_success`` run), will never be settled: it says so (``invalid_transaction_state``)
    with the amount actually charged, 0, not the signed maximum.
    """
    paid = payment.status in PAID_STATUSES and bool(payment.settle_tx_hash)
    # Released and not (yet) found paid on chain; once the chain says someone paid it, the
    # ledger follows it (SETTLING, the reason cleared) and so does this answer.
    released = payment.is_released and payment.status == PaymentStatus.LAPSING
    unpaid = not paid and (payment.status in UNPAID_STATUSES or released)
    reason = None
    if not paid:
        reason = SETTLEMENT_FAILED if unpaid else SETTLEMENT_PENDING
    return settle_response(
        success=paid,
        transaction=payment.settle_tx_hash or "",
        network=payment.network,
        payer=payment.payer,
        amount=payment.charged_atomic if unpaid else int(payment.amount),
        error_reason=reason,
    )


#: A VERIFIED payment whose settlement was asked for this long ago lost its task (broker outage...).
SWEEP_AFTER = timedelta(seconds=30)


def resend_lost(refilled: Collection[str] = ()) -> int:
    """Re-enqueue VERIFIED payments whose settle task was lost (a broker outage...): the batcher
    of a batched option (once), else the payment's own task. How many were sent again.
    ``refilled``: networks where a lane that could not pay can pay again
    (settlement.recheck_lanes): the payments that waited for one are sent their way now."""
    swept = 0
    stale = timezone.now() - SWEEP_AFTER
    batched = timezone.now() - timedelta(seconds=2 * x402.settlement.batch_max_age_seconds)
    waited = Q(network__in=list(refilled))
    ready = Payment.objects.filter(status=PaymentStatus.VERIFIED).filter(
        Q(settle_requested_at__lt=max(stale, batched)) | waited
    )
    for network, asset in ready.values_list("network", "asset").distinct().order_by():
        try:
            conf = for_payment(network, asset)
        except LookupError:
            continue
        if conf.mode == SettlementMode.BATCH:
            batching.kick(conf, delay=0)
            swept += 1
            continue
        lost = ready.filter(network=network, asset=asset).filter(Q(settle_requested_at__lt=stale) | waited)
        for pk in lost.values_list("pk", flat=True):
            dispatch.send(dispatch.SETTLE_PAYMENT, str(pk))
            swept += 1
    return swept
