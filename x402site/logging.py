"""Structured JSON logs carrying the request id (and payment or prediction ids when given).

A middleware takes ``X-Request-ID`` (or makes one), keeps it in a context variable for every
log line of the request, and echoes it in the response. Log calls add ``payment_id`` or
``prediction_id`` with ``extra={...}``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestIdMiddleware:
    sync_capable = async_capable = True  # under ASGI, async views stay on the event loop

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        rid, token = self._enter(request)
        try:
            response = self.get_response(request)
        finally:
            request_id.reset(token)
        response["X-Request-ID"] = rid
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        rid, token = self._enter(request)
        try:
            response = await self.get_response(request)
        finally:
            request_id.reset(token)
        response["X-Request-ID"] = rid
        return response

    @staticmethod
    def _enter(request: HttpRequest) -> tuple[str, contextvars.Token[str]]:
        given = request.headers.get("X-Request-ID", "")
        rid = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        return rid, request_id.set(rid)


class JsonFormatter(logging.Formatter):
    FIELDS = ("payment_id", "prediction_id", "network", "reason")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if rid := request_id.get():
            entry["request_id"] = rid
        for name in self.FIELDS:
            if hasattr(record, name):
                entry[name] = str(getattr(record, name))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
