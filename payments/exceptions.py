"""The x402 challenge as a DRF exception and its 402 answer.

A 402 carries the v2 challenge in the ``PAYMENT-REQUIRED`` header and the v1 challenge as its
JSON body, so both generations of clients can pay; a browser gets the paywall page with the same
headers. Every other error is the site's problem-details JSON (x402site/exceptions.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.http import HttpResponse
from django.template.loader import render_to_string
from rest_framework import exceptions, status
from rest_framework.response import Response

from payments import idempotency
from payments.x402.codec import encode_header
from payments.x402.types import Requirement, Resource, payment_required_v1, payment_required_v2

log = logging.getLogger("payments.api")

PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"


@dataclass(frozen=True, slots=True)
class Challenge:
    """The requirements of one request; builds the 402 responses that ask for them."""

    requirements: list[Requirement]
    resource: Resource
    #: Requirements at earlier prices, accepted but no longer offered.
    honoured: list[Requirement] = field(default_factory=list)
    extensions: dict[str, Any] = field(default_factory=dict)
    output_schema: dict[str, Any] | None = None
    #: For the paywall page: the price in USD(C) and an input to show in the example.
    price_usd: Decimal = Decimal(0)
    example_input: dict[str, Any] = field(default_factory=dict)

    def reject(self, error: str, message: str = "") -> PaymentRequired:
        return PaymentRequired(self, error, message)

    def payment_required(self, error: str) -> dict[str, Any]:
        """The x402 v2 PaymentRequired object (the ``PAYMENT-REQUIRED`` header, the paywall
        page's requirement, the MCP payment-required tool result)."""
        return payment_required_v2(
            self.requirements, self.resource, error, extensions={**idempotency.ADVERTISED, **self.extensions}
        )


class PaymentRequired(exceptions.APIException):
    status_code = status.HTTP_402_PAYMENT_REQUIRED
    default_detail = "Payment required"

    def __init__(self, challenge: Challenge, error: str, message: str = "") -> None:
        super().__init__(message or error)
        self.challenge = challenge
        self.error = error
        self.message = message or error
        #: Seconds after which a retry may succeed (``Retry-After``), e.g. a busy channel.
        self.retry_after: int | None = None


class ServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Payment verification is temporarily unavailable; retry shortly."


class SettlementBacklogged(exceptions.APIException):
    """Settlement is behind: a payment accepted now could lapse before it is settled."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Settlement is behind; this payment is not accepted now. Retry after the delay given."

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.retry_after = retry_after


def count_refusal(exc: PaymentRequired) -> None:
    """Count a 402 in the metrics: a challenge to an unpaid request, or a refused payment."""
    from payments.metrics import CHALLENGES, REJECTED

    if exc.error.endswith(" is required"):
        CHALLENGES.inc()
    else:
        REJECTED.labels(reason=exc.error[:64]).inc()


def payment_required_response(exc: PaymentRequired) -> Response:
    count_refusal(exc)
    ch = exc.challenge
    body = payment_required_v1(ch.requirements, ch.resource, exc.error, ch.output_schema)
    if exc.message != exc.error:
        body["message"] = exc.message
    header = encode_header(ch.payment_required(exc.error))
    headers = {PAYMENT_REQUIRED_HEADER: header, "Cache-Control": "no-store"}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return Response(body, status=status.HTTP_402_PAYMENT_REQUIRED, headers=headers)


def wants_html(request: Any) -> bool:
    """A browser asking for a page (agents ask for JSON or anything)."""
    accept = request.headers.get("Accept", "") if request is not None else ""
    return "text/html" in accept


def paywall_response(
    exc: PaymentRequired, json_response: Response, fields: dict[str, Any] | None = None
) -> HttpResponse:
    """The same challenge as a page a person pays with a browser wallet (``static/paywall/``),
    with the same 402 and headers. The page prices the visitor's own input with this endpoint's
    JSON 402 before it signs, so it pays exactly what an agent would. ``fields``: the request's
    other body fields (``version``, ``webhook``...), sent again with the input."""
    ch = exc.challenge
    body = render_to_string(
        "paywall.html",
        {
            "description": ch.resource.description,
            "url": ch.resource.url,
            "price": f"{ch.price_usd.normalize():f}",
            "requirements": [r.v2() for r in ch.requirements],
            "example": json.dumps(ch.example_input),
            "example_input": ch.example_input,
            "payment_required": ch.payment_required(exc.error),
            "input_schema": _input_schema(ch),
            "decimals": {r.option.asset: r.option.decimals for r in ch.requirements},
            "fields": fields or {},
        },
    )
    response = HttpResponse(body, status=402, content_type="text/html; charset=utf-8")
    for name in (PAYMENT_REQUIRED_HEADER, "Cache-Control"):
        response[name] = json_response[name]
    return response


def _input_schema(ch: Challenge) -> dict[str, Any]:
    """The input's JSON Schema, as the challenge describes the request (its v1 outputSchema)."""
    described = (ch.output_schema or {}).get("input", {})
    body = described.get("body", {}) if isinstance(described, dict) else {}
    schema = body.get("properties", {}).get("input") if isinstance(body, dict) else None
    return schema if isinstance(schema, dict) else {"type": "object"}


def payment_required_answer(exc: PaymentRequired, request: Any) -> Response | HttpResponse:
    """A 402: the JSON challenge, or for a browser the paywall page with the same headers."""
    response = payment_required_response(exc)
    if not wants_html(request):
        return response
    data = getattr(request, "data", None)
    fields = {k: v for k, v in data.items() if k != "input"} if isinstance(data, dict) else {}
    return paywall_response(exc, response, fields)
