"""HTTP client for an x402 facilitator (``POST /verify``, ``POST /settle``, ``GET /supported``).

Timeouts and transport errors raise :class:`FacilitatorUnavailable`: the caller must treat that
as "unknown", never as a refusal (which would make the agent pay again) nor as a success.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import requests

from payments.chain.node import endpoint
from x402site.conf import x402

log = logging.getLogger("payments.facilitator")

RETRIES = 2


class FacilitatorUnavailable(Exception):
    pass


class FacilitatorClient:
    def __init__(self, url: str, auth: str = "", timeout: float | None = None, retries: int = RETRIES):
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if auth:
            self.headers["Authorization"] = auth
        self.timeout = timeout or x402.facilitator.timeout_seconds
        self.retries = retries

    def _request(self, method: str, path: str, body: dict[str, Any] | None, retry: bool) -> dict[str, Any]:
        attempts = 1 + (self.retries if retry else 0)
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                response = requests.request(
                    method, f"{self.url}{path}", json=body, headers=self.headers, timeout=self.timeout
                )
                if response.status_code >= 500:
                    raise FacilitatorUnavailable(f"{path}: HTTP {response.status_code}")
                data = response.json()
                if not isinstance(data, dict):
                    raise FacilitatorUnavailable(f"{path}: answer is not an object")
                if response.status_code != 200 and "isValid" not in data and "success" not in data:
                    raise FacilitatorUnavailable(f"{path}: HTTP {response.status_code} {data!r:.200}")
                return data
            except (requests.RequestException, ValueError, FacilitatorUnavailable) as exc:
                # A transport error's text carries the URL (which may hold a key): its class only.
                last = exc if isinstance(exc, FacilitatorUnavailable) else FacilitatorUnavailable(
                    f"{path}: {exc.__class__.__name__}"
                )
                log.warning("facilitator %s%s attempt %d failed: %s", endpoint(self.url), path, attempt + 1, last)
                if attempt + 1 < attempts:
                    time.sleep(0.2 * 2**attempt)
        raise FacilitatorUnavailable(str(last))

    @staticmethod
    def _body(version: int, payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
        return {"x402Version": version, "paymentPayload": payload, "paymentRequirements": requirements}

    def verify(self, version: int, payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/verify", self._body(version, payload, requirements), retry=True)

    def settle(self, version: int, payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
        # Resending the identical payload is safe (a facilitator dedups on the authorization),
        # so transport failures are retried with the same body, never with a new payment.
        return self._request("POST", "/settle", self._body(version, payload, requirements), retry=True)

    def supported(self) -> dict[str, Any]:
        return self._request("GET", "/supported", None, retry=True)
