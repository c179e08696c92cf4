"""Base64/JSON codecs for x402 headers, with the limits a hostile client calls for."""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

#: Headers above this size are refused before any decoding work (an 8 KiB cap, as in security.md).
MAX_HEADER_BYTES = 8 * 1024
#: JSON nesting deeper than this is refused (clients echo extension schemas, about ten levels deep).
MAX_JSON_DEPTH = 16


class DecodeError(ValueError):
    """A header that is not base64 of a JSON object within the limits."""

    reason = "invalid_payload"


def _storable(text: str) -> bool:
    """PostgreSQL stores neither NUL nor a lone surrogate (which UTF-8 cannot even encode)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than ``max_depth`` and strings (keys too) the database cannot
    store: NUL characters and lone surrogates (JSON escapes such as ``\\u0000``, ``\\ud800``)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                raise DecodeError("JSON strings must not contain NUL characters or lone surrogates")
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise DecodeError(f"JSON nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                stack.extend((key, depth + 1) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _reject_constant(name: str) -> None:
    raise DecodeError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400: JSON allows it, no database column holds it
        raise DecodeError(f"JSON number {text[:20]} is out of range")
    return number


def loads(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON from bytes: UTF-8 only, no NaN/Infinity, finite numbers, integers of at most
    Python's 4,300 digits, within ``max_depth`` and storable (see ``check_json``)."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except DecodeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError, huge ints
        raise DecodeError("not valid JSON") from None
    check_json(obj, max_depth)
    return obj


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
    obj = loads(data)
    if not isinstance(obj, dict):
        raise DecodeError("header JSON is not an object")
    return obj


def encode_header(obj: dict[str, Any]) -> str:
    """Standard base64 of compact JSON, as every x402 header is sent."""
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.b64encode(data).decode("ascii")
