"""Webhooks the way Replicate sends them (Standard Webhooks), with an SSRF guard.

Each event is POSTed as the prediction object with ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``; receivers get the
secret (``whsec_...``) from ``GET /v1/webhooks/default/secret`` with an operator token.
Deliveries are retried with exponential backoff; URLs resolving to loopback, private,
link-local or reserved addresses are refused unless ``X402_WEBHOOK_ALLOW_PRIVATE`` is set.

The name is resolved once per delivery, by the check, and the request goes to the address
that passed it (TLS still verifies the certificate for the name): a DNS answer that changes
between the check and the connection (rebinding) cannot steer the request inward.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from celery import shared_task
from django.utils.crypto import salted_hmac
from kombu.exceptions import OperationalError
from requests.adapters import HTTPAdapter

from x402site.conf import x402

log = logging.getLogger("predictions.webhooks")

EVENTS = ("start", "output", "logs", "completed")
MAX_ATTEMPTS = 6
#: Seconds a webhook host name may take to resolve; slower is a refusal (requests wait on it).
DNS_TIMEOUT = 2.0
#: Resolutions run here, so a request waits at most DNS_TIMEOUT (getaddrinfo has no timeout).
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


class UnsafeWebhook(ValueError):
    pass


def secret() -> str:
    """The signing secret, ``whsec_`` + base64: from the environment, else derived from
    SECRET_KEY for this one purpose (a keyed derivation: it reveals nothing of the key)."""
    if x402.webhooks.secret:
        return x402.webhooks.secret
    derived = salted_hmac("predictions.webhooks.secret", "whsec", algorithm="sha256").digest()
    return "whsec_" + base64.b64encode(derived).decode()


def sign(webhook_id: str, timestamp: int, body: bytes, key: str | None = None) -> str:
    raw = base64.b64decode((key or secret()).removeprefix("whsec_"))
    mac = hmac.new(raw, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@dataclass(frozen=True, slots=True)
class Target:
    """A webhook URL that passed the check, and the addresses its host resolved to then
    (none when private addresses are allowed: there is nothing to pin)."""

    url: str
    hostname: str
    host_header: str
    addresses: tuple[str, ...] = ()


def _resolve(hostname: str, port: int) -> list[str]:
    future = _resolver.submit(socket.getaddrinfo, hostname, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=DNS_TIMEOUT)
    except TimeoutError:
        future.cancel()
        raise UnsafeWebhook(f"webhook host did not resolve within {DNS_TIMEOUT:g} s") from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise UnsafeWebhook(f"webhook host does not resolve: {exc}") from None
    return [info[4][0] for info in infos]


def check_url(url: str) -> Target:
    """Refuse URLs that are not http(s) or that resolve to an address we must not call."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        hostname = parts.hostname or ""
        ascii_host = hostname.encode("idna").decode("ascii") if hostname else ""
    except (ValueError, UnicodeError):  # "http://[::1", a port out of range, a bad name
        raise UnsafeWebhook("webhook must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise UnsafeWebhook("webhook must be an http(s) URL")
    if parts.username or parts.password:
        raise UnsafeWebhook("webhook URL must not carry credentials")
    host_header = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    if parts.port is not None:
        host_header += f":{parts.port}"
    if x402.webhooks.allow_private:
        return Target(url=url, hostname=hostname, host_header=host_header)
    addresses = _resolve(hostname, port)
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if not address.is_global or address.is_multicast:
            raise UnsafeWebhook(f"webhook host resolves to a non-public address ({address})")
    if not addresses:
        raise UnsafeWebhook("webhook host does not resolve")
    return Target(url=url, hostname=hostname, host_header=host_header, addresses=tuple(addresses))


class _PinnedAdapter(HTTPAdapter):
    """Connections for a URL whose host is an address: TLS names (SNI) and verifies the
    certificate for the original host name."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(server_hostname=self.hostname, assert_hostname=self.hostname)
        super().init_poolmanager(*args, **kwargs)


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> requests.Response:
    """POST to the address the check vetted (no second resolution), never following redirects."""
    if not target.addresses:
        return requests.post(target.url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    parts = urlsplit(target.url)
    address = target.addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    if parts.port:
        netloc += f":{parts.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    with requests.Session() as session:
        session.mount(f"{parts.scheme}://", _PinnedAdapter(target.hostname))
        return session.post(
            pinned,
            data=body,
            headers={**headers, "Host": target.host_header},
            timeout=timeout,
            allow_redirects=False,
        )


def wanted(prediction: Any, event: str) -> bool:
    return bool(prediction.webhook) and event in (prediction.webhook_events_filter or EVENTS)


def send(prediction: Any, event: str) -> None:
    """Queue one event for delivery (after the current transaction commits), with the
    prediction as it stands then: a retried or late delivery carries the state of its event."""
    if not wanted(prediction, event):
        return
    from django.db import transaction

    from .models import Prediction
    from .serializers import prediction_json

    webhook_id = f"msg_{uuid.uuid4().hex}"

    def enqueue() -> None:
        current = Prediction.objects.select_related("payment", "model").get(pk=prediction.id)
        snapshot = prediction_json(current, x402.http.public_url)
        try:
            deliver.delay(prediction.id, event, webhook_id, snapshot)
        except (OperationalError, OSError) as exc:  # never fail the request for a webhook
            log.error("webhook %s (%s) for %s not queued: %s", webhook_id, event, prediction.id, exc)

    transaction.on_commit(enqueue)


@shared_task(bind=True, acks_late=True, max_retries=MAX_ATTEMPTS - 1)
def deliver(
    self: Any, prediction_id: str, event: str, webhook_id: str, snapshot: dict[str, Any] | None = None
) -> str:
    from .models import Prediction
    from .serializers import prediction_json

    prediction = Prediction.objects.select_related("payment", "model").get(pk=prediction_id)
    body = json.dumps(snapshot or prediction_json(prediction, x402.http.public_url)).encode()
    timestamp = int(time.time())
    try:
        response = post(
            check_url(prediction.webhook),
            body,
            headers={
                "Content-Type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(webhook_id, timestamp, body),
            },
            timeout=10,
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
