"""The layer between hostile bytes and the code: what a client sends is refused with a 400
problem+json before any view can choke on it (a 500) or PostgreSQL can refuse it (a 500 too).

- ``RefuseUnsafeInput`` (middleware): the path, the query string and every header value must
  be UTF-8 without control characters (NUL above all: PostgreSQL stores no NUL in text).
- ``x402site.parsers.JSONParser`` (DRF's default parser here) does the same for bodies.
- ``ascii_uint``: the one way to read a number from a header: ASCII digits, bounded length
  (``str.isdigit()`` accepts "²", ``int()`` accepts "٣" and raises on 5,000 digits).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from x402site.exceptions import problem_response

#: Control characters (tab excepted) have no place in a path, a query or a header value.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _clean_text(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _CONTROL.search(text) is None


def _wsgi_bytes(value: str) -> bytes:
    """A WSGI value as the client sent it (PEP 3333 carries bytes as Latin-1 characters;
    some servers, e.g. Django's test servers, hand over decoded text instead)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def unsafe_part(request: HttpRequest) -> str | None:
    """The name of the first part of ``request`` that is not clean UTF-8 text, if any."""
    environ = request.META
    if not _clean_text(_wsgi_bytes(environ.get("PATH_INFO", "/"))):
        return "the path"
    if not _clean_text(unquote_to_bytes(_wsgi_bytes(environ.get("QUERY_STRING", "")))):
        return "the query string"
    for key, value in environ.items():
        is_header = key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH")
        if is_header and isinstance(value, str) and not _clean_text(_wsgi_bytes(value)):
            return f"the {key.removeprefix('HTTP_').replace('_', '-').title()} header"
    return None


class RefuseUnsafeInput:
    """400 problem+json for a request whose path, query or headers are not clean UTF-8 text;
    413 for a body declared larger than ``DATA_UPLOAD_MAX_MEMORY_SIZE``."""

    sync_capable = async_capable = True  # under ASGI, async views stay on the event loop

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        refusal = self.refusal(request)
        if iscoroutinefunction(self):
            return self._acall(request, refusal)
        return refusal or self.get_response(request)

    async def _acall(self, request: HttpRequest, refusal: HttpResponse | None) -> HttpResponse:
        return refusal or await self.get_response(request)

    @staticmethod
    def refusal(request: HttpRequest) -> HttpResponse | None:
        part = unsafe_part(request)
        if part is not None:
            return problem_response(400, f"{part} must be UTF-8 text without control characters")
        declared = request.META.get("CONTENT_LENGTH") or "0"
        length = ascii_uint(declared.strip(), 18)
        if length is None:
            return problem_response(400, "Content-Length must be a number of bytes")
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and length > limit:
            return problem_response(413, f"The request body is larger than {limit} bytes.")
        return None


def ascii_uint(text: str, max_digits: int) -> int | None:
    """``text`` as a non-negative integer of 1 to ``max_digits`` ASCII digits, else None."""
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None
