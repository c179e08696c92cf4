"""Receipts of our outgoing transactions (the outbox's rows, ``SettlementTx``): read in one
JSON-RPC batch, the mined hash and its gas recorded on the row, and the token's Transfer logs
matched. Settlement and refunds read them here."""

from __future__ import annotations

from typing import Any

from payments.chain.abi import TRANSFER_TOPIC
from payments.chain.node import ChainUnavailable, RpcError, rpc_batch
from payments.models import SettlementTx


def read_receipts(url: str, hashes: list[str]) -> tuple[dict[str, Any], int]:
    """Receipts of ``hashes`` and the latest block number, in one JSON-RPC batch.

    A hash the node refuses maps to its RpcError (raised for its group alone, see
    :func:`raise_refused`), so one malformed row cannot sink the batch; a node that cannot say
    its latest block raises ChainUnavailable.
    """
    hashes = list(dict.fromkeys(hashes))
    answers = rpc_batch(
        url, [("eth_blockNumber", [])] + [("eth_getTransactionReceipt", [h]) for h in hashes], errors_inline=True
    )
    if isinstance(answers[0], RpcError):
        raise ChainUnavailable(f"eth_blockNumber: {answers[0]}")
    return dict(zip(hashes, answers[1:], strict=True)), int(answers[0], 16)


def raise_refused(receipts: dict[str, Any], hashes: list[str]) -> None:
    """Raise the node's error about one of ``hashes`` (see :func:`read_receipts`)."""
    for h in hashes:
        if isinstance(receipts.get(h), RpcError):
            raise receipts[h]


def note_mined(tx: SettlementTx, receipts: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Record on our transaction which of its hashes was mined, where, and the gas it cost (or
    that its block was dropped by a reorg); the mined (hash, receipt), or None."""
    mined = next(((h, receipts[h]) for h in tx.hashes if receipts.get(h)), None)
    changes: dict[str, Any] = {}
    if mined is None:
        if tx.block_number is not None:
            changes["block_number"] = None
    else:
        tx_hash, receipt = mined
        if tx_hash != tx.tx_hash:  # an older, replaced signature was the one mined
            changes.update(tx_hash=tx_hash, replaced_hashes=[h for h in tx.hashes if h != tx_hash])
        block = int(receipt["blockNumber"], 16)
        if tx.block_number != block:
            changes["block_number"] = block
        if receipt.get("from", "").lower() == tx.relayer.lower():
            gas, cost = gas_of(receipt)
            if (tx.gas_used, tx.gas_cost_wei) != (gas, cost):
                changes.update(gas_used=gas, gas_cost_wei=cost)
    if changes:
        for name, value in changes.items():
            setattr(tx, name, value)
        SettlementTx.objects.filter(pk=tx.pk).update(**changes)
    return mined


def gas_of(receipt: dict[str, Any]) -> tuple[int, int]:
    """(gas used, wei paid for it) by a mined transaction."""
    gas = int(receipt.get("gasUsed", "0x0"), 16)
    return gas, gas * int(receipt.get("effectiveGasPrice", "0x0"), 16)


def word(address: str) -> str:
    """An address as a 32-byte log topic."""
    return "0x" + address[2:].lower().rjust(64, "0")


def has_transfer(receipt: dict[str, Any], token: str, source: str, to: str, amount: int) -> bool:
    """The receipt carries the token's ``Transfer(source -> to, amount)``."""
    topics = [TRANSFER_TOPIC, word(source), word(to)]
    return any(
        entry["address"].lower() == token.lower()
        and [t.lower() for t in entry["topics"]] == topics
        and int(entry["data"], 16) == amount
        for entry in receipt.get("logs", [])
    )
