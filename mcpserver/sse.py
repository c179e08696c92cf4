"""MCP's HTTP+SSE transport (protocol 2024-11-05), the one the x402 SDK's MCP client opens
(``x402.mcp.create_x402_mcp_client`` connects to ``{url}/sse``): ``GET /mcp/sse`` holds a
session's event stream, whose first event names where to POST the session's messages
(``/mcp/messages/?session_id=...``); answers come back on the stream. The same server, tools
and payments as ``/mcp`` (Streamable HTTP, views.py).

It is served at the ASGI level (x402site/asgi.py routes these two paths here), on uvicorn's
event loop: an open session is a task, not a thread. A session lives in the memory of the
process holding its stream, so a POST must reach that process: run one web process, or route
``/mcp/`` stickily by ``session_id`` (docs/deploy.md). Each session's tool calls run, in order,
in one thread of its own (their database connection), like a request's.

Each POST is checked as the REST API checks requests (clean UTF-8 headers and path, a body of
at most ``DATA_UPLOAD_MAX_MEMORY_SIZE``, strict JSON, an allowed Host) and becomes the Django
request the tools see (operator token, client address, absolute URLs).
"""

from __future__ import annotations

import io
import json
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections
from mcp.server.sse import SseServerTransport
from mcp.types import PARSE_ERROR

from payments.x402.codec import DecodeError, loads
from x402site.inputs import RefuseUnsafeInput
from x402site.parsers import MAX_BODY_DEPTH

from .server import DJANGO_REQUEST, server

SSE_PATH = "/mcp/sse"
MESSAGES_PATH = "/mcp/messages/"
transport = SseServerTransport(MESSAGES_PATH)

Scope = dict[str, Any]


def handles(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["path"] in (SSE_PATH, MESSAGES_PATH)


async def _answer(send: Any, status: int, body: dict[str, Any], content_type: str = "application/json") -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _problem(send: Any, status: int, detail: str) -> None:
    await _answer(send, status, {"title": detail, "detail": detail, "status": status}, "application/problem+json")


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["path"] == SSE_PATH:
        if scope["method"] != "GET":
            return await _problem(send, 405, "GET opens the session's event stream.")
        return await _session(scope, receive, send)
    if scope["method"] != "POST":
        return await _problem(send, 405, "POST the session's messages here.")
    return await _message(scope, receive, send)


async def _session(scope: Scope, receive: Any, send: Any) -> None:
    async with ThreadSensitiveContext():  # the session's tool calls: one thread of its own
        try:
            async with transport.connect_sse(scope, receive, send) as (read, write):
                await server.run(read, write, server.create_initialization_options())
        finally:
            await sync_to_async(close_old_connections)()


async def _message(scope: Scope, receive: Any, send: Any) -> None:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return await _problem(send, 413, f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    request = ASGIRequest(scope, io.BytesIO(body))
    refusal = RefuseUnsafeInput.refusal(request)
    if refusal is not None:
        return await _answer(send, refusal.status_code, json.loads(refusal.content), refusal["Content-Type"])
    try:
        request.get_host()
    except DisallowedHost:
        return await _problem(send, 400, "The request could not be understood.")
    try:
        loads(body, MAX_BODY_DEPTH)  # the REST bodies' rules (x402site.parsers)
    except DecodeError as exc:
        error = {"code": PARSE_ERROR, "message": f"Parse error: {exc}"}
        return await _answer(send, 400, {"jsonrpc": "2.0", "id": None, "error": error})
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    await transport.handle_post_message({**scope, "state": {DJANGO_REQUEST: request}}, replay, send)
