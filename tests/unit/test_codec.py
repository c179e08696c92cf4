import base64
import json

import pytest

from payments.x402.codec import MAX_HEADER_BYTES, DecodeError, decode_header, encode_header


def test_round_trip_standard_base64() -> None:
    obj = {"x402Version": 2, "a": [1, {"b": "c"}]}
    assert decode_header(encode_header(obj)) == obj


def test_url_safe_and_unpadded_base64_are_accepted() -> None:
    obj = {"k": "??>>~~"}
    raw = base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    assert decode_header(raw) == obj


@pytest.mark.parametrize(
    "header, message",
    [
        ("not base64!!", "base64"),
        (base64.b64encode(b"{not json").decode(), "JSON"),
        (base64.b64encode(b"[1,2]").decode(), "object"),
        (base64.b64encode(b'{"a": NaN}').decode(), "NaN"),
        (base64.b64encode(('{"a":' + "[" * 40 + "]" * 40 + "}").encode()).decode(), "deep"),
        ("é" * 10, "ASCII"),
        ("A" * (MAX_HEADER_BYTES + 1), "longer"),
    ],
)
def test_hostile_headers_raise_decode_error(header: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_header(header)


def test_deeply_nested_json_never_recurses_out() -> None:
    raw = base64.b64encode(b"[" * 5000 + b"]" * 5000).decode()
    with pytest.raises(DecodeError):
        decode_header(raw)


def test_a_nul_character_anywhere_in_the_header_json_is_refused() -> None:
    """PostgreSQL cannot store NUL in text or JSON: the payload would reach the ledger insert and
    fail there with a 500. It is an invalid payload, refused at decoding."""
    import base64

    import pytest

    from payments.x402.codec import DecodeError, decode_header

    for text in ('{"x402Version": 2, "resource": {"description": "a\\u0000b"}}', '{"k\\u0000": 1}'):
        with pytest.raises(DecodeError):
            decode_header(base64.b64encode(text.encode()).decode())
