"""The x402 challenge as a DRF exception, and the API's JSON error format.

A 402 carries the v2 challenge in the ``PAYMENT-REQUIRED`` header and the v1 challenge as its
JSON body, so both generations of clients can pay. Other errors are problem-details JSON in the
shape Replicate uses (``title``, ``detail``, ``status``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django import db
from django.http import Http404, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from . import idempotency
from .x402.codec import encode_header
from .x402.types import Requirement, Resource, payment_required_v1, payment_required_v2

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


class DatabaseUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The service is briefly unavailable; retry shortly."


class SettlementBacklogged(exceptions.APIException):
    """Settlement is behind: a payment accepted now could lapse before it is settled."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Settlement is behind; this payment is not accepted now. Retry after the delay given."

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.retry_after = retry_after


class InvalidInput(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "Invalid input"

    def __init__(self, detail: str, fields: dict[str, str]) -> None:
        super().__init__(detail)
        self.fields = fields


def count_refusal(exc: PaymentRequired) -> None:
    """Count a 402 in the metrics: a challenge to an unpaid request, or a refused payment."""
    from .metrics import CHALLENGES, REJECTED

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
    return Response(
        body,
        status=status.HTTP_402_PAYMENT_REQUIRED,
        headers={PAYMENT_REQUIRED_HEADER: header, "Cache-Control": "no-store"},
    )


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    503: "Service unavailable",
}


def problem(status_code: int, detail: str) -> dict[str, Any]:
    """The problem-details body every error of this API has."""
    return {"title": _TITLES.get(status_code, "Error"), "detail": detail, "status": status_code}


def problem_response(status_code: int, detail: str) -> JsonResponse:
    """A problem-details answer outside DRF (middleware, plain Django views)."""
    return JsonResponse(problem(status_code, detail), status=status_code, content_type="application/problem+json")


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


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | HttpResponse | None:
    if isinstance(exc, PaymentRequired):
        response = payment_required_response(exc)
        request = context.get("request")
        if not wants_html(request):
            return response
        data = getattr(request, "data", None)
        fields = {k: v for k, v in data.items() if k != "input"} if isinstance(data, dict) else {}
        return paywall_response(exc, response, fields)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    if isinstance(exc, (db.OperationalError, db.InterfaceError)):
        # The database is down or out of connections: nothing was written that is not
        # rolled back; the client may retry.
        log.error("database unavailable: %s", exc)
        exc = DatabaseUnavailable()
    response = exception_handler(exc, context)
    if response is None:
        return None
    detail = response.data.get("detail") if isinstance(response.data, dict) else response.data
    body = problem(response.status_code, str(detail) if detail is not None else str(response.data))
    if title := getattr(exc, "title", None):
        body["title"] = title  # a more specific title than the status's (as Replicate gives)
    if extensions := getattr(exc, "extensions", None):
        body["extensions"] = extensions  # e.g. the sign-in-with-x challenge of a 401
    if isinstance(exc, InvalidInput):
        body["invalid_fields"] = exc.fields
    elif isinstance(exc, exceptions.ValidationError) and isinstance(exc.detail, dict):
        body["detail"] = "Invalid request"
        body["invalid_fields"] = {
            k: " ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in exc.detail.items()
        }
    response.data = body
    response.content_type = "application/problem+json"
    if response.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
        response.headers.setdefault("Retry-After", "5")
    if isinstance(exc, SettlementBacklogged):
        response.headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        response.headers["Retry-After"] = str(max(1, int(exc.wait + 0.999)))
    return response
