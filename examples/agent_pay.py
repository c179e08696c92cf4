#!/usr/bin/env python
"""An autonomous agent buys one prediction with the official x402 client (PyPI ``x402``).

It calls POST /v1/models/demo/echo-text/predictions, gets HTTP 402, signs the USDC
authorization with a funded demo key from var/devchain.json, retries, then polls the
prediction until it finishes and prints the output and the settlement transaction.

    .venv-agent/bin/python examples/agent_pay.py "hello"           # against the quick start
    .venv-agent/bin/python examples/agent_pay.py --base-url URL --devchain FILE --payer 1 "text"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm.exact import register_exact_evm_client

ROOT = Path(__file__).resolve().parent.parent


def balance_of(rpc_url: str, token: str, address: str) -> int:
    data = "0x70a08231" + address[2:].lower().rjust(64, "0")
    r = requests.post(
        rpc_url,
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "eth_call",
            "params": [{"to": token, "data": data}, "latest"],
        },
        timeout=10,
    )
    return int(r.json()["result"], 16)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text", nargs="?", default="hello from an agent")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo/echo-text")
    parser.add_argument("--devchain", default=str(ROOT / "var" / "devchain.json"))
    parser.add_argument("--payer", type=int, default=0, help="index into devchain payers")
    parser.add_argument("--max-usdc", default="1.00", help="refuse to pay more than this per call")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--header", action="append", default=[], metavar="NAME:VALUE",
        help="send this header too (e.g. X-Forwarded-Proto:https, as a TLS proxy in front would)",
    )
    parser.add_argument("--confirmed", action="store_true", help="then wait until the payment is confirmed")
    args = parser.parse_args()

    chain = json.loads(Path(args.devchain).read_text())
    payer = chain["payers"][args.payer]
    account = Account.from_key(payer["private_key"])

    client = x402ClientSync()
    register_exact_evm_client(client, account)
    # The SDK only pays tokens it knows unless told: allow the dev chain's test USDC, capped.
    client.set_spend_controls(
        {
            "allowed_assets": [
                {
                    "network": chain["network"],
                    "asset": chain["asset"],
                    "max_amount_per_payment": str(int(float(args.max_usdc) * 10**6)),
                }
            ]
        }
    )
    plain = requests.Session()
    plain.headers.update(dict(h.split(":", 1) for h in args.header))
    session = wrapRequestsWithPayment(requests.Session(), client)
    session.headers.update(plain.headers)

    before = balance_of(chain["rpc_url"], chain["asset"], account.address)
    started = time.monotonic()
    url = f"{args.base_url}/v1/models/{args.model}/predictions"
    print(f"POST {url} as {account.address}")
    response = session.post(url, json={"input": {"text": args.text}}, timeout=30)
    print(f"-> HTTP {response.status_code}")
    if response.status_code not in (200, 201):
        print(response.text)
        return 1
    prediction = response.json()
    print(
        f"prediction {prediction['id']} is {prediction['status']}; paying {prediction['payment']['amount']} USDC"
    )

    deadline = time.monotonic() + args.timeout
    while prediction["status"] not in ("succeeded", "failed", "canceled"):
        if time.monotonic() > deadline:
            print("timed out waiting for the prediction")
            return 1
        time.sleep(0.25)
        prediction = plain.get(f"{args.base_url}/v1/predictions/{prediction['id']}", timeout=10).json()
    while args.confirmed and prediction["payment"]["status"] != "confirmed":
        if time.monotonic() > deadline or prediction["payment"]["status"] in ("failed", "expired"):
            print(f"the payment is {prediction['payment']['status']}, not confirmed")
            return 1
        time.sleep(0.5)
        prediction = plain.get(f"{args.base_url}/v1/predictions/{prediction['id']}", timeout=10).json()
    elapsed = time.monotonic() - started
    after = balance_of(chain["rpc_url"], chain["asset"], account.address)

    print(f"status      {prediction['status']}")
    print(f"output      {prediction['output']!r}")
    print(f"transaction {prediction['payment']['transaction']} ({prediction['payment']['status']})")
    print(f"paid        {(before - after) / 10**6} USDC (balance {before / 10**6} -> {after / 10**6})")
    print(f"end to end  {elapsed:.2f}s")
    return 0 if prediction["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
