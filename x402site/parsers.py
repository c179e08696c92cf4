"""DRF's JSON parser with the limits a hostile client calls for (the default parser here).

Bodies of at most ``DATA_UPLOAD_MAX_MEMORY_SIZE`` bytes (413 beyond), strict UTF-8 JSON (the
declared charset is ignored: JSON between systems is UTF-8, RFC 8259), finite numbers, bounded
nesting, and no NUL or lone surrogate in any string, which PostgreSQL would refuse with a 500
(``payments.x402.codec.loads``, shared with the payment headers). Anything else is a 400.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import APIException, ParseError

from payments.x402.codec import DecodeError, loads

#: Request bodies nest no deeper than this (model inputs are shallow objects).
MAX_BODY_DEPTH = 32


class PayloadTooLarge(APIException):
    status_code = 413
    default_detail = "The request body is too large."


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser with the limits above."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        try:
            return loads(raw, MAX_BODY_DEPTH)
        except DecodeError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
