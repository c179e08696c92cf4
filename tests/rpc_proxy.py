"""A scriptable JSON-RPC fault proxy between the app and anvil (loopback only).

Modes: ``up`` (forward), ``down`` (refuse with HTTP 503), ``drop_send`` (forward
eth_sendRawTransaction but lose the answer), ``limit_pending_calls`` (answer an ``eth_call`` on
the pending block with a provider's rate-limit error, a JSON-RPC error that is not a revert).
It counts calls by method.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests


class RpcProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "up"
        self.calls: Counter[str] = Counter()
        self.url = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = json.loads(body)
                methods = [c["method"] for c in (request if isinstance(request, list) else [request])]
                proxy.calls.update(methods)
                if proxy.mode == "down":
                    self.send_response(503)
                    self.end_headers()
                    return
                calls = request if isinstance(request, list) else [request]
                if proxy.mode == "limit_pending_calls" and all(
                    c.get("method") == "eth_call" and c.get("params", [None, None])[1:] == ["pending"] for c in calls
                ):
                    error = {"code": -32005, "message": "rate limit exceeded"}
                    errors = [{"jsonrpc": "2.0", "id": c.get("id"), "error": error} for c in calls]
                    reply = json.dumps(errors if isinstance(request, list) else errors[0]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                answer = requests.post(
                    proxy.upstream, data=body, headers={"Content-Type": "application/json"}, timeout=10
                )
                if proxy.mode == "drop_send" and "eth_sendRawTransaction" in methods:
                    self.send_response(502)
                    self.end_headers()
                    return
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        return Handler


@contextmanager
def rpc_proxy(upstream: str) -> Iterator[RpcProxy]:
    proxy = RpcProxy(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), proxy.handler())
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
