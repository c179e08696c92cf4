"""The official x402 SDK's facilitator (x402FacilitatorSync + FacilitatorWeb3Signer) served over
HTTP on loopback, as a second opinion for our facilitator-mode tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from x402 import x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas import parse_payment_payload, parse_payment_requirements

#: Rewrites the SDK facilitator's settle answer (dict) before it is sent: a facilitator that lies,
#: times out after landing, or reports another hash than the one it mined.
SettleRewrite = Callable[[dict[str, Any]], dict[str, Any]]


def _handler(
    facilitator: x402FacilitatorSync, calls: list[str], rewrite: SettleRewrite | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            calls.append(self.path)
            self._send(200, facilitator.get_supported().model_dump(mode="json", by_alias=True))

        def do_POST(self) -> None:  # noqa: N802
            calls.append(self.path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            payload = parse_payment_payload(body["paymentPayload"])
            requirements = parse_payment_requirements(payload.x402_version, body["paymentRequirements"])
            if self.path.endswith("/verify"):
                result = facilitator.verify(payload, requirements)
            else:
                result = facilitator.settle(payload, requirements)
            answer = result.model_dump(mode="json", by_alias=True, exclude_none=True)
            if rewrite is not None and self.path.endswith("/settle"):
                answer = rewrite(answer)
            self._send(200, answer)

    return Handler


@contextmanager
def serve_sdk_facilitator(
    rpc_url: str, key: str, network: str, rewrite_settle: SettleRewrite | None = None
) -> Iterator[tuple[str, list[str]]]:
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(
        facilitator,
        FacilitatorWeb3Signer(private_key=key, rpc_url=rpc_url),
        networks=network,
        simulate_in_settle=True,
    )
    calls: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(facilitator, calls, rewrite_settle))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()
