"""The site's error format: problem-details JSON in the shape Replicate uses (``title``,
``detail``, ``status``) for every error of the API and of Django itself (x402site/errors.py),
as DRF's exception handler. A 402 is the x402 challenge (payments/exceptions.py)."""

from __future__ import annotations

import logging
from typing import Any

from django import db
from django.http import Http404, HttpResponse, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from payments.exceptions import PaymentRequired, payment_required_answer

log = logging.getLogger("x402site.api")


class DatabaseUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The service is briefly unavailable; retry shortly."


class InvalidInput(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "Invalid input"

    def __init__(self, detail: str, fields: dict[str, str]) -> None:
        super().__init__(detail)
        self.fields = fields


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


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | HttpResponse | None:
    if isinstance(exc, PaymentRequired):
        return payment_required_answer(exc, context.get("request"))
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
    if retry_after := getattr(exc, "retry_after", None):
        response.headers["Retry-After"] = str(retry_after)  # e.g. SettlementBacklogged's
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        response.headers["Retry-After"] = str(max(1, int(exc.wait + 0.999)))
    return response
