#!/usr/bin/env python
"""An agent that calls often pays through a channel (x402 ``batch-settlement``), with the
official x402 client's batch-settlement scheme.

Its first paid request deposits into a payment channel of the settlement contract (the agent
signs an ERC-3009 authorization; the server's relayer sends it, so the agent pays no gas); every
request after that is paid with an off-chain voucher, no transaction. The server charges each
run when it ends, claims the channel's vouchers later and settles them to its pay-to; at the end
the agent asks for a cooperative refund of what it did not spend. The script checks the chain
agrees: the agent sent no transaction, pay-to received exactly the sum of the charges, and the
agent's balance fell by exactly that.

    .venv-agent/bin/python examples/agent_pay_channel.py 20      # against the quick start
    .venv-agent/bin/python examples/agent_pay_channel.py 5 --model demo/count-seconds

A per-second model (``demo/count-seconds``) is offered at the price of its time limit (the
voucher's ceiling) and each run is charged the seconds it took.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    InMemoryClientChannelStorage,
)
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.schemas import PaymentRequirements

ROOT = Path(__file__).resolve().parent.parent
SETTLEMENT = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"  # the canonical x402 batch-settlement contract


def rpc(url: str, method: str, params: list[Any]) -> Any:
    body = requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, timeout=10).json()
    if "error" in body:
        raise RuntimeError(body["error"])
    return body["result"]


def call(url: str, to: str, data: str) -> str:
    return rpc(url, "eth_call", [{"to": to, "data": data}, "latest"])


def word(address: str) -> str:
    return address[2:].lower().rjust(64, "0")


def balance_of(url: str, token: str, address: str) -> int:
    return int(call(url, token, "0x70a08231" + word(address)), 16)


def settled_to(url: str, pay_to: str, token: str) -> int:
    """receivers(pay_to, token).totalSettled: what the contract ever sent to pay-to."""
    answer = call(url, SETTLEMENT, "0x21ff6389" + word(pay_to) + word(token))
    return int(answer[66:130], 16)


def claimed_of(url: str, channel_id: str) -> int:
    """channels(id).totalClaimed."""
    answer = call(url, SETTLEMENT, "0x7a7ebd7b" + channel_id[2:])
    return int(answer[66:130], 16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requests", nargs="?", type=int, default=20)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--devchain", default=str(ROOT / "var" / "devchain.json"))
    parser.add_argument("--payer", type=int, default=3, help="index into devchain payers")
    parser.add_argument("--max-usdc", default="1", help="refuse to pay more than this per request")
    parser.add_argument("--wait", type=float, default=90, help="seconds to wait for the settle to pay-to")
    parser.add_argument("--model", default="demo/echo-text", help="demo/echo-text, or demo/count-seconds (per second)")
    args = parser.parse_args()

    chain = json.loads(Path(args.devchain).read_text())
    url_rpc, token, pay_to = chain["rpc_url"], chain["asset"], chain["pay_to"]
    account = Account.from_key(chain["payers"][args.payer]["private_key"])
    storage = InMemoryClientChannelStorage()
    # A signer that can read the chain: an agent that lost its channel record (this script run a
    # second time) rebuilds it from the contract instead of signing on a total of its own.
    signer = EthAccountSignerWithRPC(account, url_rpc)
    scheme = BatchSettlementEvmScheme(signer, BatchSettlementEvmSchemeOptions(storage=storage))
    client = x402ClientSync().register("eip155:*", scheme)
    cap = str(int(float(args.max_usdc) * 10**6))
    client.set_spend_controls(
        {"allowed_assets": [{"network": chain["network"], "asset": token, "max_amount_per_payment": cap}]}
    )
    session = wrapRequestsWithPayment(requests.Session(), client)
    url = f"{args.base_url}/v1/models/{args.model}/predictions"
    per_second = args.model == "demo/count-seconds"

    def body(i: int) -> dict[str, Any]:
        return {"input": {"seconds": 0.1 + 0.05 * (i % 4)}} if per_second else {"input": {"text": f"call {i}"}}

    challenge = requests.post(url, json=body(0), timeout=10)
    required = json.loads(base64.b64decode(challenge.headers["PAYMENT-REQUIRED"]))
    offer = next((a for a in required["accepts"] if a["scheme"] == "batch-settlement"), None)
    if offer is None:
        print("this server does not offer batch-settlement")
        return 1
    channel_id = compute_channel_id(
        scheme.build_channel_config(PaymentRequirements.model_validate(offer)), chain["network"]
    ).lower()
    before = balance_of(url_rpc, token, account.address)
    nonce_before = int(rpc(url_rpc, "eth_getTransactionCount", [account.address, "latest"]), 16)
    settled_before = settled_to(url_rpc, pay_to, token)
    claimed_before = claimed_of(url_rpc, channel_id)
    print(f"POST {url} x {args.requests} as {account.address}, channel {channel_id[:18]}...")

    charged, deposit_tx = 0, ""
    for i in range(args.requests):
        response = session.post(url, json=body(i), headers={"Prefer": "wait"}, timeout=60)
        if response.status_code not in (200, 201) or response.json().get("status") != "succeeded":
            print(f"request {i}: HTTP {response.status_code} {response.text[:300]}")
            return 1
        answer = json.loads(base64.b64decode(response.headers["PAYMENT-RESPONSE"]))
        charged += int(answer["extra"]["chargedAmount"])
        if answer.get("transaction"):
            deposit_tx = answer["transaction"]
            print(f"deposit     {int(storage.get(channel_id).balance) / 10**6} USDC, transaction {deposit_tx} (sent by the server)")
    ceiling = int(offer["amount"])
    print(f"paid        {args.requests} predictions with vouchers (at most {ceiling / 10**6} USDC each): "
          f"charged {charged / 10**6} USDC in all")

    # The cooperative refund: what was charged and not yet claimed is claimed in the same
    # transaction, the rest comes back; the server's sweep then settles the claims to pay-to.
    refund = scheme.refund(f"{args.base_url}/v1/channels/refund")
    print(f"refund      transaction {refund.transaction}")
    deadline = time.monotonic() + args.wait
    while settled_to(url_rpc, pay_to, token) - settled_before < charged:
        if time.monotonic() > deadline:
            print(f"not settled to pay-to within {args.wait} s")
            return 1
        time.sleep(1)
    settled = settled_to(url_rpc, pay_to, token) - settled_before
    claimed = claimed_of(url_rpc, channel_id) - claimed_before
    print(f"claimed     {claimed / 10**6} USDC; settled to pay-to {settled / 10**6} USDC")
    after = balance_of(url_rpc, token, account.address)
    nonce_after = int(rpc(url_rpc, "eth_getTransactionCount", [account.address, "latest"]), 16)
    print(f"balance     {before / 10**6} -> {after / 10**6} USDC (agent transactions sent: {nonce_after - nonce_before})")
    agree = (
        before - after == charged
        and settled == charged == claimed
        and nonce_after == nonce_before
        and bool(deposit_tx)
    )
    print("the chain agrees" if agree else "MISMATCH between the charges and the chain")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
