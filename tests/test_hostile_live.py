"""Hostile input against the live server, over real sockets: never a 5xx, nothing recorded.

A corpus of hostile values (NUL and other control characters, non-UTF-8 bytes, Unicode
digits, numbers of thousands of digits, wrong JSON types at every level, empty and deeply
nested containers, huge and oddly typed bodies) goes through every input a client controls:
each header we read, each body field, each path parameter, the cursors, every field of a
signed payment payload (signature valid, envelope hostile), the facilitator API and the Cog
callback. Requests are written byte for byte on a socket, so values no HTTP library would
send (NUL, raw non-UTF-8 bytes) reach the server as an attacker would send them.

Asserted: no 5xx; the server still answers; the ledger and the predictions hold exactly what
the accepted requests bought (a refused request records nothing).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import pytest

from payments.models import Payment
from payments.options import payment_options
from payments.x402.types import Requirement
from predictions.models import Prediction
from tests.payers import sign_authorization, v2_payload
from tests.siwx import siwx_header

pytestmark = [pytest.mark.security, pytest.mark.django_db(transaction=True)]

URL = "/v1/models/demo/echo-text/predictions"
OPERATOR = "operator-hostile-test-token"
FACILITATOR = "facilitator-hostile-test-token"

#: Hostile text: each class once (as str; sent UTF-8 encoded, or JSON-escaped in bodies).
TEXT: list[str] = [
    "\x00",
    "abc\x00def",
    "\x01\x08\x1b\x7f",
    "\u00b2",  # superscript two: str.isdigit() is True, int() refuses it
    "\u0663",  # Arabic-Indic three: int() accepts it
    "\U0001d7d7",  # mathematical bold nine
    "9" * 5000,
    "-1",
    "+1",
    "1e400",
    "0x1f",
    "1_000",
    "",
    " ",
    "\u202e\ufeff\u200b",
    "\u210c" * 3000,
    "A" * 20_000,
    "null",
    "%00",
    "%ff",
    "http://[::1",
    "http://a:99999999999/",
    "http://127.0.0.1:1/",
    "javascript:alert(1)",
    "../../etc/passwd",
    "\\",
    '"',
    "wait=" + "9" * 5000,
    "1h" * 2000,
    "99999999999999999999h",
]
#: Bytes no UTF-8 decoder accepts, or a surrogate encoded anyway, or Latin-1 digits.
RAW: list[bytes] = [b"\xff\xfe", b"\xc3\x28", b"\xb2", b"\x80abc", b"\xed\xa0\x80", b"\xc0\xaf"]
#: JSON fragments: wrong types, empty containers, huge numbers, escapes PostgreSQL refuses.
JSON_FRAGMENTS: list[str] = [
    "null",
    "true",
    "0",
    "-1",
    "1.5",
    "9" * 5000,
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "[]",
    "{}",
    "[[]]",
    '{"": {}}',
    '"\\u0000"',
    '"a\\u0000b"',
    '"\\ud800"',
    '"\\udc00x"',
    '{"\\u0000": 1}',
    '["\\u0000"]',
    "[" * 60 + "]" * 60,
    "[" * 5000 + "]" * 5000,
    '{"a":' * 3000 + "1" + "}" * 3000,
    '"' + "\\u00b2" + '"',
    '"' + "x" * 100_000 + '"',
]


def header_values() -> list[bytes]:
    return [t.encode("utf-8") for t in TEXT] + RAW


def path_segments() -> list[bytes]:
    """Path parameters: percent-encoded (how NUL reaches a server) and raw bytes."""
    encoded = [quote_from_bytes(t.encode("utf-8")[:3000], safe="").encode() for t in TEXT if t]
    return encoded + RAW + [quote_from_bytes(r, safe="").encode() for r in RAW]


@dataclass
class Tally:
    sent: int = 0
    #: Accepted creates: paid (a payment and its prediction), by operator token (a prediction).
    accepted_paid: int = 0
    accepted_free: int = 0
    #: Payments the facilitator API recorded (settled or pending), with no prediction.
    facilitator_recorded: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class RawClient:
    """HTTP/1.1 written byte for byte on a socket (one connection per request)."""

    def __init__(self, base: str, tally: Tally) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.tally = tally

    def send(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        content_type: bytes | None = b"application/json",
        label: str = "",
    ) -> tuple[int, bytes]:
        lines = [method.encode() + b" " + target + b" HTTP/1.1", f"Host: {self.host}:{self.port}".encode()]
        lines.append(b"Connection: close")
        if body is not None:
            if content_type is not None:
                lines.append(b"Content-Type: " + content_type)
            lines.append(b"Content-Length: " + str(len(body)).encode())
        lines += [name + b": " + value for name, value in headers or []]
        request = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
        with socket.create_connection((self.host, self.port), timeout=60) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        answer = b"".join(chunks)
        status_line, _, rest = answer.partition(b"\r\n")
        status = int(status_line.split(b" ")[1])
        content = rest.partition(b"\r\n\r\n")[2]
        self.tally.sent += 1
        self.tally.statuses[status] = self.tally.statuses.get(status, 0) + 1
        if status >= 500:
            what = label or f"{method} {target[:80]!r} {[(n, v[:40]) for n, v in headers or []]}"
            self.tally.errors.append(f"{status} {what}: {content[:200]!r}")
        return status, content


def body_templates() -> Iterator[tuple[str, str, str]]:
    """(path, label, JSON text) with each fragment in each body field of a create."""
    for fragment in JSON_FRAGMENTS:
        yield URL, "input", '{"input": @}'.replace("@", fragment)
        yield URL, "input.text", '{"input": {"text": @}}'.replace("@", fragment)
        yield URL, "input key", '{"input": {@: 1}}'.replace("@", fragment if fragment.startswith('"') else '"k"')
        yield URL, "webhook", '{"input": {"text": "x"}, "webhook": @}'.replace("@", fragment)
        yield URL, "events", '{"input": {"text": "x"}, "webhook_events_filter": @}'.replace("@", fragment)
        yield URL, "events item", '{"input": {"text": "x"}, "webhook_events_filter": [@]}'.replace("@", fragment)
        yield URL, "stream", '{"input": {"text": "x"}, "stream": @}'.replace("@", fragment)
        yield URL, "body", fragment
        yield "/v1/predictions", "version", '{"version": @, "input": {"text": "x"}}'.replace("@", fragment)
    for text in TEXT:
        value = json.dumps(text)
        yield URL, "webhook text", '{"input": {"text": "x"}, "webhook": @}'.replace("@", value)
        yield "/v1/predictions", "version text", '{"version": @, "input": {"text": "x"}}'.replace("@", value)


@pytest.fixture
def hostile_server(chain_settings, demo_model, live_server, settings, monkeypatch):
    settings.X402_OPERATOR_TOKENS = [OPERATOR]
    settings.X402_FACILITATOR_TOKENS = [FACILITATOR]
    settings.X402_PUBLIC_URL = live_server.url
    settings.X402_RATE_LIMITS = {"challenge": "100000/60", "failed": "100000/60", "webhook": "100000/60"}
    # Accepted predictions are recorded, not run: this test is about what gets recorded.
    monkeypatch.setattr("predictions.scheduling.start_prediction", lambda prediction: None)
    monkeypatch.setattr("predictions.views.MAX_WAIT", 0.1)  # Prefer: wait on runs that never start
    tally = Tally()
    yield RawClient(live_server.url, tally), tally, chain_settings


MARKER = "__HOSTILE_VALUE__"


def signed(chain, payer: int, path: list[str] | None = None, value: Any = None, fragment: str = "") -> bytes:
    """A payment header whose EIP-3009 signature is valid, with ``value`` (or the raw JSON
    ``fragment``) put at ``path`` in its envelope (which the signature does not cover)."""
    req = Requirement(payment_options()[0], 10_000)
    payload = v2_payload(req, sign_authorization(chain.payers[payer]["private_key"], req))
    if path:
        node = payload
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = MARKER if fragment else value
    text = json.dumps(payload)
    if fragment:
        text = text.replace(json.dumps(MARKER), fragment)
    return base64.b64encode(text.encode("utf-8", "surrogatepass"))


def test_hostile_corpus_against_the_live_server(hostile_server) -> None:
    client, tally, chain = hostile_server
    started = time.monotonic()
    good_body = b'{"input": {"text": "x"}}'
    payer_count = len(chain.payers)
    turn = 0

    def next_payer() -> int:
        nonlocal turn
        turn += 1
        return turn % payer_count

    # 1. Every header we read, on a create (unpaid; the operator token makes Prefer reachable).
    for value in header_values():
        for name in (b"PAYMENT-SIGNATURE", b"X-PAYMENT", b"Cancel-After", b"Authorization", b"X-Forwarded-For"):
            client.send("POST", URL.encode(), [(name, value)], good_body)
        for name in (b"Prefer", b"Cancel-After"):
            status, _ = client.send(
                "POST", URL.encode(), [(b"Authorization", f"Bearer {OPERATOR}".encode()), (name, value)], good_body
            )
            tally.accepted_free += status in (200, 201)
        client.send("POST", URL.encode(), [(b"Authorization", b"Bearer " + value)], good_body)
        client.send("POST", URL.encode(), [(b"X-Request-ID", value), (b"Accept", value)], good_body)
        client.send("POST", URL.encode(), [], good_body, content_type=value)
        for name in (b"SIGN-IN-WITH-X", b"X-Payer-Address", b"X-Payer-Timestamp", b"X-Payer-Signature"):
            client.send("GET", b"/v1/predictions", [(name, value)])
        client.send("GET", b"/v1/predictions", [(b"Authorization", b"Bearer " + value)])
        client.send("GET", b"/readyz", [(b"Authorization", b"Bearer " + value), (b"X-Forwarded-For", value)])
        client.send("GET", b"/metrics", [(b"Authorization", b"Bearer " + value), (b"X-Forwarded-For", value)])
        for path in (b"/facilitator/verify", b"/facilitator/settle"):
            client.send("POST", path, [(b"Authorization", b"Bearer " + value)], b"{}")
    # A sign-in proof whose fields are hostile (well-formed header, hostile content).
    key = chain.payers[0]["private_key"]
    for text in TEXT:
        for name in ("domain", "uri", "nonce", "issuedAt", "expirationTime", "notBefore", "chainId", "address"):
            header = siwx_header(key, client_origin(client), **{name: text})
            client.send("GET", b"/v1/predictions", [(b"SIGN-IN-WITH-X", header.encode())])

    # 2. Every body field, every class of JSON value; raw bodies; odd content types.
    for path, label, text in body_templates():
        client.send("POST", path.encode(), [], text.encode("utf-8", "surrogatepass"), label=f"{label}: {text[:60]}")
    for raw in RAW + [b"\x00", b"{\x00}", b'{"input": {"text": "\x00"}}', b"\xef\xbb\xbf{}", b"x" * 3_000_000]:
        client.send("POST", URL.encode(), [], raw)
    for content_type in (
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"multipart/form-data",
        b"application/json; charset=latin-1",
        b"application/json; charset=utf-16",
        b"application/xml",
    ):
        client.send("POST", URL.encode(), [], good_body, content_type=content_type)
        client.send("POST", URL.encode(), [], b"input=x&text=\x00", content_type=content_type)
    client.send("POST", URL.encode(), [], b"", content_type=None)

    # 3. Path parameters and query strings.
    for seg in path_segments():
        for target in (
            b"/v1/models/" + seg + b"/echo-text",
            b"/v1/models/demo/" + seg,
            b"/v1/predictions/" + seg,
            b"/v1/models/" + seg + b"/" + seg + b"/predictions",
        ):
            client.send("GET", target)
        client.send("POST", b"/v1/models/demo/" + seg + b"/predictions", [], good_body)
        client.send("POST", b"/v1/predictions/" + seg + b"/cancel")
        client.send("POST", b"/internal/cog/" + seg + b"/" + b"0" * 64, [], b'{"status": "succeeded"}')
        client.send("POST", b"/internal/cog/abc/" + seg, [], b'{"status": "succeeded"}')
        client.send("GET", b"/v1/models?cursor=" + seg)
        client.send("GET", b"/v1/predictions?cursor=" + seg, [(b"Authorization", f"Bearer {OPERATOR}".encode())])
        cursor = base64.b64encode(b"o=0&p=" + seg).replace(b"=", b"%3D")
        client.send("GET", b"/v1/models?cursor=" + cursor)
        client.send("GET", b"/v1/predictions?cursor=" + cursor, [(b"Authorization", f"Bearer {OPERATOR}".encode())])
        client.send("GET", b"/healthz?x=" + seg)

    # 4. Signed payments (the EIP-3009 signature verifies) with hostile envelopes.
    envelope_paths = [
        ["resource"],
        ["resource", "url"],
        ["resource", "description"],
        ["resource", "mimeType"],
        ["extensions"],
        ["extensions", "payment-identifier"],
        ["extensions", "payment-identifier", "info"],
        ["extensions", "payment-identifier", "info", "id"],
        ["accepted", "extra"],
        ["accepted", "extra", "name"],
        ["accepted", "maxTimeoutSeconds"],
        ["zzz"],
    ]
    json_values: list[Any] = [None, 0, -1, 1.5, [], {}, [[]], True, *TEXT]
    for path in envelope_paths:
        variants = [{"value": v} for v in json_values] + [{"fragment": f} for f in JSON_FRAGMENTS[:21]]
        for variant in variants:
            header = signed(chain, next_payer(), path, **variant)
            status, _ = client.send(
                "POST", URL.encode(), [(b"PAYMENT-SIGNATURE", header)], good_body, label=f"signed {path} {variant!r:.60}"
            )
            tally.accepted_paid += status in (200, 201)
    # A valid payment with a hostile body field: refused before anything is recorded.
    for text in ('{"input": {"text": "\\u0000"}}', '{"input": {"text": "x"}, "webhook": "http://[::1"}'):
        header = signed(chain, next_payer())
        client.send("POST", URL.encode(), [(b"PAYMENT-SIGNATURE", header)], text.encode(), label=f"paid {text}")
    header = signed(chain, next_payer())
    client.send("POST", URL.encode(), [(b"PAYMENT-SIGNATURE", header), (b"Cancel-After", b"9" * 5000)], good_body)

    # 5. The facilitator API: hostile requirements beside a payload whose signature verifies.
    for value in json_values:
        for name in ("amount", "network", "asset", "payTo", "maxTimeoutSeconds"):
            req = Requirement(payment_options()[0], 10_000)
            payload = v2_payload(req, sign_authorization(chain.payers[next_payer()]["private_key"], req))
            requirements = {**req.v2(), name: value}
            body = json.dumps({"x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements})
            for path in (b"/facilitator/verify", b"/facilitator/settle"):
                status, answer = client.send(
                    "POST", path, [(b"Authorization", f"Bearer {FACILITATOR}".encode())], body.encode()
                )
                outcome = json.loads(answer) if status == 200 and path.endswith(b"settle") else {}
                if outcome.get("success") or outcome.get("errorReason") == "settlement_pending":
                    tally.facilitator_recorded += 1
    for fragment in JSON_FRAGMENTS:
        for path in (b"/facilitator/verify", b"/facilitator/settle"):
            client.send("POST", path, [(b"Authorization", f"Bearer {FACILITATOR}".encode())], fragment.encode())
            body = '{"x402Version": 2, "paymentPayload": @, "paymentRequirements": @}'.replace("@", fragment)
            client.send("POST", path, [(b"Authorization", f"Bearer {FACILITATOR}".encode())], body.encode())

    # The server is still healthy and still sells: one ordinary paid request goes through.
    assert client.send("GET", b"/healthz")[0] == 200
    header = signed(chain, next_payer())
    status, answer = client.send("POST", URL.encode(), [(b"PAYMENT-SIGNATURE", header)], good_body)
    assert status == 201, answer[:300]
    tally.accepted_paid += 1

    elapsed = time.monotonic() - started
    print(f"\n{tally.sent} hostile requests in {elapsed:.1f}s; statuses {sorted(tally.statuses.items())}")
    assert not tally.errors, f"{len(tally.errors)} 5xx of {tally.sent}:\n" + "\n".join(tally.errors[:40])
    assert Payment.objects.count() == tally.accepted_paid + tally.facilitator_recorded
    assert Prediction.objects.count() == tally.accepted_paid + tally.accepted_free
    assert Prediction.objects.filter(payment__isnull=True).count() == tally.accepted_free


def client_origin(client: RawClient) -> str:
    return f"http://{client.host}:{client.port}"
