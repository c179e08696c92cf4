"""Chain access: the batched reads of the paid-request path, and the relayer's transactions.

Reads on the request path use raw JSON-RPC batches (one round trip for balance and nonce
state) over urllib3 directly; web3.py is used by the relayer in workers, where its import and
per-call overhead do not matter.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3
from requests.utils import (
    get_auth_from_url,
    get_environ_proxies,
    get_netrc_auth,
    prepend_scheme_if_needed,
    select_proxy,
    urldefragauth,
)

from payments.chain.abi import (
    ALLOWANCE,
    AUTHORIZATION_CANCELED_TOPIC,
    AUTHORIZATION_STATE,
    AUTHORIZATION_USED_TOPIC,
    BALANCE_OF,
    NONCE_BITMAP,
)
from payments.x402.permit2 import PERMIT2_ADDRESS, UptoPermit
from x402site.conf import x402


class ChainUnavailable(Exception):
    """The node did not answer usefully: the caller must not treat this as a yes or a no."""


class RpcError(Exception):
    """The node answered with a JSON-RPC error (a revert, a rejected transaction...)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", str(error)))
        self.code = error.get("code")
        self.data = error.get("data")


def endpoint(url: str) -> str:
    """``url`` without what may be secret (credentials, path, query: providers put API keys
    there), for messages and logs."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "<unparsable url>"
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class _Route:
    """How one RPC URL is reached: its connection pool (direct or through the environment's
    proxy), the URL to ask (without its credentials: a proxy sees the request line) and the
    headers every call carries (Basic auth from the URL's credentials or ~/.netrc)."""

    pool: urllib3.PoolManager
    target: str
    headers: dict[str, str]


class _Transport:
    """JSON-RPC POSTs through urllib3, one pool per process shared by its threads.

    The paid request reads the chain once, and ``requests`` spent about 1.2 ms of CPU on a call
    that urllib3 makes in 0.35 (most of it reading the proxy settings from the environment on
    every call). What requests took from the environment is taken here, by requests' own rules
    (``requests.utils``), once per URL instead: the proxy (``HTTP(S)_PROXY``, ``ALL_PROXY``,
    ``NO_PROXY`` with its CIDR ranges and ports; the proxy's credentials), ~/.netrc, and the CA
    bundle (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, a file or a directory, else certifi's).
    No retries and no redirects followed (as the ``requests`` calls before: a call that fails
    is the caller's to judge)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}

    def route(self, url: str) -> _Route:
        """Raises ValueError for a URL, a proxy or credentials it cannot use (not cached: the
        next call says so again)."""
        route = self._routes.get(url)
        if route is None:
            with self._lock:
                route = self._routes.get(url) or self._new_route(url)
                self._routes[url] = route
        return route

    @staticmethod
    def _new_route(url: str) -> _Route:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        options: dict[str, Any] = {"maxsize": 64, "block": False, "retries": False}
        if parts.scheme == "https":
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if bundle and os.path.isdir(bundle):
                options["ca_cert_dir"] = bundle
            else:
                options["ca_certs"] = bundle or certifi.where()
        # No Accept-Encoding: the answers on the request path are small, and gzip cost more CPU
        # than it saved (0.54 against 0.35 ms a chain read against anvil).
        headers = {"Content-Type": "application/json"}
        user, password = get_auth_from_url(url)
        credentials = (user, password) if user or password else get_netrc_auth(url)
        if credentials:
            headers.update(urllib3.util.make_headers(basic_auth=":".join(credentials)))
        proxy = select_proxy(url, get_environ_proxies(url))
        if not proxy:
            return _Route(urllib3.PoolManager(**options), urldefragauth(url), headers)
        proxy = prepend_scheme_if_needed(proxy, "http")
        if not proxy.lower().startswith(("http://", "https://")):
            raise ValueError("only HTTP(S) proxies are supported")
        proxy_user, proxy_password = get_auth_from_url(proxy)
        proxy_headers = (
            urllib3.util.make_headers(proxy_basic_auth=f"{proxy_user}:{proxy_password}") if proxy_user else None
        )
        pool = urllib3.ProxyManager(urldefragauth(proxy), proxy_headers=proxy_headers, **options)
        return _Route(pool, urldefragauth(url), headers)

    def post(self, url: str, body: bytes, timeout: float) -> Any:
        """The decoded JSON answer. Raises ChainUnavailable for transport failures, an answer
        other than 2xx, or a body that is not JSON."""
        try:
            route = self.route(url)
            response = route.pool.urlopen(
                "POST", route.target, body=body, headers=route.headers, timeout=timeout, redirect=False
            )
            if not 200 <= response.status < 300:
                raise ChainUnavailable(f"RPC {endpoint(url)}: HTTP {response.status}")
            return json.loads(response.data)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ChainUnavailable(f"RPC {endpoint(url)}: {exc.__class__.__name__}") from None


_transport = _Transport()


def _reset_after_fork() -> None:
    """A forked child (a prefork Celery worker) must not share its parent's sockets."""
    global _transport
    _transport = _Transport()


os.register_at_fork(after_in_child=_reset_after_fork)


def rpc_batch(
    url: str,
    calls: list[tuple[str, list[Any]]],
    timeout: float | None = None,
    *,
    errors_inline: bool = False,
) -> list[Any]:
    """Send several JSON-RPC calls in one HTTP request; results in call order.

    Raises ChainUnavailable for transport failures. A call the node answered with an error
    raises RpcError, or with ``errors_inline`` stands in the results as an RpcError, so one bad
    item (a malformed hash, say) does not sink the rest of a batch.
    """
    timeout = timeout or x402.chain.rpc_timeout_seconds
    batch = [{"jsonrpc": "2.0", "id": next(_ids), "method": m, "params": p} for m, p in calls]
    answers = _transport.post(url, json.dumps(batch, separators=(",", ":")).encode(), timeout)
    if not isinstance(answers, list):
        raise ChainUnavailable(f"RPC {endpoint(url)}: batch not supported ({answers!r:.200})")
    by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
    results = []
    for call in batch:
        answer = by_id.get(call["id"])
        if answer is None:
            raise ChainUnavailable(f"RPC {endpoint(url)}: no answer for {call['method']}")
        if "error" in answer:
            error = RpcError(answer["error"] if isinstance(answer["error"], dict) else {"message": str(answer)})
            if not errors_inline:
                raise error
            results.append(error)
            continue
        results.append(answer.get("result"))
    return results


def rpc(url: str, method: str, params: list[Any], timeout: float | None = None) -> Any:
    return rpc_batch(url, [(method, params)], timeout)[0]


@dataclass(frozen=True, slots=True)
class PayerState:
    balance: int
    nonce_used: bool
    #: EIP-1271: None when not asked, else whether the payer is a contract approving the signature.
    contract_approves: bool | None = None
    #: The chain head these answers are from (where to start looking for the authorization's use).
    block: int | None = None
    #: ``upto``: what the payer lets Permit2 move of the token (None for ``exact``).
    allowance: int | None = None


IS_VALID_SIGNATURE = bytes.fromhex("1626ba7e")
#: EIP-1271's answer for "valid": the bytes4 magic value, ABI-encoded as a whole 32-byte word.
EIP1271_VALID_WORD = "0x" + IS_VALID_SIGNATURE.hex() + "00" * 28


def _word(value: bytes) -> str:
    return value.rjust(32, b"\x00").hex()


def _contract_calls(payer: bytes, contract_signature: tuple[bytes, bytes] | None) -> list[tuple[str, list[Any]]]:
    return [] if contract_signature is None else [("eth_getCode", ["0x" + payer.hex(), "latest"])]


def _contract_approves(
    url: str, payer: bytes, code: Any, contract_signature: tuple[bytes, bytes] | None
) -> bool | None:
    """EIP-1271: None when not asked; else whether ``payer`` is a contract approving the signature."""
    if contract_signature is None:
        return None
    if code in (None, "0x", "0x0"):
        return False
    from eth_abi import encode

    data = IS_VALID_SIGNATURE + encode(["bytes32", "bytes"], list(contract_signature))
    try:  # a contract: ask it (a revert is a no)
        answer = rpc(url, "eth_call", [{"to": "0x" + payer.hex(), "data": "0x" + data.hex()}, "latest"])
    except RpcError:
        return False
    return isinstance(answer, str) and answer.lower() == EIP1271_VALID_WORD


def payer_state(
    url: str, asset: str, payer: bytes, nonce: bytes, contract_signature: tuple[bytes, bytes] | None = None
) -> PayerState:
    """Balance of ``payer``, whether its authorization ``nonce`` is used and, given
    ``(digest, signature)``, whether the payer is a contract wallet approving it: one round trip."""
    balance_call = {"to": asset, "data": "0x" + BALANCE_OF.hex() + _word(payer)}
    state_call = {"to": asset, "data": "0x" + AUTHORIZATION_STATE.hex() + _word(payer) + nonce.hex()}
    calls: list[tuple[str, list[Any]]] = [
        ("eth_call", [balance_call, "latest"]),
        ("eth_call", [state_call, "latest"]),
        ("eth_blockNumber", []),
        *_contract_calls(payer, contract_signature),
    ]
    try:
        answers = rpc_batch(url, calls)
    except RpcError as exc:
        raise ChainUnavailable(f"token call failed: {exc.code}") from exc
    approves = _contract_approves(url, payer, answers[3] if contract_signature else None, contract_signature)
    try:
        return PayerState(
            balance=int(answers[0], 16),
            nonce_used=int(answers[1], 16) != 0,
            contract_approves=approves,
            block=int(answers[2], 16),
        )
    except (TypeError, ValueError) as exc:
        raise ChainUnavailable("token answered garbage") from exc


def permit2_state(
    url: str, asset: str, permit: UptoPermit, contract_signature: tuple[bytes, bytes] | None = None
) -> PayerState:
    """For an ``upto`` permit, in one round trip: the owner's balance, its allowance to Permit2,
    whether the permit's nonce bit is set in Permit2's bitmap, the head, and (given ``(digest,
    signature)``) whether the owner is a contract wallet approving the signature."""
    owner = permit.owner
    permit2 = bytes.fromhex(PERMIT2_ADDRESS[2:])
    calls: list[tuple[str, list[Any]]] = [
        ("eth_call", [{"to": asset, "data": "0x" + BALANCE_OF.hex() + _word(owner)}, "latest"]),
        ("eth_call", [{"to": asset, "data": "0x" + ALLOWANCE.hex() + _word(owner) + _word(permit2)}, "latest"]),
        (
            "eth_call",
            [
                {
                    "to": PERMIT2_ADDRESS,
                    "data": "0x" + NONCE_BITMAP.hex() + _word(owner) + permit.nonce_word.to_bytes(32, "big").hex(),
                },
                "latest",
            ],
        ),
        ("eth_blockNumber", []),
        *_contract_calls(owner, contract_signature),
    ]
    try:
        answers = rpc_batch(url, calls)
    except RpcError as exc:
        raise ChainUnavailable(f"token or Permit2 call failed: {exc.code}") from exc
    approves = _contract_approves(url, owner, answers[4] if contract_signature else None, contract_signature)
    try:
        return PayerState(
            balance=int(answers[0], 16),
            allowance=int(answers[1], 16),
            nonce_used=int(answers[2], 16) & permit.nonce_bit != 0,
            contract_approves=approves,
            block=int(answers[3], 16),
        )
    except (TypeError, ValueError) as exc:
        raise ChainUnavailable("token or Permit2 answered garbage (is Permit2 deployed on this chain?)") from exc


@dataclass(frozen=True, slots=True)
class AuthorizationUse:
    """What the chain says about one EIP-3009 authorization: the evidence behind a terminal state."""

    #: ``authorizationState``: used or canceled (it can never move money again).
    used: bool
    #: The transaction that used it (``AuthorizationUsed``), or canceled it (``AuthorizationCanceled``).
    used_in: str | None
    canceled_in: str | None
    head_block: int
    head_timestamp: int
    searched_from: int
    #: Used, but by no transaction that paid this payment (an upto permit's nonce spent by the
    #: payer elsewhere: Permit2 logs no nonce use to point at).
    used_elsewhere: bool = False

    def as_detail(self) -> dict[str, Any]:
        return {
            "authorization_used": self.used,
            "used_elsewhere": self.used_elsewhere,
            "used_in": self.used_in,
            "canceled_in": self.canceled_in,
            "head_block": self.head_block,
            "head_timestamp": self.head_timestamp,
            "searched_from_block": self.searched_from,
        }


def _topic_word(address: str) -> str:
    return "0x" + address[2:].lower().rjust(64, "0")


def authorization_use(
    url: str, asset: str, payer: str, nonce: str, *, from_block: int | None, lookback: int, span: int
) -> AuthorizationUse:
    """Ask the chain whether ``payer``'s authorization ``nonce`` was used, and by which transaction.

    One batch reads the head block and ``authorizationState``; only a used authorization costs a
    search of ``AuthorizationUsed``/``AuthorizationCanceled`` logs, newest first, in ranges of
    ``span`` blocks (providers cap ``eth_getLogs`` spans) back to ``from_block`` (else ``lookback``
    blocks before the head).
    """
    state_call = {
        "to": asset,
        "data": "0x" + AUTHORIZATION_STATE.hex() + _topic_word(payer)[2:] + nonce[2:].lower(),
    }
    try:
        head, state = rpc_batch(url, [("eth_getBlockByNumber", ["latest", False]), ("eth_call", [state_call, "latest"])])
        head_block, head_ts, used = int(head["number"], 16), int(head["timestamp"], 16), int(state, 16) != 0
    except (RpcError, TypeError, KeyError, ValueError) as exc:
        raise ChainUnavailable(f"authorization state unreadable: {exc}") from exc
    start = max(0, head_block - lookback) if from_block is None else max(0, from_block - 5)
    used_in = canceled_in = None
    if used:
        topics = [[AUTHORIZATION_USED_TOPIC, AUTHORIZATION_CANCELED_TOPIC], _topic_word(payer), nonce.lower()]
        high = head_block
        while high >= start and not (used_in or canceled_in):
            low = max(start, high - span + 1)
            try:
                logs = rpc(url, "eth_getLogs", [{"address": asset, "fromBlock": hex(low), "toBlock": hex(high), "topics": topics}])
            except RpcError as exc:
                raise ChainUnavailable(f"eth_getLogs {low}-{high}: {exc}") from exc
            for entry in logs:
                if entry["topics"][0].lower() == AUTHORIZATION_USED_TOPIC:
                    used_in = entry["transactionHash"]
                else:
                    canceled_in = entry["transactionHash"]
            high = low - 1
    return AuthorizationUse(used, used_in, canceled_in, head_block, head_ts, start)
