"""The MCP server itself: the ``mcp`` SDK's low-level server, with tools listed from the
catalogue at each request (models come and go in the admin) and calls handed to
``mcpserver.tools`` in the Django request's own thread (its database connection, its
transactions)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from mcp import types
from mcp.server.lowlevel import Server

from . import tools
from .tools import MCP_PAYMENT_META_KEY

#: Where the Django request travels in the ASGI scope (``request.state`` in the SDK's handlers).
DJANGO_REQUEST = "django_request"

server: Server[Any, Any] = Server(
    "x402-predictions",
    instructions=(
        "Machine-learning predictions paid per call in USDC with x402. Call list_models for the "
        "models and prices; each model is a tool. A paid tool called without a payment returns "
        "the x402 payment requirements; pay with an x402 MCP client (x402.mcp), which sends the "
        f"payment in the call's _meta['{MCP_PAYMENT_META_KEY}']."
    ),
)


@server.list_tools()
async def list_tools() -> list[types.Tool]:
    return await sync_to_async(tools.catalogue)()


# Input is validated by the same code as the REST API (problem details with invalid_fields).
@server.call_tool(validate_input=False)
async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
    context = server.request_context
    extra = context.meta.model_extra if context.meta is not None else None
    payment = (extra or {}).get(MCP_PAYMENT_META_KEY)
    request = getattr(context.request.state, DJANGO_REQUEST)  # type: ignore[union-attr]
    return await sync_to_async(tools.call)(name, arguments, payment, request)
