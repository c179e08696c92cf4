"""``/mcp``: the MCP Streamable HTTP endpoint, served by the ``mcp`` SDK's own transport.

The service runs under WSGI, so each POST is handed to the SDK's ``StreamableHTTPSessionManager``
as an ASGI call in stateless mode with JSON answers: no session lives between requests, so any
worker process may answer any request. Stateless servers offer no server-to-client stream, so
GET and DELETE are 405, as the transport specification allows.
"""

from __future__ import annotations

from typing import Any

import anyio
from asgiref.sync import async_to_sync
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.types import PARSE_ERROR

from payments.x402.codec import DecodeError, loads
from x402site.parsers import MAX_BODY_DEPTH

from .server import DJANGO_REQUEST, server


@csrf_exempt
@require_POST
def endpoint(request: HttpRequest) -> HttpResponse:
    body = request.body
    try:
        # The REST bodies' rules (x402site.parsers): strict UTF-8 JSON, finite numbers, bounded
        # nesting, no NUL or lone surrogate (PostgreSQL would refuse the input with a 500).
        loads(body, MAX_BODY_DEPTH)
    except DecodeError as exc:
        error = {"code": PARSE_ERROR, "message": f"Parse error: {exc}"}
        return JsonResponse({"jsonrpc": "2.0", "id": None, "error": error}, status=400)
    return async_to_sync(_serve)(request, body)


async def _serve(request: HttpRequest, body: bytes) -> HttpResponse:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.path.encode("utf-8"),
        "query_string": request.META.get("QUERY_STRING", "").encode("latin-1"),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
        "client": (request.META.get("REMOTE_ADDR", ""), 0),
        "state": {DJANGO_REQUEST: request},
    }
    answered = anyio.Event()
    body_sent = False
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # the client stays connected until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    manager = StreamableHTTPSessionManager(app=server, json_response=True, stateless=True)
    async with manager.run():
        await manager.handle_request(scope, receive, send)
    response = HttpResponse(b"".join(chunks), status=status)
    for name, value in headers:
        if name.lower() != b"content-length":
            response[name.decode("latin-1")] = value.decode("latin-1")
    return response
