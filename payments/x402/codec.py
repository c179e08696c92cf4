"""Base64/JSON codecs for x402 headers, with the limits a hostile client calls for."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

#: Headers above this size are refused before any decoding work (an 8 KiB cap, as in security.md).
MAX_HEADER_BYTES = 8 * 1024
#: JSON nesting deeper than this is refused (clients echo extension schemas, about ten levels deep).
MAX_JSON_DEPTH = 16


class DecodeError(ValueError):
    """A header that is not base64 of a JSON object within the limits."""

    reason = "invalid_payload"


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise DecodeError("JSON nested too deeply")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)


def _reject_constant(name: str) -> None:
    raise DecodeError(f"JSON constant {name} is not allowed")


def decode_header(header: str) -> dict[str, Any]:
    """Decode a base64 (standard or URL-safe alphabet) JSON object header strictly."""
    if len(header) > MAX_HEADER_BYTES:
        raise DecodeError(f"header longer than {MAX_HEADER_BYTES} bytes")
    text = header.strip()
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise DecodeError("header is not ASCII base64") from None
    if b"-" in raw or b"_" in raw:
        raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    raw += b"=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("header is not valid base64") from None
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise DecodeError("header is not valid JSON") from None
    if "\x00" in text or "\\u0000" in text:
        # PostgreSQL cannot store NUL in text or JSON: refuse it here, not with a 500 later.
        raise DecodeError("header JSON contains a NUL character")
    if not isinstance(obj, dict):
        raise DecodeError("header JSON is not an object")
    _check_depth(obj)
    return obj


def encode_header(obj: dict[str, Any]) -> str:
    """Standard base64 of compact JSON, as every x402 header is sent."""
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.b64encode(data).decode("ascii")
