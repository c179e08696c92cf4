"""The reference: the official x402 SDK's Flask middleware guarding a trivial route, verifying
and settling through a facilitator (the SDK's own, run locally on the same chain).

    REF_FACILITATOR_URL=... REF_PAY_TO=... REF_ASSET=... REF_AMOUNT=10000 \
        gunicorn -w 2 benchmarks.reference_app:app
"""

from __future__ import annotations

import os

from flask import Flask, jsonify
from x402 import x402ResourceServerSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.http.middleware.flask import PaymentMiddleware
from x402.mechanisms.evm.exact import register_exact_evm_server

NETWORK = os.environ.get("REF_NETWORK", "eip155:31337")

app = Flask(__name__)
server = x402ResourceServerSync(
    HTTPFacilitatorClientSync(FacilitatorConfig(url=os.environ["REF_FACILITATOR_URL"]))
)
register_exact_evm_server(server, NETWORK)
routes = {
    "POST /paid": {
        "accepts": {
            "scheme": "exact",
            "payTo": os.environ["REF_PAY_TO"],
            "price": {
                "amount": os.environ.get("REF_AMOUNT", "10000"),
                "asset": os.environ["REF_ASSET"],
                "extra": {"name": os.environ.get("REF_ASSET_NAME", "USD Coin"), "version": "2"},
            },
            "network": NETWORK,
        },
    },
}
PaymentMiddleware(app, routes, server)


@app.post("/paid")
def paid():  # type: ignore[no-untyped-def]
    return jsonify({"output": "ok"})
