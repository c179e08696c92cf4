"""A synchronous httpx transport that pays x402 challenges: give it to any httpx-based client.

The official SDK ships an async httpx transport; the ``replicate`` client (and many others)
use a synchronous ``httpx.Client``, so this is the same idea for them:

    transport = X402Transport(client)           # an x402ClientSync with a signer registered
    replicate.Client(base_url=..., transport=transport)
"""

from __future__ import annotations

import json

import httpx
from x402 import x402ClientSync
from x402.http import x402HTTPClientSync


class X402Transport(httpx.BaseTransport):
    """On a 402, sign a payment for the offered requirements and send the request once more."""

    def __init__(self, client: x402ClientSync, wrapped: httpx.BaseTransport | None = None) -> None:
        self.client = client
        self.http = x402HTTPClientSync(client)
        self.wrapped = wrapped or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.wrapped.handle_request(request)
        if response.status_code != 402 or "PAYMENT-SIGNATURE" in request.headers:
            return response
        response.read()
        try:
            body = json.loads(response.content or b"null")
        except ValueError:
            body = None
        required = self.http.get_payment_required_response(response.headers.get, body)
        headers = self.http.encode_payment_signature_header(self.client.create_payment_payload(required))
        paid = httpx.Request(
            request.method, request.url, headers={**request.headers, **headers}, content=request.content
        )
        return self.wrapped.handle_request(paid)

    def close(self) -> None:
        self.wrapped.close()
