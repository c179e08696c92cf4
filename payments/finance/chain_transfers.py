"""The token Transfers of our addresses on chain, for reconciliation: to a pay-to (payments) or
from a refund wallet (refunds), in a block range.

The chain is read in bounded block ranges (providers cap ``eth_getLogs`` spans); blocks with
the option's confirmations are read once and kept (:class:`ScannedRange`, :class:`ChainTransfer`),
newer ones are read afresh each time (a reorg may still change them).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from django.db import transaction
from django.db.models import Q
from eth_utils import to_checksum_address

from payments.chain.abi import TRANSFER_TOPIC
from payments.chain.node import ChainUnavailable, RpcError, rpc, rpc_batch
from payments.models import ChainTransfer, ScannedRange, TransferDirection
from payments.options import ConfiguredOption
from x402site.conf import x402


def _word(address: str) -> str:
    return "0x" + address[2:].lower().rjust(64, "0")


def _address(topic: str) -> str:
    return to_checksum_address("0x" + topic[-40:])


class Blocks:
    """Block timestamps of one chain, each read once per report."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: dict[int, int] = {}

    def head(self) -> int:
        return int(rpc(self.url, "eth_blockNumber", []), 16)

    def time(self, number: int) -> int:
        if number not in self.times:
            self.load([number])
        return self.times[number]

    def load(self, numbers: Iterable[int]) -> None:
        missing = sorted({n for n in numbers if n not in self.times})
        for i in range(0, len(missing), 100):
            part = missing[i : i + 100]
            blocks = rpc_batch(self.url, [("eth_getBlockByNumber", [hex(n), False]) for n in part])
            for n, block in zip(part, blocks, strict=True):
                if not block:
                    raise ChainUnavailable(f"block {n} is unknown to the node")
                self.times[n] = int(block["timestamp"], 16)

    def first_at_or_after(self, when: datetime, head: int) -> int:
        """The lowest block stamped at or after ``when`` (``head + 1`` if none is yet)."""
        target = int(when.timestamp())
        low, high = 0, head + 1
        while low < high:
            mid = (low + high) // 2
            if self.time(mid) >= target:
                high = mid
            else:
                low = mid + 1
        return low


def _covered(
    conf: ConfiguredOption, address: str, direction: str, first: int, last: int
) -> list[tuple[int, int]]:
    """The stored ranges overlapping [first, last], in order."""
    return list(
        ScannedRange.objects.filter(
            network=conf.option.network,
            asset=conf.option.asset,
            address=address,
            direction=direction,
            from_block__lte=last,
            to_block__gte=first,
        )
        .order_by("from_block")
        .values_list("from_block", "to_block")
    )


def gaps(covered: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The parts of [first, last] no range of ``covered`` (sorted by start) holds."""
    out, cursor = [], first
    for start, end in covered:
        if start > cursor:
            out.append((cursor, min(start - 1, last)))
        cursor = max(cursor, end + 1)
        if cursor > last:
            break
    if cursor <= last:
        out.append((cursor, last))
    return out


def _read_logs(
    conf: ConfiguredOption, address: str, direction: str, first: int, last: int, blocks: Blocks
) -> list[ChainTransfer]:
    """Transfer logs to (or from) ``address`` in [first, last], read ``X402_LOG_SPAN_BLOCKS`` at
    a time; unsaved rows."""
    topics = (
        [TRANSFER_TOPIC, None, _word(address)]
        if direction == TransferDirection.TO
        else [TRANSFER_TOPIC, _word(address)]
    )
    span = max(1, x402.chain.log_span_blocks)
    logs: list[dict[str, Any]] = []
    for start in range(first, last + 1, span):
        end = min(last, start + span - 1)
        try:
            logs += rpc(
                conf.rpc_url,
                "eth_getLogs",
                [
                    {
                        "address": conf.option.asset,
                        "fromBlock": hex(start),
                        "toBlock": hex(end),
                        "topics": topics,
                    }
                ],
            )
        except RpcError as exc:
            raise ChainUnavailable(f"eth_getLogs {start}-{end}: {exc}") from exc
    blocks.load(int(entry["blockNumber"], 16) for entry in logs if not entry.get("removed"))
    return [
        ChainTransfer(
            network=conf.option.network,
            asset=conf.option.asset,
            tx_hash=entry["transactionHash"].lower(),
            log_index=int(entry["logIndex"], 16),
            block_number=int(entry["blockNumber"], 16),
            block_time=datetime.fromtimestamp(blocks.time(int(entry["blockNumber"], 16)), UTC),
            sender=_address(entry["topics"][1]),
            recipient=_address(entry["topics"][2]),
            amount=int(entry["data"], 16),
        )
        for entry in logs
        if not entry.get("removed")
    ]


def transfers(
    conf: ConfiguredOption, address: str, direction: str, first: int, last: int, *, head: int, blocks: Blocks
) -> list[ChainTransfer]:
    """Every Transfer to (or from) ``address`` of the option's token in blocks [first, last]:
    final blocks from the store (read and stored first where never read), the newest blocks
    read live."""
    if last < first:
        return []
    final = min(last, head - max(conf.option.confirmations, 1) + 1)
    for start, end in gaps(_covered(conf, address, direction, first, final), first, final):
        found = _read_logs(conf, address, direction, start, end, blocks)
        with transaction.atomic():
            ChainTransfer.objects.bulk_create(found, ignore_conflicts=True)
            ScannedRange.objects.create(
                network=conf.option.network,
                asset=conf.option.asset,
                address=address,
                direction=direction,
                from_block=start,
                to_block=end,
            )
    side = Q(recipient=address) if direction == TransferDirection.TO else Q(sender=address)
    stored = list(
        ChainTransfer.objects.filter(
            side,
            network=conf.option.network,
            asset=conf.option.asset,
            block_number__gte=first,
            block_number__lte=final,
        ).order_by("block_number", "log_index")
    )
    live = _read_logs(conf, address, direction, max(first, final + 1), last, blocks) if last > final else []
    return stored + live
