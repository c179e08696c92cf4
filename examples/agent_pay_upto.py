#!/usr/bin/env python
"""An agent pays per second (x402 ``upto``) with the official x402 client's upto scheme.

It calls POST /v1/models/demo/count-seconds/predictions with ``{"seconds": N}``, gets HTTP 402
(``upto`` offered first), signs a Permit2 permit for the maximum (the price of the model's 10 s
time limit), retries, waits for the prediction, and prints the maximum it permitted and what it
was charged for the seconds the run took. The demo payers approved Permit2 in the quick start.

    .venv-agent/bin/python examples/agent_pay_upto.py 2           # against the quick start
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
from x402.mechanisms.evm.upto import UptoEvmClientScheme

ROOT = Path(__file__).resolve().parent.parent


def balance_of(rpc_url: str, token: str, address: str) -> int:
    data = "0x70a08231" + address[2:].lower().rjust(64, "0")
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_call", "params": [{"to": token, "data": data}, "latest"]}
    return int(requests.post(rpc_url, json=body, timeout=10).json()["result"], 16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", nargs="?", type=float, default=2.0)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--devchain", default=str(ROOT / "var" / "devchain.json"))
    parser.add_argument("--payer", type=int, default=1, help="index into devchain payers")
    parser.add_argument("--max-usdc", default="0.05", help="refuse to permit more than this")
    args = parser.parse_args()

    chain = json.loads(Path(args.devchain).read_text())
    account = Account.from_key(chain["payers"][args.payer]["private_key"])
    client = x402ClientSync().register("eip155:*", UptoEvmClientScheme(account))
    cap = str(int(float(args.max_usdc) * 10**6))
    client.set_spend_controls(
        {"allowed_assets": [{"network": chain["network"], "asset": chain["asset"], "max_amount_per_payment": cap}]}
    )
    session = wrapRequestsWithPayment(requests.Session(), client)

    before = balance_of(chain["rpc_url"], chain["asset"], account.address)
    url = f"{args.base_url}/v1/models/demo/count-seconds/predictions"
    print(f"POST {url} as {account.address}")
    response = session.post(url, json={"input": {"seconds": args.seconds}}, timeout=30)
    print(f"-> HTTP {response.status_code}")
    if response.status_code not in (200, 201):
        print(response.text)
        return 1
    prediction = response.json()
    print(f"permitted   at most {prediction['payment']['maximum']} USDC ({prediction['payment']['scheme']})")
    deadline = time.monotonic() + 60
    while prediction["status"] not in ("succeeded", "failed", "canceled") or prediction["payment"]["transaction"] is None:
        if time.monotonic() > deadline:
            print("timed out waiting for the prediction")
            return 1
        if prediction["status"] in ("failed", "canceled"):
            break
        time.sleep(0.25)
        prediction = requests.get(prediction["urls"]["get"], timeout=10).json()
    after = balance_of(chain["rpc_url"], chain["asset"], account.address)
    payment = prediction["payment"]
    print(f"status      {prediction['status']}")
    print(f"output      {prediction['output']!r}")
    print(f"run         {payment['run_seconds']} s")
    print(f"charged     {payment['amount']} USDC of at most {payment['maximum']}")
    print(f"transaction {payment['transaction']}")
    print(f"balance     {before / 10**6} -> {after / 10**6} USDC")
    return 0 if prediction["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
