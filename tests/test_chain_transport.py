"""The paid request's chain reads go over urllib3 (payments.chain.node): what ``requests`` did
for them is kept (the URL's credentials as Basic auth, the environment's proxy, no redirect
followed, every failure a ChainUnavailable), and nothing it did not."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from payments.chain import node
from payments.chain.node import ChainUnavailable, RpcError, rpc_batch


class Recorder:
    """A loopback HTTP server answering every POST with ``status`` and ``body`` (by default a
    JSON-RPC answer to each call of the batch), and recording what it was sent."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes | None = None
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                sent = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.headers.append({k.lower(): v for k, v in self.headers.items()})
                recorder.paths.append(self.path)
                body = recorder.body
                if body is None:
                    body = json.dumps([{"jsonrpc": "2.0", "id": c["id"], "result": c["method"]} for c in json.loads(sent)]).encode()
                self.send_response(recorder.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if recorder.status in (301, 302, 307):
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(node, "_transport", node._Transport())  # routes are read once per URL
    server = Recorder()
    yield server
    server.server.shutdown()


def test_a_batch_goes_in_one_post_and_comes_back_in_call_order(recorder: Recorder) -> None:
    url = f"http://127.0.0.1:{recorder.port}/rpc/key-in-path"
    assert rpc_batch(url, [("eth_blockNumber", []), ("eth_chainId", [])]) == ["eth_blockNumber", "eth_chainId"]
    assert recorder.paths == ["/rpc/key-in-path"]
    assert recorder.headers[0]["content-type"] == "application/json"
    assert "authorization" not in recorder.headers[0]


def test_the_urls_credentials_are_sent_as_basic_auth(recorder: Recorder) -> None:
    rpc_batch(f"http://us%40er:p%3Ass@127.0.0.1:{recorder.port}/", [("eth_blockNumber", [])])
    expected = "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert recorder.headers[0]["authorization"] == expected


def test_the_environments_proxy_carries_the_call(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY as requests honoured it: the call goes to the proxy with the full URL."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{recorder.port}")
    assert rpc_batch("http://rpc.invalid:8545/v1", [("eth_blockNumber", [])]) == ["eth_blockNumber"]
    assert recorder.paths == ["http://rpc.invalid:8545/v1"]


def test_no_proxy_is_honoured(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert rpc_batch(f"http://127.0.0.1:{recorder.port}/", [("eth_blockNumber", [])]) == ["eth_blockNumber"]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (503, b"busy"),
        (429, b'{"error": "rate limited"}'),
        (302, b'[{"jsonrpc": "2.0", "id": 1, "result": "0x1"}]'),
        (200, b"<html>not json</html>"),
    ],
    ids=["unavailable", "rate_limited", "redirect_not_followed", "not_json"],
)
def test_an_unusable_answer_is_chain_unavailable(recorder: Recorder, status: int, body: bytes) -> None:
    recorder.status, recorder.body = status, body
    with pytest.raises(ChainUnavailable):
        rpc_batch(f"http://127.0.0.1:{recorder.port}/", [("eth_blockNumber", [])])
    assert len(recorder.paths) == 1  # neither retried nor redirected


def test_a_refused_connection_is_chain_unavailable_and_names_no_secret(recorder: Recorder) -> None:
    with pytest.raises(ChainUnavailable) as caught:
        rpc_batch("http://user:secret@127.0.0.1:1/key", [("eth_blockNumber", [])], timeout=2)
    assert "secret" not in str(caught.value) and "key" not in str(caught.value)


def test_an_error_answer_raises_or_stands_inline(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "_ids", iter([7, 8]))  # the ids the answers name
    url = f"http://127.0.0.1:{recorder.port}/"
    error = {"code": 3, "message": "execution reverted"}
    recorder.body = json.dumps([{"jsonrpc": "2.0", "id": 7, "error": error}]).encode()
    with pytest.raises(RpcError, match="execution reverted"):
        rpc_batch(url, [("eth_call", [{}])])
    recorder.body = json.dumps([{"jsonrpc": "2.0", "id": 8, "error": error}]).encode()
    (answer,) = rpc_batch(url, [("eth_call", [{}])], errors_inline=True)
    assert isinstance(answer, RpcError) and answer.code == 3


def test_https_is_verified_with_the_bundle_requests_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """certifi's bundle, or REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE when set (as requests did)."""
    import certifi

    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    route = node._Transport().route("https://rpc.example/")
    assert route.pool.connection_pool_kw["ca_certs"] == certifi.where()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/private-ca.pem")
    route = node._Transport().route("https://rpc.example/")
    assert route.pool.connection_pool_kw["ca_certs"] == "/etc/ssl/private-ca.pem"


def test_the_proxys_own_credentials_are_sent_to_it_and_the_urls_are_not(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy that wants a login gets Proxy-Authorization from its URL (a scheme-less proxy
    is taken as http://, as requests did); the RPC URL's own credentials go in Authorization,
    never in the request line the proxy sees (and often logs)."""
    monkeypatch.setenv("HTTP_PROXY", f"proxy%40user:pw@127.0.0.1:{recorder.port}")
    rpc_batch("http://rpc-user:rpc-key@rpc.invalid:8545/v1", [("eth_blockNumber", [])])
    assert recorder.paths == ["http://rpc.invalid:8545/v1"]
    sent = recorder.headers[0]
    assert sent["proxy-authorization"] == "Basic " + base64.b64encode(b"proxy@user:pw").decode()
    assert sent["authorization"] == "Basic " + base64.b64encode(b"rpc-user:rpc-key").decode()


def test_no_proxy_ranges_and_ports_are_honoured_as_requests_did(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "10.0.0.0/8,127.0.0.0/8")
    assert rpc_batch(f"http://127.0.0.1:{recorder.port}/", [("eth_blockNumber", [])]) == ["eth_blockNumber"]


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("http://[::1/", ""),  # unparsable
        ("ftp://127.0.0.1/", ""),
        ("http://127.0.0.1:1/", "socks5h://127.0.0.1:1"),  # no SOCKS support: said, not a crash
        ("http://us\u20acr:pw@127.0.0.1:1/", ""),  # credentials Basic auth cannot carry
    ],
    ids=["unparsable", "not_http", "socks_proxy", "unencodable_credentials"],
)
def test_a_url_or_proxy_it_cannot_use_is_chain_unavailable(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch, url: str, proxy: str
) -> None:
    if proxy:
        monkeypatch.setenv("ALL_PROXY", proxy)
    with pytest.raises(ChainUnavailable):
        rpc_batch(url, [("eth_blockNumber", [])], timeout=2)
