"""Prometheus metrics of the payment gate, settlement and predictions.

Counters are incremented where things happen; ledger gauges (pending value, confirmation lag,
payments by status) are read from the database at scrape time, so every process agrees.
With several gunicorn workers set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode) so counters are summed across processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

CHALLENGES = Counter("x402_challenges_total", "402 challenges issued (unpaid requests to paid resources)")
ACCEPTED = Counter("x402_payments_accepted_total", "Payments verified and recorded", ["network"])
REJECTED = Counter("x402_payments_rejected_total", "Payment headers refused", ["reason"])
SETTLEMENT_SECONDS = Histogram(
    "x402_settlement_seconds",
    "From payment recorded to settlement confirmed",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
RECONCILE_ERRORS = Counter(
    "x402_reconcile_errors_total", "Ledger rows whose reconciliation raised (retried with backoff)", ["step"]
)
BATCH_SIZE = Histogram(
    "x402_settlement_batch_size",
    "Payments per batched settlement transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
EXPIRIES = Counter(
    "x402_settlement_expiries_total",
    "Payments whose authorization lapsed unsettled (EXPIRED), by why they went lapsing",
    ["reason"],
)
REFUND_BROADCAST_ERRORS = Counter(
    "x402_refund_broadcast_errors_total",
    "Refund transfers the node refused to take (e.g. the refund wallet is out of gas money)",
)
UNFUNDED_BROADCASTS = Counter(
    "x402_relayer_unfunded_broadcasts_total",
    "Transactions of a relayer lane or the refund wallet the node refused for lack of gas money",
    ["network"],
)
BACKPRESSURE = Counter(
    "x402_backpressure_rejections_total", "Paid requests answered 503 because the settlement backlog is too old"
)
PREDICTION_SECONDS = Histogram(
    "x402_prediction_seconds",
    "Prediction run time",
    ["model"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900),
)


class LedgerCollector(Collector):
    """Gauges computed from the ledger at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from django.db.models import Count, Min, Sum
        from django.utils import timezone

        from payments.backpressure import backlog
        from payments.models import OPEN_STATUSES, Payment, PaymentStatus, RelayerNonce

        by_status = GaugeMetricFamily("x402_payments", "Payments in the ledger by status", labels=["status"])
        for row in Payment.objects.values("status").annotate(n=Count("id")):
            by_status.add_metric([row["status"]], row["n"])
        yield by_status
        pending = GaugeMetricFamily("x402_pending_settlement_usd", "Value verified but not yet confirmed")
        total = Decimal(0)
        for row in (
            Payment.objects.filter(status__in=OPEN_STATUSES).values("decimals").annotate(a=Sum("amount"))
        ):
            total += Decimal(row["a"]).scaleb(-row["decimals"])
        pending.add_metric([], float(total))
        yield pending
        lag = GaugeMetricFamily(
            "x402_confirmation_lag_seconds", "Age of the oldest settled, unconfirmed payment"
        )
        oldest = Payment.objects.filter(status=PaymentStatus.SETTLED).aggregate(t=Min("settled_at"))["t"]
        lag.add_metric([], (timezone.now() - oldest).total_seconds() if oldest else 0.0)
        yield lag
        now = backlog()
        size = GaugeMetricFamily("x402_settlement_backlog", "Payments ready to settle, not yet in a transaction")
        size.add_metric([], now.ready)
        yield size
        age = GaugeMetricFamily(
            "x402_settlement_oldest_unsettled_seconds",
            "Since the oldest payment waiting for settlement (ready, or in an unmined transaction) asked for it",
        )
        age.add_metric([], now.oldest_age)
        yield age
        unfunded = GaugeMetricFamily(
            "x402_relayer_lane_unfunded",
            "1 for a relayer lane (or the refund wallet) that cannot pay for gas: it takes no new transactions",
            labels=["network", "address"],
        )
        for network, address, since in RelayerNonce.objects.values_list("network", "address", "unfunded_since"):
            unfunded.add_metric([network, address], 0 if since is None else 1)
        yield unfunded


def render() -> bytes:
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    registry_with_ledger = CollectorRegistry()
    registry_with_ledger.register(LedgerCollector())
    return generate_latest(registry) + generate_latest(registry_with_ledger)


def on_payments_advanced(payments, previous: list[str], **kwargs) -> None:  # type: ignore[no-untyped-def]
    for payment, before in zip(payments, previous, strict=True):
        on_payment_advanced(payment, before)


def on_payment_advanced(payment, previous: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
    from payments.models import PaymentStatus

    if payment.status == PaymentStatus.CONFIRMED and payment.confirmed_at and payment.created_at:
        SETTLEMENT_SECONDS.observe((payment.confirmed_at - payment.created_at).total_seconds())
    elif payment.status == PaymentStatus.EXPIRED:
        EXPIRIES.labels(reason=payment.unpaid_reason or "unknown").inc()
