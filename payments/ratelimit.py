"""Per-client limits on challenges and on failed payments (fixed windows in the cache).

An anonymous client that asks for challenges in a loop, or sends payment after bad payment,
gets 429 with ``Retry-After`` instead of costing us a chain read or a signature check each time.
Limits are ``"count/seconds"`` settings (``X402_RATE_LIMITS``, read as ``x402.http.rate_limits``);
``""`` turns one off.
"""

from __future__ import annotations

import time

from django.core.cache import cache
from rest_framework.exceptions import Throttled
from rest_framework.throttling import BaseThrottle

from x402site.conf import x402


def client_address(request) -> str:  # type: ignore[no-untyped-def]
    """The client's address: DRF's throttle identity, which honours only ``NUM_PROXIES``
    (``X402_TRUSTED_PROXIES``) trusted proxies, counted from the right of X-Forwarded-For."""
    return (BaseThrottle().get_ident(request) or "")[:64]


def hit(request, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Count one ``kind`` event ("challenge" or "failed") for this client; 429 over the limit."""
    rule = getattr(x402.http.rate_limits, kind)
    if rule is None:
        return
    count, seconds = rule.count, rule.seconds
    window = int(time.time() // seconds)
    key = f"x402:rate:{kind}:{client_address(request)}:{window}"
    if cache.add(key, 1, seconds + 1):
        used = 1
    else:
        try:
            used = cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.add(key, 1, seconds + 1)
            used = 1
    if used > count:
        raise Throttled(wait=seconds - time.time() % seconds, detail=f"Too many {kind} requests; slow down.")
