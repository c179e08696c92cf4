"""Chain access: the batched reads of the paid-request path, and the relayer's transactions.

Reads on the request path use raw JSON-RPC batches (one round trip for balance and nonce
state); web3.py is used by the relayer in workers, where its import and per-call overhead do
not matter.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import requests
from django.conf import settings

from .abi import AUTHORIZATION_STATE, BALANCE_OF


class ChainUnavailable(Exception):
    """The node did not answer usefully: the caller must not treat this as a yes or a no."""


class RpcError(Exception):
    """The node answered with a JSON-RPC error (a revert, a rejected transaction...)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", str(error)))
        self.code = error.get("code")
        self.data = error.get("data")


_local = threading.local()
_ids = itertools.count(1)


def _session() -> requests.Session:
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def rpc_batch(url: str, calls: list[tuple[str, list[Any]]], timeout: float | None = None) -> list[Any]:
    """Send several JSON-RPC calls in one HTTP request; results in call order.

    Raises ChainUnavailable for transport failures and RpcError for the first call the node
    answered with an error.
    """
    timeout = timeout or settings.X402_RPC_TIMEOUT_SECONDS
    batch = [{"jsonrpc": "2.0", "id": next(_ids), "method": m, "params": p} for m, p in calls]
    try:
        response = _session().post(url, json=batch, timeout=timeout)
        response.raise_for_status()
        answers = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise ChainUnavailable(f"RPC {url}: {exc.__class__.__name__}") from exc
    if not isinstance(answers, list):
        raise ChainUnavailable(f"RPC {url}: batch not supported ({answers!r:.200})")
    by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
    results = []
    for call in batch:
        answer = by_id.get(call["id"])
        if answer is None:
            raise ChainUnavailable(f"RPC {url}: no answer for {call['method']}")
        if "error" in answer:
            raise RpcError(answer["error"])
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


IS_VALID_SIGNATURE = bytes.fromhex("1626ba7e")


def _word(value: bytes) -> str:
    return value.rjust(32, b"\x00").hex()


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
    ]
    if contract_signature is not None:
        from eth_abi import encode

        data = IS_VALID_SIGNATURE + encode(["bytes32", "bytes"], list(contract_signature))
        calls += [("eth_getCode", ["0x" + payer.hex(), "latest"])]
    try:
        answers = rpc_batch(url, calls)
    except RpcError as exc:
        raise ChainUnavailable(f"token call failed: {exc}") from exc
    approves = None
    if contract_signature is not None:
        approves = False
        if answers[2] not in (None, "0x", "0x0"):  # a contract: ask it (a revert is a no)
            try:
                answer = rpc(
                    url, "eth_call", [{"to": "0x" + payer.hex(), "data": "0x" + data.hex()}, "latest"]
                )
                approves = isinstance(answer, str) and answer[2:10].lower() == IS_VALID_SIGNATURE.hex()
            except RpcError:
                approves = False
    try:
        return PayerState(
            balance=int(answers[0], 16), nonce_used=int(answers[1], 16) != 0, contract_approves=approves
        )
    except (TypeError, ValueError) as exc:
        raise ChainUnavailable("token answered garbage") from exc
