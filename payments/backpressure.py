"""Backpressure: refuse payments the settlement backlog could not settle before they lapse.

An authorization is valid for the challenge's ``maxTimeoutSeconds``. While the oldest ready
payment (verified, settlement asked for, not yet in a transaction) has waited longer than
``X402_BACKPRESSURE_FRACTION`` of the shortest ``maxTimeoutSeconds``, settlement is not keeping
up and new payments would risk lapsing unsettled: the gate answers 503 with ``Retry-After``
instead of accepting them. The backlog's age is read at most once a second per process (one
index lookup), so the paid request's hot path stays cheap.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from django.db.models import Min
from django.utils import timezone

from payments.models import Payment, PaymentStatus
from payments.options import configured
from x402site.conf import x402

S = PaymentStatus
#: How long one process trusts its last reading of the backlog's age.
CACHE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Backlog:
    ready: int
    #: Seconds since the oldest payment still waiting for settlement (ready, or in a transaction
    #: not yet mined) asked for it; 0 when none waits.
    oldest_age: float


def backlog() -> Backlog:
    """The settlement backlog now (for metrics: a count, so not on the hot path)."""
    waiting = Payment.objects.filter(settle_requested_at__isnull=False)
    ready = waiting.filter(status=S.VERIFIED).count()
    oldest = waiting.filter(status__in=[S.VERIFIED, S.SETTLING]).aggregate(t=Min("settle_requested_at"))["t"]
    return Backlog(ready, (timezone.now() - oldest).total_seconds() if oldest else 0.0)


class _OldestReady:
    """When the oldest ready payment asked for settlement, re-read at most every CACHE_SECONDS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at = -1e9
        self._oldest: float | None = None

    def age(self) -> float:
        now = time.monotonic()
        if now - self._read_at > CACHE_SECONDS:
            with self._lock:
                if now - self._read_at > CACHE_SECONDS:
                    oldest = (
                        Payment.objects.filter(status=S.VERIFIED, settle_requested_at__isnull=False)
                        .aggregate(t=Min("settle_requested_at"))["t"]
                    )
                    self._oldest = oldest.timestamp() if oldest else None
                    self._read_at = now
        return 0.0 if self._oldest is None else max(0.0, time.time() - self._oldest)

    def forget(self) -> None:
        self._read_at = -1e9


oldest_ready = _OldestReady()


def limit_seconds() -> float:
    """The backlog age past which new payments are refused."""
    shortest = min((c.option.max_timeout_seconds for c in configured()), default=300)
    return x402.settlement.backpressure_fraction * shortest


def overloaded() -> bool:
    """True when a new payment should be refused (the gate counts it in the metrics)."""
    if x402.settlement.backpressure_fraction <= 0:
        return False
    return oldest_ready.age() > limit_seconds()
