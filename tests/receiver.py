"""A local webhook receiver for tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A local webhook receiver: records deliveries, fails the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[tuple[dict, dict]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    self.send_response(500)
                else:
                    receiver.events.append((dict(self.headers), json.loads(body) | {"_raw": body.decode()}))
                    self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, done: Callable[[list[dict]], bool], timeout: float = 15.0) -> list[dict]:
        """The bodies received, once ``done(bodies)`` holds (or the time is up)."""
        deadline = time.monotonic() + timeout
        while not done(self.bodies) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.bodies

    @property
    def bodies(self) -> list[dict]:
        return [body for _, body in self.events]
