#!/usr/bin/env python
"""An agent pays for one MCP tool call with the official x402 MCP client (PyPI ``x402``, ``x402.mcp``).

It connects to the server's MCP endpoint (``/mcp``, Streamable HTTP, with the ``mcp`` SDK's
client), calls the model's tool without payment, gets the x402 payment requirements as the
tool's result, signs the USDC authorization with a funded demo key from var/devchain.json and
calls again with the payment in the call's ``_meta``: the result is the prediction's output,
with the settlement in the result's ``_meta``.

``x402.mcp.create_x402_mcp_client`` opens MCP's older HTTP+SSE transport, which the server also
offers (``/mcp/sse``, under ASGI); the session it yields, ``x402MCPSession``, is used here over
Streamable HTTP.

    .venv-agent/bin/python examples/mcp_agent.py "hello"          # against the quick start
    .venv-agent/bin/python examples/mcp_agent.py --base-url URL --devchain FILE --payer 1 "text"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from x402 import x402Client
from x402.mcp import MCPToolCallResult, x402MCPSession
from x402.mechanisms.evm.exact import register_exact_evm_client

ROOT = Path(__file__).resolve().parent.parent


def tool_of(model: str) -> str:
    """The server names a model's tool ``owner__name``."""
    owner, name = model.split("/", 1)
    return f"{owner}__{name}"


async def call_paid_tool(
    base_url: str,
    tool: str,
    arguments: dict[str, Any],
    account: LocalAccount,
    allowed_asset: dict[str, str],
) -> MCPToolCallResult:
    """Call ``tool``, paying what it asks (within ``allowed_asset``'s network, token and cap)."""
    client = x402Client()
    register_exact_evm_client(client, account)
    # The SDK only pays tokens it knows unless told: allow the dev chain's test USDC, capped.
    client.set_spend_controls({"allowed_assets": [allowed_asset]})
    async with (
        streamable_http_client(f"{base_url}/mcp") as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await x402MCPSession(session, client).call_tool(tool, arguments)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", default="hello from an MCP agent")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo/echo-text")
    parser.add_argument("--devchain", default=str(ROOT / "var" / "devchain.json"))
    parser.add_argument("--payer", type=int, default=0, help="index into devchain payers")
    parser.add_argument("--max-usdc", default="1.00", help="refuse to pay more than this per call")
    args = parser.parse_args()

    chain = json.loads(Path(args.devchain).read_text())
    account = Account.from_key(chain["payers"][args.payer]["private_key"])
    allowed = {
        "network": chain["network"],
        "asset": chain["asset"],
        "max_amount_per_payment": str(int(float(args.max_usdc) * 10**6)),
    }
    tool = tool_of(args.model)
    print(f"calling tool {tool} at {args.base_url}/mcp as {account.address}")
    result = asyncio.run(call_paid_tool(args.base_url, tool, {"text": args.text}, account, allowed))
    print(f"paid        {result.payment_made}")
    print(f"error       {result.is_error}")
    print(f"output      {result.content[0].text if result.content else None!r}")
    if result.payment_response is not None:
        print(f"transaction {result.payment_response.transaction}")
    return 1 if result.is_error else 0


if __name__ == "__main__":
    sys.exit(main())
