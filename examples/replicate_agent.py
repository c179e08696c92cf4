#!/usr/bin/env python
"""The official ``replicate`` client against this server, two ways:

- as an agent: no API token; an httpx transport pays each x402 challenge with a funded key;
- as an operator: an API token from X402_OPERATOR_TOKENS runs without payment and can list.

    .venv-agent/bin/python examples/replicate_agent.py "hello"            # agent, against the quick start
    .venv-agent/bin/python examples/replicate_agent.py --token TOKEN "hi" # operator
    .venv-agent/bin/python examples/replicate_agent.py --stream "a b c"   # replicate.stream, word by word
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import replicate
from eth_account import Account
from x402 import x402ClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from x402_transport import X402Transport  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def agent_client(base_url: str, devchain: dict, payer: int, max_atomic: str = "1000000") -> replicate.Client:
    x402 = x402ClientSync()
    account = Account.from_key(devchain["payers"][payer]["private_key"])
    register_exact_evm_client(x402, account)
    x402.set_spend_controls(
        {
            "allowed_assets": [
                {
                    "network": devchain["network"],
                    "asset": devchain["asset"],
                    "max_amount_per_payment": max_atomic,
                }
            ]
        }
    )
    transport = X402Transport(x402, siwx_account=account)
    return replicate.Client(api_token="", base_url=base_url, transport=transport)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text", nargs="?", default="hello from the replicate client")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--devchain", default=str(ROOT / "var" / "devchain.json"))
    parser.add_argument("--payer", type=int, default=1)
    parser.add_argument("--token", help="an operator token: run without payment")
    parser.add_argument("--stream", action="store_true", help="stream demo/stream-words' output as it comes")
    args = parser.parse_args()
    if args.token:
        client = replicate.Client(api_token=args.token, base_url=args.base_url)
    else:
        client = agent_client(args.base_url, json.loads(Path(args.devchain).read_text()), args.payer)
    if args.stream:
        streamed = ""
        for event in client.stream("demo/stream-words", input={"text": args.text}):
            print(str(event), end="", flush=True)  # output events print their text; others nothing
            streamed += str(event)
        print()
        return 0 if streamed.split() == args.text.split() else 1  # every word, in order
    prediction = client.models.predictions.create(model="demo/echo-text", input={"text": args.text})
    prediction.wait()
    print(f"{prediction.id} {prediction.status}: {prediction.output!r}")
    if args.token:
        print(f"listed: {[p.id for p in client.predictions.list()][:5]}")
    return 0 if prediction.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
