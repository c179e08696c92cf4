"""Webhooks the way Replicate sends them (Standard Webhooks), with an SSRF guard.

Each event is POSTed as the prediction object with ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``; receivers get the
secret (``whsec_...``) from ``GET /v1/webhooks/default/secret`` with an operator token.
Deliveries are retried with exponential backoff; URLs resolving to loopback, private,
link-local or reserved addresses are refused unless ``X402_WEBHOOK_ALLOW_PRIVATE`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import requests
from celery import shared_task
from django.conf import settings
from kombu.exceptions import OperationalError

log = logging.getLogger("predictions.webhooks")

EVENTS = ("start", "output", "logs", "completed")
MAX_ATTEMPTS = 6


class UnsafeWebhook(ValueError):
    pass


def secret() -> str:
    """The signing secret, ``whsec_`` + base64: from the environment, else derived from SECRET_KEY."""
    if settings.X402_WEBHOOK_SECRET:
        return settings.X402_WEBHOOK_SECRET
    derived = hashlib.sha256(f"webhook:{settings.SECRET_KEY}".encode()).digest()
    return "whsec_" + base64.b64encode(derived).decode()


def sign(webhook_id: str, timestamp: int, body: bytes, key: str | None = None) -> str:
    raw = base64.b64decode((key or secret()).removeprefix("whsec_"))
    mac = hmac.new(raw, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def check_url(url: str) -> None:
    """Refuse URLs that are not http(s) or that resolve to an address we must not call."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhook("webhook must be an http(s) URL")
    if parts.username or parts.password:
        raise UnsafeWebhook("webhook URL must not carry credentials")
    if settings.X402_WEBHOOK_ALLOW_PRIVATE:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeWebhook(f"webhook host does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise UnsafeWebhook(f"webhook host resolves to a non-public address ({address})")


def wanted(prediction: Any, event: str) -> bool:
    return bool(prediction.webhook) and event in (prediction.webhook_events_filter or EVENTS)


def send(prediction: Any, event: str) -> None:
    """Queue one event for delivery (after the current transaction commits)."""
    if not wanted(prediction, event):
        return
    from django.db import transaction

    webhook_id = f"msg_{uuid.uuid4().hex}"

    def enqueue() -> None:
        try:
            deliver.delay(prediction.id, event, webhook_id)
        except (OperationalError, OSError) as exc:  # never fail the request for a webhook
            log.error("webhook %s (%s) for %s not queued: %s", webhook_id, event, prediction.id, exc)

    transaction.on_commit(enqueue)


@shared_task(bind=True, acks_late=True, max_retries=MAX_ATTEMPTS - 1)
def deliver(self: Any, prediction_id: str, event: str, webhook_id: str) -> str:
    from .models import Prediction
    from .serializers import prediction_json

    prediction = Prediction.objects.select_related("payment", "model").get(pk=prediction_id)
    body = json.dumps(prediction_json(prediction, settings.X402_PUBLIC_URL)).encode()
    timestamp = int(time.time())
    try:
        check_url(prediction.webhook)
        response = requests.post(
            prediction.webhook,
            data=body,
            headers={
                "Content-Type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(webhook_id, timestamp, body),
            },
            timeout=10,
            allow_redirects=False,
        )
        if response.status_code >= 300:
            raise requests.HTTPError(f"HTTP {response.status_code}")
    except UnsafeWebhook as exc:
        log.warning("webhook for %s refused: %s", prediction_id, exc)
        return "refused"
    except requests.RequestException as exc:
        log.info("webhook %s (%s) for %s failed: %s", webhook_id, event, prediction_id, exc)
        raise self.retry(countdown=min(2**self.request.retries, 60)) from None
    return "delivered"
