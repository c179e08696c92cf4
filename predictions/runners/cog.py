"""The Cog runner: a Cog model server's HTTP API.

``PUT /predictions/{our id}`` with ``Prefer: respond-async`` starts a run idempotently (a retry
starts nothing new); Cog reports progress only through the webhook we give it (it offers no
polling). ``GET /health-check`` is asked before a payment is taken, and
``POST /predictions/{id}/cancel`` stops a run.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import requests
from django.conf import settings
from django.urls import reverse
from django.utils.crypto import salted_hmac

TIMEOUT = 10.0
#: Health answers are reused this long (the check sits on the paid-request path).
HEALTH_TTL = 2.0
_health: dict[str, tuple[float, str]] = {}


class CogError(Exception):
    """Cog refused or could not be reached; ``retry`` says whether trying later can help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def health(base_url: str) -> str:
    """Cog's status: READY, BUSY, STARTING, SETUP_FAILED, DEFUNCT, UNHEALTHY or UNREACHABLE."""
    cached = _health.get(base_url)
    if cached and time.monotonic() - cached[0] < HEALTH_TTL:
        return cached[1]
    try:
        status = requests.get(f"{base_url}/health-check", timeout=3).json().get("status", "UNHEALTHY")
    except (requests.RequestException, ValueError):
        status = "UNREACHABLE"
    _health[base_url] = (time.monotonic(), status)
    return status


def callback_token(prediction_id: str) -> str:
    """The secret part of a run's callback URL: a keyed derivation of SECRET_KEY for this one
    purpose, so it reveals nothing of the key or of any other secret derived from it."""
    return salted_hmac("predictions.runners.cog.callback", prediction_id, algorithm="sha256").hexdigest()


def callback_url(prediction_id: str) -> str:
    path = reverse("cog-webhook", args=[prediction_id, callback_token(prediction_id)])
    return settings.X402_PUBLIC_URL + path


def start(base_url: str, prediction_id: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Start (or find) the run; raises CogError for 409 busy (retry) and 422 bad input (final)."""
    try:
        response = requests.put(
            f"{base_url}/predictions/{prediction_id}",
            json={
                "input": inputs,
                "webhook": callback_url(prediction_id),
                "webhook_events_filter": ["start", "output", "logs", "completed"],
            },
            headers={"Prefer": "respond-async"},
            timeout=TIMEOUT,
        )
    except requests.RequestException as exc:
        raise CogError(f"Cog server unreachable: {exc}", retry=True) from None
    if response.status_code == 409:
        raise CogError("every Cog slot is busy", retry=True)
    if response.status_code == 422:
        raise CogError(f"Cog refused the input: {response.text[:500]}", retry=False)
    if response.status_code == 503 or response.status_code >= 500:
        raise CogError(f"Cog answered {response.status_code}: {response.text[:200]}", retry=True)
    if response.status_code >= 400:
        raise CogError(f"Cog answered {response.status_code}: {response.text[:500]}", retry=False)
    return response.json()


def cancel(base_url: str, prediction_id: str) -> None:
    # If this fails the run ends on its own; our prediction is already canceled.
    with contextlib.suppress(requests.RequestException):
        requests.post(f"{base_url}/predictions/{prediction_id}/cancel", timeout=TIMEOUT)
