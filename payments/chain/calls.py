"""The settlement call, as sent and as simulated, and how the chain answers it: the parts of
settlement every scheme and every settler share (no ledger writes here)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from payments.chain import relayer as relayers
from payments.chain.node import RpcError, rpc
from payments.models import Payment

T = TypeVar("T")

#: How the chain says a settlement came before its authorization's ``validAfter``: the token's
#: require message, and the upto proxy's ``PaymentTooEarly()`` error (its selector).
NOT_YET_VALID_MESSAGE = "authorization is not yet valid"
PAYMENT_TOO_EARLY = "0xa65539fa"
#: Longest wait, in a settlement or at the gate, for an authorization that becomes valid in the
#: next seconds (the token wants ``block.timestamp > validAfter``, and a client may sign
#: ``validAfter`` = now): waited out, never called a failure.
VALID_AFTER_WAIT_SECONDS = 3


@dataclass(frozen=True, slots=True)
class SettlementCall:
    """The transaction that settles one payment: whom it calls, with what, from which lane."""

    to: str
    data: str
    gas_limit: int
    #: The lane that must send it (None: any).
    sender: str | None = None


class UseNotFound(RuntimeError):
    """The chain says the authorization was used, but not (within the searched blocks) by what."""


def not_yet_valid(exc: RpcError) -> bool:
    """The call reverted only because its block is earlier than the authorization's validAfter."""
    data = exc.data if isinstance(exc.data, str) else ""
    return NOT_YET_VALID_MESSAGE in str(exc) or data.lower().startswith(PAYMENT_TOO_EARLY)


def is_revert(exc: RpcError) -> bool:
    """The call reverted (the EVM said no: JSON-RPC code 3, a revert message or revert data), as
    opposed to the node failing to answer it (a provider's rate limit, missing state): only a
    revert may refuse a payment; anything else is the chain being unavailable."""
    data = exc.data if isinstance(exc.data, str) else ""
    return exc.code == 3 or "revert" in str(exc).lower() or len(data) > 2


def revert_message(exc: RpcError) -> str:
    return str(exc)[:500]


def wait_for_valid_after(valid_after: int) -> None:
    """Sleep until our clock is past ``valid_after`` if that is at most a few seconds away."""
    wait = valid_after + 1 - time.time()
    if 0 < wait <= VALID_AFTER_WAIT_SECONDS:
        time.sleep(wait)


def when_valid(valid_after: int, simulation: Callable[[], T]) -> T:
    """``simulation()`` once a block mined now may use an authorization valid after
    ``valid_after`` (its timestamp must be past it): waited out for a few seconds at most,
    by our clock and then by the node's (asked again while it answers "not yet valid"). Raises
    the last RpcError."""
    deadline = time.monotonic() + VALID_AFTER_WAIT_SECONDS
    wait_for_valid_after(valid_after)
    while True:
        try:
            return simulation()
        except RpcError as exc:
            if not not_yet_valid(exc) or time.monotonic() + 0.5 > deadline:
                raise
            time.sleep(0.5)


def simulate(url: str, call: SettlementCall) -> None:
    """Run ``call`` as the transaction that will be sent: from its lane, in the block it will be
    mined in (``pending``: on a chain idle for a while the latest block is minutes old, and an
    authorization valid now would look not yet valid there). Raises RpcError when it reverts."""
    sender = call.sender or relayers.lanes()[0].address
    tx = {"from": sender, "to": call.to, "data": call.data, "gas": hex(call.gas_limit)}
    rpc(url, "eth_call", [tx, "pending"])


def payment_hashes(p: Payment) -> list[str]:
    """Every transaction that may settle this payment: our transaction's hashes (the current
    one and those it replaced), or the one found on chain."""
    if p.settlement_tx_id is not None:
        return p.settlement_tx.hashes
    return [p.settle_tx_hash] if p.settle_tx_hash else []


def word(address: str) -> str:
    """An address as a 32-byte log topic or call argument."""
    return "0x" + address[2:].lower().rjust(64, "0")


def transfer_logs(receipt: dict[str, Any], asset: str) -> list[list[str]]:
    """The ``asset`` token's logs in a receipt: each its topics (lower case), then its data."""
    return [
        [t.lower() for t in e.get("topics", [])] + [e.get("data", "0x0")]
        for e in receipt.get("logs", [])
        if e.get("address", "").lower() == asset.lower()
    ]


def succeeded(receipt: dict[str, Any]) -> bool:
    """The receipt's transaction did not revert."""
    return int(receipt.get("status", "0x0"), 16) == 1
