"""When to claim: the periodic pass over our channels.

What we charged and did not claim is credit the payer could still take back with a timed
withdrawal, so claims are due when a channel's unclaimed charges reach
``X402_CHANNEL_CLAIM_UNCLAIMED_MAX``, when all channels' together reach
``X402_CHANNEL_CLAIM_TOTAL_MAX`` (then every channel with unclaimed charges is claimed), when a
channel's oldest unclaimed charge is ``X402_CHANNEL_CLAIM_MAX_AGE`` seconds old, and at once
when the payer starts a timed withdrawal (the contract's ``WithdrawInitiated`` events are
watched, and the mirrors read, on every pass). Claimed funds are then settled to pay-to.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.core.cache import cache
from django.db.models import F, Q
from django.utils import timezone

from payments.chain.node import rpc
from payments.channels import outbox, state
from payments.channels.models import Channel, ChannelCharge, ChannelStatus
from payments.options import ConfiguredOption
from payments.x402 import batch_settlement as bs
from x402site.conf import x402

log = logging.getLogger("payments.channels")
#: The last block whose ``WithdrawInitiated`` events were read, per option (a lost cursor only
#: costs a wider scan: the mirrors of channels with unclaimed charges are read on every pass too).
CURSOR = "payments.channels.withdraw-scan:{network}:{asset}"


def _ours(conf: ConfiguredOption) -> Any:
    return Channel.objects.filter(network=conf.option.network, asset=conf.option.asset)


def withdrawals_started(conf: ConfiguredOption) -> list[Channel]:
    """Our channels whose payer started a timed withdrawal since the last scan (the contract's
    ``WithdrawInitiated`` logs), their mirrors read from the chain."""
    latest = int(rpc(conf.rpc_url, "eth_blockNumber", []), 16)
    key = CURSOR.format(network=conf.option.network, asset=conf.option.asset)
    start = cache.get(key)
    start = max(latest - x402.chain.log_lookback_blocks, 0) if start is None else start + 1
    ids: set[str] = set()
    while start <= latest:
        end = min(start + x402.chain.log_span_blocks - 1, latest)
        logs = rpc(
            conf.rpc_url,
            "eth_getLogs",
            [
                {
                    "address": bs.BATCH_SETTLEMENT_ADDRESS,
                    "fromBlock": hex(start),
                    "toBlock": hex(end),
                    "topics": [state.WITHDRAW_INITIATED_TOPIC],
                }
            ],
        )
        ids |= {entry["topics"][1].lower() for entry in logs}
        start = end + 1
    cache.set(key, latest, timeout=None)
    channels = list(_ours(conf).filter(channel_id__in=ids))
    if channels:
        log.warning("timed withdrawal started on %s channel(s): claiming at once", len(channels))
        state.refresh_from_chain(conf.rpc_url, channels)
    return channels


def due(conf: ConfiguredOption) -> list[Channel]:
    """Channels whose unclaimed charges must be claimed now (see the module's doc)."""
    unclaimed = _ours(conf).filter(charged_cumulative__gt=F("total_claimed"))
    rows = list(unclaimed.order_by("pk"))
    total = sum(c.unclaimed for c in rows)
    if total >= x402.channels.claim_total_max:
        return rows
    cutoff = timezone.now() - timedelta(seconds=x402.channels.claim_max_age_seconds)
    aged = set(
        ChannelCharge.objects.filter(
            channel__in=unclaimed, cumulative__gt=F("channel__total_claimed"), created_at__lte=cutoff
        ).values_list("channel_id", flat=True)
    )
    return [
        c
        for c in rows
        if c.unclaimed >= x402.channels.claim_unclaimed_max
        or c.status == ChannelStatus.WITHDRAWING
        or c.pk in aged
    ]


def sweep(conf: ConfiguredOption) -> dict[str, int]:
    """One pass on ``conf``'s channels: follow the channel transactions still out, watch for
    timed withdrawals, refresh the mirrors of channels with unclaimed charges, claim the due
    ones in one transaction, and settle claimed funds to pay-to once no claim is out. Without
    channels (or without our receiverAuthorizer key) there is nothing to do and nothing is read."""
    stats = {"tracked": 0, "claimed": 0, "settled": 0}
    if not x402.channels.authorizer_key or not _ours(conf).exists():
        return stats
    for tx_id in outbox.open_transactions(conf.option.network):
        try:
            outbox.track(tx_id)
        except Exception:  # noqa: BLE001 - one transaction's trouble must not stop the pass
            log.exception("channel transaction %s: tracking failed", tx_id)
        stats["tracked"] += 1
    withdrawals_started(conf)
    watched = Q(charged_cumulative__gt=F("total_claimed")) | Q(status=ChannelStatus.WITHDRAWING)
    pending = list(_ours(conf).filter(watched))
    if pending:
        state.refresh_from_chain(conf.rpc_url, pending)
    claim = outbox.claim(conf, due(conf))
    if claim is not None:
        stats["claimed"] = claim.items
    elif not outbox.claiming(conf.option.network) and outbox.settle(conf) is not None:
        stats["settled"] = 1
    return stats
