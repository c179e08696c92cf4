"""The settlement contract's view of our channels: reads (``channels``, ``pendingWithdrawals``,
``refundNonce``, ``receivers``) in one JSON-RPC batch, the mirror brought up to date with them,
and the calldata of the calls our relayer sends.

A channel we hold no record of (our state was lost, or a deposit we did not relay) is adopted
from the chain: its baseline is the claimed total there (``ChannelMirror.from_chain``), so a
voucher built on it is accepted and nothing claimed is ever charged again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Case, F, Sum, Value, When
from django.db.models.functions import Greatest
from django.utils import timezone
from eth_abi import decode as abi_decode
from eth_hash.auto import keccak

from payments.chain.node import ChainUnavailable, RpcError, rpc_batch
from payments.channels.models import Channel, ChannelStatus, ChannelTx, ChannelTxStatus
from payments.models import SettlementTx
from payments.x402 import batch_settlement as bs

WITHDRAW_INITIATED_TOPIC = "0x" + keccak(b"WithdrawInitiated(bytes32,uint128,uint40)").hex()
REFUNDED_TOPIC = "0x" + keccak(b"Refunded(bytes32,address,uint128)").hex()


@cache
def contract() -> Any:
    """The settlement contract's ABI, for calldata (no provider: nothing is sent through it)."""
    from web3 import Web3

    from payments.chain import contracts

    return Web3().eth.contract(
        address=bs.BATCH_SETTLEMENT_ADDRESS, abi=contracts.artifact("X402BatchSettlement")["abi"]
    )


def calldata(function: str, *args: Any) -> str:
    return contract().encode_abi(function, args=list(args))


@dataclass(frozen=True, slots=True)
class ChainChannel:
    """One channel as the contract holds it."""

    balance: int
    total_claimed: int
    refund_nonce: int
    withdraw_amount: int
    #: Unix seconds the payer's timed withdrawal started; 0: none pending.
    withdraw_initiated_at: int


def _call(function: str, *args: Any) -> tuple[str, list[Any]]:
    return "eth_call", [{"to": bs.BATCH_SETTLEMENT_ADDRESS, "data": calldata(function, *args)}, "latest"]


def _words(answer: Any, types: list[str]) -> tuple[Any, ...]:
    if isinstance(answer, RpcError) or not isinstance(answer, str):
        raise ChainUnavailable(f"{bs.ErrorCode.CHANNEL_STATE_READ_FAILED}: {answer}")
    return tuple(abi_decode(types, bytes.fromhex(answer[2:])))


def read_channels(url: str, channel_ids: list[bytes]) -> list[ChainChannel]:
    """The contract's state of each channel, in one batch (ChainUnavailable if any is unreadable)."""
    calls = []
    for cid in channel_ids:
        calls += [_call("channels", cid), _call("pendingWithdrawals", cid), _call("refundNonce", cid)]
    answers = rpc_batch(url, calls, errors_inline=True) if calls else []
    states = []
    for i in range(0, len(answers), 3):
        balance, claimed = _words(answers[i], ["uint128", "uint128"])
        pending, started = _words(answers[i + 1], ["uint128", "uint40"])
        (nonce,) = _words(answers[i + 2], ["uint256"])
        states.append(ChainChannel(balance, claimed, nonce, pending, started))
    return states


def receiver_state(url: str, receiver: str, token: str) -> tuple[int, int]:
    """(claimed, settled) in total for ``receiver`` in ``token``: what ``settle`` would send is the difference."""
    (answer,) = rpc_batch(url, [_call("receivers", receiver, token)], errors_inline=True)
    claimed, settled = _words(answer, ["uint128", "uint128"])
    return claimed, settled


def _moment(seconds: int) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def apply(channel: Channel, chain: ChainChannel) -> Channel:
    """Write the chain's fields on the channel's row (the balance less refunds still out); ours
    follow only where the chain is ahead of us (a claimed total above what we charged: our record was lost, the chain's baseline wins).
    Our fields are updated in the database (``Greatest``), so a charge committed meanwhile is kept."""
    started = chain.withdraw_initiated_at
    # Closed: nothing unclaimed left in escrow (refunded, or withdrawn to the last unit).
    emptied = chain.balance == chain.total_claimed and (chain.balance > 0 or channel.balance > 0)
    if started:
        status = ChannelStatus.WITHDRAWING
    elif emptied:
        status = ChannelStatus.CLOSED
    else:
        status = ChannelStatus.OPEN
    claimed = Decimal(chain.total_claimed)
    # A refund still out has already left our balance (outbox.refund): the chain's is not ours yet.
    returning = ChannelTx.objects.filter(
        channel=channel, status=ChannelTxStatus.SENT, tx__kind=SettlementTx.Kind.CHANNEL_REFUND
    ).aggregate(total=Sum("amount"))["total"] or Decimal(0)
    fields = {
        "balance": max(Decimal(chain.balance) - returning, Decimal(0)),
        "total_claimed": claimed,
        "refund_nonce": Decimal(chain.refund_nonce),
        "withdraw_amount": Decimal(chain.withdraw_amount),
        "withdraw_initiated_at": _moment(started),
        "withdraw_finalize_after": _moment(started + channel.withdraw_delay) if started else None,
        "status": status,
        "chain_read_at": timezone.now(),
    }
    Channel.objects.filter(pk=channel.pk).update(
        **fields,
        # A voucher below the chain's claimed total is worth nothing: forget its signature (the
        # payer's next voucher, built on the claimed total, replaces it).
        voucher_signature=Case(
            When(signed_max_claimable__lt=claimed, then=Value("")), default=F("voucher_signature")
        ),
        signed_max_claimable=Greatest(F("signed_max_claimable"), claimed),
        charged_cumulative=Greatest(F("charged_cumulative"), claimed),
    )
    channel.refresh_from_db()
    return channel


def refresh_from_chain(url: str, channels: list[Channel]) -> list[Channel]:
    """Read the contract's state of ``channels`` (one batch) and bring their mirrors up to date."""
    states = read_channels(url, [c.id_bytes for c in channels])
    return [apply(c, s) for c, s in zip(channels, states, strict=True)]


def channel_for(url: str, network: str, config: bs.ChannelConfig, channel_id: bytes) -> Channel:
    """Our row of the channel, created on first sight; a channel new to us is read from the
    chain at once (it may hold deposits and claims already: our record was lost)."""
    key = bs.hex_of(channel_id)
    channel = Channel.objects.filter(channel_id=key).first()
    if channel is not None:
        return channel
    try:
        with transaction.atomic():
            channel = Channel.objects.create(channel_id=key, network=network, **Channel.fields_of(config))
    except IntegrityError:
        return Channel.objects.get(channel_id=key)
    (channel,) = refresh_from_chain(url, [channel])
    return channel
