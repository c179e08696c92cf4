"""The transactions our relayer sends for channels, through the outbox of signed transactions
(``SettlementTx``, see ``payments.chain.relayer``): deposits (the payer's EIP-3009 authorization
relayed to ``deposit``, so the payer pays no gas), claims of many channels' vouchers in one
``claimWithSignature`` signed by our receiverAuthorizer key, ``settle`` of claimed funds to
pay-to, and cooperative refunds (``refundWithSignature``, after claiming what we charged, in one
``multicall``). Each is simulated, signed and stored with its ``ChannelTx`` rows in one database
transaction, then broadcast; :func:`track` follows it to its outcome like any other outbox row
(rebroadcast, re-signed when stuck, dropped when its nonce was used otherwise) and brings the
channels' mirrors up to date with the chain.

The receiverAuthorizer key (``X402_CHANNEL_AUTHORIZER_KEY``) only signs claim batches and
refunds; it never sends a transaction (a relayer lane does), so it needs no gas.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from functools import lru_cache

from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount

from payments.chain import relayer as relayers
from payments.chain.abi import TRANSFER_TOPIC
from payments.chain.node import RpcError, rpc, rpc_batch
from payments.chain.receipts import note_mined, raise_refused, read_receipts
from payments.channels import state
from payments.channels.models import Channel, ChannelTx, ChannelTxStatus
from payments.models import SettlementTx
from payments.options import ConfiguredOption, configured
from payments.x402 import batch_settlement as bs
from x402site.conf import x402

log = logging.getLogger("payments.channels")
Kind = SettlementTx.Kind
S = ChannelTxStatus
#: Gas asked for above the node's estimate.
GAS_HEADROOM = 1.3
_SIMULATION_FAILED = {
    Kind.CHANNEL_DEPOSIT: bs.ErrorCode.DEPOSIT_SIMULATION_FAILED,
    Kind.CHANNEL_CLAIM: bs.ErrorCode.CLAIM_SIMULATION_FAILED,
    Kind.CHANNEL_SETTLE: bs.ErrorCode.SETTLE_SIMULATION_FAILED,
    Kind.CHANNEL_REFUND: bs.ErrorCode.REFUND_SIMULATION_FAILED,
}


@lru_cache(maxsize=4)
def _account(key: str) -> LocalAccount:
    return Account.from_key(key)


def authorizer() -> LocalAccount:
    """Our receiverAuthorizer (``X402_CHANNEL_AUTHORIZER_KEY``; never a relayer key)."""
    key = x402.channels.authorizer_key
    if not key:
        raise ImproperlyConfigured("X402_CHANNEL_AUTHORIZER_KEY is not set: channel claims cannot be signed")
    account = _account(key)
    if account.address in {a.address for a in relayers.lanes()}:
        raise ImproperlyConfigured("X402_CHANNEL_AUTHORIZER_KEY must not be a relayer key")
    return account


def _sign(digest: bytes) -> bytes:
    return bytes(authorizer().unsafe_sign_hash(digest).signature)


def option_on(network: str) -> ConfiguredOption:
    """The configured option on ``network`` (its node and confirmation depth)."""
    for conf in configured():
        if conf.option.network == network:
            return conf
    raise LookupError(f"no payment option on {network}")


def _store(
    conf: ConfiguredOption, kind: str, data: str, links: Sequence[tuple[Channel | None, int]]
) -> SettlementTx:
    """Simulate the call from a relayer lane, then sign and store it with its ``ChannelTx`` rows
    (call inside a transaction; broadcast after it commits). ChannelRejected with the kind's
    ``*_simulation_failed`` code when the node says it would revert."""
    lane = relayers.take_lane(conf.option.network)
    call = {"from": lane.account.address, "to": bs.BATCH_SETTLEMENT_ADDRESS, "data": data}
    try:
        estimate, block = rpc_batch(
            conf.rpc_url, [("eth_estimateGas", [call, "pending"]), ("eth_getBlockByNumber", ["latest", False])]
        )
    except RpcError as exc:
        raise bs.ChannelRejected(_SIMULATION_FAILED[kind], str(exc)) from exc
    tx = relayers.sign_and_store(
        conf,
        lane,
        kind=kind,
        to=bs.BATCH_SETTLEMENT_ADDRESS,
        data=data,
        gas_limit=int(int(estimate, 16) * GAS_HEADROOM),
        items=max(len(links), 1),
        block=block,
    )
    ChannelTx.objects.bulk_create([ChannelTx(tx=tx, channel=c, amount=Decimal(a)) for c, a in links])
    return tx


def _send(conf: ConfiguredOption, kind: str, data: str, links: Sequence[tuple[Channel | None, int]]) -> SettlementTx:
    with transaction.atomic():
        tx = _store(conf, kind, data, links)
    relayers.broadcast(conf.rpc_url, tx)
    return tx


# ---------------------------------------------------------------------------- deposit


def deposit(conf: ConfiguredOption, payload: bs.DepositPayload) -> SettlementTx:
    """Relay the payer's deposit: ``deposit(config, amount, collector, collectorData)``. The
    channel's row is created (or adopted from the chain) first; its balance counts the deposit
    once the transaction is mined (:func:`track`)."""
    channel = state.channel_for(conf.rpc_url, conf.option.network, payload.config, payload.voucher.channel_id)
    data = state.calldata(
        "deposit",
        payload.config.abi(),
        payload.deposit.amount,
        bs.ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        payload.deposit.collector_data(),
    )
    with transaction.atomic():
        # One deposit on its way per channel: the same payload sent twice at once is relayed once
        # (the second would revert at our gas cost).
        Channel.objects.select_for_update().get(pk=channel.pk)
        if ChannelTx.objects.filter(channel=channel, tx__kind=Kind.CHANNEL_DEPOSIT, status=S.SENT).exists():
            raise bs.ChannelRejected(
                bs.ErrorCode.DEPOSIT_TRANSACTION_FAILED, "a deposit into this channel is on its way: retry once it is mined"
            )
        tx = _store(conf, Kind.CHANNEL_DEPOSIT, data, [(channel, payload.deposit.amount)])
    relayers.broadcast(conf.rpc_url, tx)
    return tx


# ---------------------------------------------------------------------------- claim and settle


def claiming(network: str) -> set[int]:
    """Channels on ``network`` with a claim or refund transaction still out."""
    return set(
        ChannelTx.objects.filter(
            status=S.SENT, tx__network=network, tx__kind__in=[Kind.CHANNEL_CLAIM, Kind.CHANNEL_REFUND]
        ).values_list("channel_id", flat=True)
    )


def _claim_row(channel: Channel) -> bs.VoucherClaim | None:
    """The row raising the chain's claimed total to what we charged, at most the balance (a
    payer who withdrew before we claimed took the rest); None when there is nothing to claim."""
    row = channel.voucher_claim()
    total = min(row.total_claimed, int(channel.balance))
    if total <= int(channel.total_claimed) or not channel.voucher_signature:
        return None
    return bs.VoucherClaim(row.config, row.max_claimable, row.signature, total)


def claim_args(conf: ConfiguredOption, rows: list[bs.VoucherClaim]) -> tuple[list[object], bytes]:
    """``claimWithSignature``'s arguments: the rows and our receiverAuthorizer's signature of them."""
    return [r.abi() for r in rows], _sign(bs.claim_batch_digest(rows, conf.option.chain_id))


def claim(conf: ConfiguredOption, channels: Sequence[Channel]) -> SettlementTx | None:
    """Claim what we charged on ``channels`` (of ``conf``'s token and our receiverAuthorizer) in
    one transaction; channels with a claim still out are left to it. The mirrors are read from
    the chain first (a withdrawal may have taken part of a balance). A batch the node refuses is
    cut to the rows it accepts one by one (a bad row must not hold the others' money back).
    None: nothing to claim."""
    ours = authorizer().address
    busy = claiming(conf.option.network)
    candidates = [
        c
        for c in channels
        if c.pk not in busy and c.receiver_authorizer == ours and c.asset == conf.option.asset and c.unclaimed
    ]
    if not candidates:
        return None
    # Rows that claim something, then the batch's size: channels that cannot be claimed (charged
    # beyond what a withdrawal left) never take the places of those that can.
    rows = [
        (c, row)
        for c in state.refresh_from_chain(conf.rpc_url, candidates)
        if (row := _claim_row(c)) is not None
    ][: x402.channels.claim_batch_max]
    if not rows:
        return None
    try:
        return _claim(conf, rows)
    except bs.ChannelRejected as exc:
        if exc.code is not bs.ErrorCode.CLAIM_SIMULATION_FAILED:
            raise
        good = _claimable(conf, rows)
        kept = {c.pk for c, _ in good}
        refused = [c.channel_id for c, _ in rows if c.pk not in kept]
        log.error("claim refused by the node for channel(s) %s: %s", refused, exc)
        if not good or len(good) == len(rows):
            return None
        return _claim(conf, good)


def _claim(conf: ConfiguredOption, rows: list[tuple[Channel, bs.VoucherClaim]]) -> SettlementTx:
    data = state.calldata("claimWithSignature", *claim_args(conf, [r for _, r in rows]))
    return _send(conf, Kind.CHANNEL_CLAIM, data, [(c, r.total_claimed) for c, r in rows])


def _claimable(
    conf: ConfiguredOption, rows: list[tuple[Channel, bs.VoucherClaim]]
) -> list[tuple[Channel, bs.VoucherClaim]]:
    """The rows the contract accepts alone (each simulated as a claim of its own, one batch)."""
    calls = [
        (
            "eth_call",
            [
                {
                    "to": bs.BATCH_SETTLEMENT_ADDRESS,
                    "data": state.calldata("claimWithSignature", *claim_args(conf, [row])),
                },
                "latest",
            ],
        )
        for _, row in rows
    ]
    answers = rpc_batch(conf.rpc_url, calls, errors_inline=True)
    return [pair for pair, answer in zip(rows, answers, strict=True) if not isinstance(answer, RpcError)]


def settle(conf: ConfiguredOption) -> SettlementTx | None:
    """Send what was claimed for pay-to in ``conf``'s token and not yet settled to pay-to (one
    ``settle``; anyone may call it, our lane does). None: nothing to settle, or a settle is out."""
    network, pay_to, asset = conf.option.network, conf.option.pay_to, conf.option.asset
    if ChannelTx.objects.filter(status=S.SENT, tx__network=network, tx__kind=Kind.CHANNEL_SETTLE).exists():
        return None
    claimed, settled = state.receiver_state(conf.rpc_url, pay_to, asset)
    if claimed <= settled:
        return None
    return _send(conf, Kind.CHANNEL_SETTLE, state.calldata("settle", pay_to, asset), [(None, claimed - settled)])


# ---------------------------------------------------------------------------- cooperative refund


def refund(conf: ConfiguredOption, channel_id: str, requested: int | None = None) -> SettlementTx:
    """Return the channel's unused balance (or ``requested`` of it) to the payer: what we charged
    and did not claim is claimed in the same transaction (``multicall``), since a refund can only
    return what is unclaimed on chain. Our balance drops at once, so no charge is accepted
    against the money on its way back. ChannelRejected ``refund_no_balance`` when nothing is
    left to return."""
    channel = Channel.objects.get(channel_id=channel_id)
    state.refresh_from_chain(conf.rpc_url, [channel])
    with transaction.atomic():
        channel = Channel.objects.select_for_update().get(pk=channel.pk)
        if channel.held_by:  # its charge is not known yet: what is left to return is not either
            raise bs.ChannelRejected(bs.ErrorCode.CHANNEL_BUSY, "a request on this channel is in flight")
        mirror = channel.mirror
        amount = bs.refund_amount(mirror, requested)
        nonce = mirror.refund_nonce
        signature = _sign(bs.refund_digest(channel.id_bytes, nonce, amount, conf.option.chain_id))
        call = state.calldata("refundWithSignature", channel.config.abi(), amount, nonce, signature)
        row = _claim_row(channel)
        if row is not None:
            call = state.calldata(
                "multicall", [state.calldata("claimWithSignature", *claim_args(conf, [row])), call]
            )
        tx = _store(conf, Kind.CHANNEL_REFUND, call, [(channel, amount)])
        Channel.objects.filter(pk=channel.pk).update(balance=F("balance") - amount, version=F("version") + 1)
    relayers.broadcast(conf.rpc_url, tx)
    return tx


def refund_channel(channel_id: str, requested: int | None = None) -> SettlementTx:
    """:func:`refund` on the option of the channel's network (finance's refund from the admin)."""
    channel = Channel.objects.get(channel_id=channel_id)
    return refund(option_on(channel.network), channel_id, requested)


# ---------------------------------------------------------------------------- following


def _refunded(receipt: dict, channel_id: str) -> int:
    """What the receipt's ``Refunded`` events of the channel returned."""
    total = 0
    for entry in receipt.get("logs", []):
        topics = [t.lower() for t in entry.get("topics", [])]
        if (
            entry["address"].lower() == bs.BATCH_SETTLEMENT_ADDRESS.lower()
            and topics[:2] == [state.REFUNDED_TOPIC, channel_id]
        ):
            (amount,) = abi_decode(["uint128"], bytes.fromhex(entry["data"][2:]))
            total += amount
    return total


def _settled(receipt: dict, conf: ConfiguredOption) -> int:
    """What a settle's receipt moved from the contract to pay-to in the option's token."""
    sender, recipient = "0x" + bs.BATCH_SETTLEMENT_ADDRESS[2:].lower().rjust(64, "0"), "0x" + conf.option.pay_to[2:].lower().rjust(64, "0")
    return sum(
        int(entry["data"], 16)
        for entry in receipt.get("logs", [])
        if entry["address"].lower() == conf.option.asset.lower()
        and [t.lower() for t in entry.get("topics", [])] == [TRANSFER_TOPIC, sender, recipient]
    )


def _finish(tx: SettlementTx, status: str, receipt: dict | None) -> list[Channel]:
    """Record the transaction's outcome on its rows (once); the channels it concerned."""
    with transaction.atomic():
        links = list(
            ChannelTx.objects.select_for_update(of=("self",)).filter(tx=tx, status=S.SENT).select_related("channel")
        )
        for link in links:
            link.status, link.finished_at = status, timezone.now()
            link.save(update_fields=["status", "finished_at"])
            if status == S.MINED and tx.kind == Kind.CHANNEL_REFUND and receipt is not None:
                returned = _refunded(receipt, link.channel.channel_id)
                Channel.objects.filter(pk=link.channel_id).update(refunded=F("refunded") + returned)
            if status == S.MINED and tx.kind == Kind.CHANNEL_SETTLE and receipt is not None:
                # What it moved, as the receipt says (someone may have called settle before it).
                link.amount = Decimal(_settled(receipt, option_on(tx.network)))
                link.save(update_fields=["amount"])
    return [link.channel for link in links if link.channel is not None]


def track(tx_id: int) -> str:
    """Follow one channel transaction: its outcome once mined at the network's depth (the
    channels' mirrors then read from the chain, which is the truth of what it did); while not
    mined, dropped once the signer's nonce at depth is past it, re-signed with higher fees once
    stuck, else rebroadcast. Its rows' status after this pass."""
    tx = SettlementTx.objects.get(pk=tx_id)
    if not ChannelTx.objects.filter(tx=tx, status=S.SENT).exists():
        return ChannelTx.objects.filter(tx=tx).values_list("status", flat=True).first() or S.SENT
    conf = option_on(tx.network)
    depth = conf.option.confirmations
    found, latest = read_receipts(conf.rpc_url, tx.hashes)
    raise_refused(found, tx.hashes)
    mined = note_mined(tx, found)
    if mined is None:
        if relayers.nonce_spent_elsewhere(conf.rpc_url, tx, latest, depth) is not None:
            return _close(conf, tx, S.DROPPED, None)
        step = relayers.resend(
            conf.rpc_url,
            tx.tx_hash,
            stuck=relayers.is_stuck(tx),
            send=lambda: relayers.broadcast(conf.rpc_url, tx),
        )
        if step == relayers.Resend.RESIGN:
            _resign(conf, tx.pk)
        return S.SENT
    _, receipt = mined
    if latest - int(receipt["blockNumber"], 16) + 1 < depth:
        return S.SENT
    return _close(conf, tx, S.MINED if int(receipt["status"], 16) == 1 else S.REVERTED, receipt)


def _close(conf: ConfiguredOption, tx: SettlementTx, status: str, receipt: dict | None) -> str:
    channels = _finish(tx, status, receipt)
    if channels:
        state.refresh_from_chain(conf.rpc_url, channels)
    if status != S.MINED:
        log.warning("channel %s transaction %s ended %s", tx.kind, tx.tx_hash, status)
    return status


def _resign(conf: ConfiguredOption, tx_id: int) -> None:
    block = rpc(conf.rpc_url, "eth_getBlockByNumber", ["latest", False])
    with relayers.locked(tx_id) as tx:
        relayers.replace(tx, relayers.account_of(tx.relayer), block)
    relayers.broadcast(conf.rpc_url, SettlementTx.objects.get(pk=tx_id))


def open_transactions(network: str | None = None) -> list[int]:
    """Channel transactions still out (``network``: on it alone)."""
    rows = ChannelTx.objects.filter(status=S.SENT)
    if network is not None:
        rows = rows.filter(tx__network=network)
    return sorted(set(rows.values_list("tx_id", flat=True)))

