"""What a prediction's end means for its payer: the ledger writes it asks for, and the refund
owed. The lifecycle (the one writer of a prediction's status) calls these in the transaction
that ends the prediction, so they are never lost or half-done.

- A success under ``after_success`` asks for settlement (``ledger.request_settlement``); paid
  per second (``upto``), its measured seconds are charged instead (:func:`bill_success`).
- An end without output releases an authorization not yet being settled (``ledger.release``);
  paid per second, the measured run is charged instead (``ledger.charge_usage``: its seconds at
  its time limit or when its payer cancels it; its price's failure charge when it failed on our
  side or an operator canceled it) (:func:`bill_unserved`).
- An end without output whose payment is confirmed under ``before_run`` is owed a refund
  (``refunds.owe``) when it failed on our side before any output left, or ended before its
  run started (:func:`refund_cause`); so is any payment paid although we released it
  (:func:`refund_if_owed`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from django.utils import timezone

from payments import ledger, refunds
from payments.channels import charges as channel_charges
from payments.ledger import RunEnd
from payments.models import CHARGED_STATUSES, Payment, PaymentStatus
from payments.pricing import UsagePrice

from .models import Prediction, PredictionEvent, PredictionStatus, SettlementPolicy
from .runclock import run_seconds

P = PredictionStatus

#: Ends without output: an authorization not yet being settled is released (nothing charged).
ENDED_UNSERVED = frozenset({P.FAILED, P.CANCELED, P.ABORTED})


class RefundCause(StrEnum):
    """Why a prediction that ended unserved is, or is not, owed a refund (on the OWED event, for
    finance): see :attr:`owed`."""

    #: The run failed on our side (predictor error, runner lost) before any output left.
    FAILED = "failed"
    #: Canceled or aborted before the run started (on its runner): nothing was computed.
    NOT_STARTED = "ended_before_run"
    #: Canceled by an operator (our decision, not the payer's), whenever.
    OPERATOR = "canceled_by_operator"
    #: Stopped at its time limit: the compute was used as asked (the payer's input decides how
    #: long it runs), as Replicate bills it. Not owed.
    TIME_LIMIT = "time_limit"
    #: Failed after output pieces were delivered (a before_run run streams them while it
    #: runs): the payer has part of what it paid for. Not owed.
    FAILED_AFTER_OUTPUT = "failed_after_output"
    #: Canceled by its payer after the run started. Not owed.
    CANCELED_RUNNING = "canceled_while_running"
    #: Released unsettled (or refused before the run), then paid on chain by someone who
    #: submitted the authorization: owed whatever the policy (see :func:`refund_if_owed`).
    PAID_ALTHOUGH_RELEASED = "paid_although_released"

    @property
    def owed(self) -> bool:
        return self in {
            RefundCause.FAILED,
            RefundCause.NOT_STARTED,
            RefundCause.OPERATOR,
            RefundCause.PAID_ALTHOUGH_RELEASED,
        }

    @property
    def ours(self) -> bool:
        """Owed for what we did (a failure on our side, an operator's cancel): paid without a
        human under the refund policy. A payer's own cancel (or Cancel-After) before its run,
        and an authorization someone submitted after we released it, are owed too but
        reviewed by finance: otherwise paying, canceling and being refunded is a loop that
        costs the payer nothing and us a settlement and a refund transfer each time."""
        return self in {RefundCause.FAILED, RefundCause.OPERATOR}


def charged(prediction: Prediction) -> bool:
    """Its payment is being or has been settled: aborting it now would charge for nothing."""
    return prediction.payment is not None and prediction.payment.status in CHARGED_STATUSES


def run_record(prediction: Prediction, run_end: RunEnd) -> dict[str, Any]:
    """What the event that ends a run unserved records for the refund policy (read back by
    :func:`ended_run`): how the run ended and how many output pieces its payer may have seen (a
    before_run run streams them while it runs). Call before the output is cleared."""
    pieces = len(prediction.output) if isinstance(prediction.output, list) else 0
    return {"run_end": str(run_end), "output_pieces": pieces}


def ended_run(prediction: Prediction) -> dict[str, Any]:
    """How its run ended (:func:`run_record`, on the event that ended it while it ran), or {}
    when it ended before its run."""
    event = prediction.events.filter(to_status=prediction.status).order_by("-pk").first()
    return event.detail if event is not None else {}


def bill_success(prediction: Prediction, now: datetime) -> None:
    """A run that succeeded with its payment held (``after_success``, not yet confirmed): its
    measured seconds are charged when it is paid per second, else its settlement is asked for."""
    payment = prediction.payment
    if ledger.is_usage_priced(payment):
        ledger.charge_usage(payment, run_seconds(prediction, now), RunEnd.SUCCEEDED)
    else:
        ledger.request_settlement(payment)


def bill_unserved(prediction: Prediction, *, ran: bool, run_end: RunEnd, now: datetime) -> None:
    """A paid prediction just ended unserved (``ran``: it ended while it ran): a run paid per
    second is charged for how it ended (``run_end``), anything else is released; then the
    refund owed, if any (:func:`refund_if_owed`)."""
    payment = prediction.payment
    reason = f"the prediction ended {prediction.status}: {prediction.error}"[:500]
    if ran and ledger.is_usage_priced(payment):
        ledger.charge_usage(payment, run_seconds(prediction, now), run_end, reason=reason)
    else:
        ledger.release(payment, reason)
    refund_if_owed(prediction, payment)


def bill_channel(prediction: Prediction, *, ran: bool, run_end: RunEnd, now: datetime) -> None:
    """A prediction paid with a voucher just ended (``ran``: while it ran). Its channel is
    charged its price when it was served, or when it ended unserved in a way the refund policy
    does not cover (stopped at its time limit, failed after output, canceled by its payer while
    running); nothing when it failed on our side or ended before its run (the payer's next
    voucher then carries the same cumulative). Paid per second, it is charged its measured
    seconds as an ``upto`` run is (``ledger.usage_charge``), within the voucher's ceiling. The
    channel is freed for the payer's next request either way."""
    cause = refund_cause(prediction)
    served = prediction.status == P.SUCCEEDED
    end = RunEnd.SUCCEEDED if served else run_end

    def amount(ceiling: int, usage: dict[str, str]) -> int:
        if usage:
            if not (served or ran):
                return 0
            price = UsagePrice.from_snapshot(usage)
            return ledger.usage_charge(
                price, run_seconds(prediction, now), end, maximum=ceiling, decimals=int(usage["decimals"])
            )
        return ceiling if served or (cause is not None and not cause.owed) else 0

    charged = channel_charges.release(prediction.channel_id, str(prediction.pk), amount)
    if charged is not None and charged.charge is not None:
        prediction.channel_charge = charged.charge
        Prediction.objects.filter(pk=prediction.pk).update(channel_charge=charged.charge)


def refund_cause(prediction: Prediction) -> RefundCause | None:
    """The refund policy, for a prediction that ended unserved: money back only when the
    payer got nothing and it is not the payer's doing: the run failed on our side before any
    output left, or the prediction was canceled or aborted before its run started, or an
    operator canceled it. Not refunded: a run stopped at its time limit (the compute was used as
    asked), a run that failed after streaming output pieces (a before_run payer sees them while
    it runs), a cancel by its payer after the run started; all as Replicate bills runs for the
    time used. "Started" is its runner's confirmation (``run_started_at``; the claim only for
    a runner that has the run at once): a wait for a busy runner is before the run. None: not ended unserved."""
    if prediction.status == P.FAILED:
        run = ended_run(prediction)
        if run.get("run_end") == RunEnd.STOPPED:
            return RefundCause.TIME_LIMIT
        if run.get("output_pieces", 0) > 0:
            return RefundCause.FAILED_AFTER_OUTPUT
        return RefundCause.FAILED
    if prediction.status not in ENDED_UNSERVED:
        return None
    if prediction.started_at is None:
        return RefundCause.NOT_STARTED
    if prediction.events.filter(to_status=P.CANCELED, cause=PredictionEvent.Cause.ADMIN).exists():
        return RefundCause.OPERATOR
    if prediction.run_started_at is None:
        return RefundCause.NOT_STARTED
    return RefundCause.CANCELED_RUNNING


def refund_if_owed(prediction: Prediction, payment: Payment) -> None:
    """A prediction that ended without its output, under a policy that refunds, whose payment
    is confirmed, and that the refund policy covers (:func:`refund_cause`): the payer is owed
    the money back (payments.refunds, once per payment). So is any payment that ends paid
    although we released it unsettled (``settle_requested_at`` never set: an ``after_success``
    authorization someone else submitted after its run failed, or one refused before its run).
    A payment still settling is looked at again when it confirms (``lifecycle.on_payments``).
    The reason names the payment, never the prediction id (a bearer capability)."""
    if payment.status != PaymentStatus.CONFIRMED:
        return
    if payment.settle_requested_at is None and prediction.status != P.SUCCEEDED:
        # Paid although we never asked for it (released, or refused before its run): someone
        # submitted the authorization we let go. Whatever the policy, it is the payer's money.
        refunds.owe(
            payment,
            f"payment {payment.pk}: paid on chain although released unsettled; the prediction ended "
            f"{prediction.status}: {prediction.error}",
            detail={"cause": str(RefundCause.PAID_ALTHOUGH_RELEASED), "prediction_status": prediction.status},
            auto_approve=RefundCause.PAID_ALTHOUGH_RELEASED.ours,
        )
        return
    cause = refund_cause(prediction)
    if cause is not None and cause.owed and SettlementPolicy(prediction.settlement_policy).refunds_unserved:
        seconds = run_seconds(prediction, prediction.completed_at or timezone.now()) if prediction.started_at else 0
        refunds.owe(
            payment,
            f"payment {payment.pk}: the prediction ended {prediction.status} ({cause}): {prediction.error}",
            detail={
                "cause": str(cause),
                "run_seconds": str(seconds),
                "prediction_status": prediction.status,
                "output_pieces": ended_run(prediction).get("output_pieces", 0),
            },
            auto_approve=cause.ours,
        )
