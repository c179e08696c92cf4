"""Our signers ("lanes"): nonces, fees, and the outbox of signed transactions.

Every transaction we send (a settlement, a batch, an upto settle, a refund) is signed and
**stored** (a :class:`SettlementTx` row, committed with the payments it carries or the refund it
pays) before it is broadcast; only that stored transaction is ever rebroadcast, or replaced with
the same nonce and higher fees while it is stuck. The refund wallet is a signer like the
relayer lanes (:func:`lock_signer`), with its own nonce sequence. Each lane (one key from
``X402_RELAYER_KEYS``) has its own nonce sequence, allocated under its ``RelayerNonce`` row
lock; a worker takes the least loaded lane it can lock (``SKIP LOCKED``), so workers sign in
parallel and a transaction stuck on one lane does not hold the payments of the others.

Every outgoing transaction not mined yet (a settlement, a batch, an upto settle, a refund)
follows one rule, :func:`resend`: it is re-signed with higher fees only when the node holds it
as pending (its fee is too low) or refused it for another reason than the sender's funds; a
sender that cannot pay has the same bytes rebroadcast, its fees never raised, and its lane is
flagged (``RelayerNonce.unfunded_since``): reported (metric, ``/readyz``, admin) and given no new
transactions until a balance check shows funds (:func:`recheck_unfunded`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count
from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount

from payments.chain.node import ChainUnavailable, RpcError, rpc
from payments.chain.receipts import read_receipts
from payments.metrics import UNFUNDED_BROADCASTS
from payments.models import PaymentStatus, RelayerNonce, SettlementTx
from payments.options import ConfiguredOption
from x402site.conf import x402

log = logging.getLogger("payments.chain.relayer")

#: 0.001 gwei: ample on Base and on anvil.
PRIORITY_FEE = 10**6
#: A replacement (same nonce) must raise both fees by at least 10% (geth's and anvil's price
#: bump); 9/8 of the last fees clears it.
REPLACEMENT_BUMP_EIGHTHS = 9


@lru_cache(maxsize=16)
def relayer_account(key: str) -> LocalAccount:
    return Account.from_key(key)


def relayer_keys() -> list[str]:
    """The lanes' keys: ``X402_RELAYER_KEYS``; a ``X402_RELAYER_KEY`` set alone (an override
    naming one relayer) is the only lane."""
    keys = [k for k in x402.relayer.keys if k]
    primary = x402.relayer.key
    if primary and primary not in keys:
        return [primary]
    return keys


def lanes() -> list[LocalAccount]:
    keys = relayer_keys()
    if not keys:
        raise RuntimeError("no relayer key (X402_RELAYER_KEYS / X402_RELAYER_KEY): cannot settle locally")
    return [relayer_account(k) for k in keys]


def account_of(address: str) -> LocalAccount:
    """The lane that signs as ``address`` (to re-sign its transactions)."""
    for account in lanes():
        if account.address.lower() == address.lower():
            return account
    raise LookupError(f"relayer {address} is no longer configured: its transactions cannot be re-signed")


@dataclass(frozen=True, slots=True)
class Lane:
    account: LocalAccount
    row: RelayerNonce


class NoLaneCanPay(RuntimeError):
    """Every lane that could send the transaction is flagged as unable to pay for gas: nothing
    is signed (the payment waits, VERIFIED, until a balance check shows funds)."""


def funded_lanes(network: str) -> list[LocalAccount]:
    """The configured lanes not flagged as unable to pay."""
    accounts = lanes()
    flagged = RelayerNonce.objects.filter(network=network, unfunded_since__isnull=False)
    addresses = set(flagged.values_list("address", flat=True))
    return [a for a in accounts if a.address not in addresses]


def _ensure_rows(network: str, accounts: list[LocalAccount]) -> None:
    known = set(
        RelayerNonce.objects.filter(network=network, address__in=[a.address for a in accounts]).values_list(
            "address", flat=True
        )
    )
    for account in accounts:
        if account.address not in known:
            try:
                with transaction.atomic():
                    RelayerNonce.objects.create(network=network, address=account.address, next_nonce=0)
            except IntegrityError:
                pass  # another worker created it


def loads(network: str) -> dict[str, int]:
    """Transactions each lane has signed that are not mined yet and still waited for."""
    rows = (
        SettlementTx.objects.filter(network=network, block_number=None, payments__status=PaymentStatus.SETTLING)
        .values_list("relayer")
        .annotate(n=Count("id", distinct=True))
    )
    return dict(rows)


def lock_signer(network: str, account: LocalAccount) -> Lane:
    """Lock ``account``'s row on ``network`` (created on first use), waiting for another worker
    that holds it (call inside a transaction): its nonces are then allocated serially."""
    _ensure_rows(network, [account])
    return Lane(account, RelayerNonce.objects.select_for_update().get(network=network, address=account.address))


def take_lane(network: str, address: str | None = None) -> Lane:
    """Lock the least loaded lane this worker can have at once (call inside a transaction).

    Lanes locked by other workers are skipped; when all are, wait for the least loaded one.
    ``address``: that lane and no other (an upto permit names the one address that may settle
    it), waited for if another worker holds it.
    """
    if address is not None:
        lane = lock_signer(network, account_of(address))
        if lane.row.unfunded_since is not None:
            raise NoLaneCanPay(
                f"lane {lane.account.address} on {network} cannot pay for gas: {lane.row.unfunded_reason}"
            )
        return lane
    _ensure_rows(network, lanes())
    accounts = funded_lanes(network)
    if not accounts:
        raise NoLaneCanPay(f"no relayer lane on {network} can pay for gas")
    load = loads(network)
    order = sorted(accounts, key=lambda a: (load.get(a.address, 0), random.random()))
    for account in order:
        row = (
            RelayerNonce.objects.select_for_update(skip_locked=True)
            .filter(network=network, address=account.address, unfunded_since=None)
            .first()
        )
        if row is not None:
            return Lane(account, row)
    account = order[0]
    row = RelayerNonce.objects.select_for_update().get(network=network, address=account.address)
    if row.unfunded_since is not None:  # flagged while we waited for its lock
        raise NoLaneCanPay(f"relayer lane {account.address} on {network} cannot pay for gas")
    return Lane(account, row)


def allocate_nonce(conf: ConfiguredOption, network: str, relayer: str) -> int:
    """The lowest nonce the chain has not seen that no stored, unmined transaction holds.

    Called with the signer's RelayerNonce row locked, so allocations are serial per signer.
    Signed transactions still waited for keep their nonces (the reconciler rebroadcasts them);
    a nonce whose transaction was given up (its payments lapsed unmined, its refund failed) is
    reused, so no gap is left that would block every later transaction of the signer.
    """
    pending = int(rpc(conf.rpc_url, "eth_getTransactionCount", [relayer, "pending"]), 16)
    held = set(
        SettlementTx.objects.holding_nonce()
        .filter(network=network, relayer=relayer, nonce__gte=pending)
        .values_list("nonce", flat=True)
    )
    nonce = pending
    while nonce in held:
        nonce += 1
    return nonce


def fees(block: dict[str, Any]) -> tuple[int, int]:
    """(maxFeePerGas, maxPriorityFeePerGas) for the next blocks after ``block``."""
    base_fee = int(block.get("baseFeePerGas") or "0x0", 16)
    return 2 * base_fee + PRIORITY_FEE, PRIORITY_FEE


def _hex(data: bytes | str) -> str:
    text = data.hex() if isinstance(data, bytes | bytearray) else str(data)
    return "0x" + text.removeprefix("0x")


def sign_and_store(
    conf: ConfiguredOption,
    lane: Lane,
    *,
    kind: str,
    to: str,
    data: str,
    gas_limit: int,
    items: int,
    block: dict[str, Any],
) -> SettlementTx:
    """Allocate the signer's next nonce, sign, and store the transaction (inside the transaction
    that holds the signer's row and moves its payments to SETTLING, or its refund to SENT)."""
    network = conf.option.network
    nonce = allocate_nonce(conf, network, lane.account.address)
    max_fee, priority = fees(block)
    signed = lane.account.sign_transaction(
        {
            "chainId": conf.option.chain_id,
            "nonce": nonce,
            "to": to,
            "data": data,
            "gas": gas_limit,
            "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": priority,
            "value": 0,
            "type": 2,
        }
    )
    tx = SettlementTx.objects.create(
        network=network,
        relayer=lane.account.address,
        nonce=nonce,
        kind=kind,
        to=to,
        items=items,
        tx_hash=_hex(signed.hash),
        raw_tx=_hex(signed.raw_transaction),
        gas_limit=gas_limit,
        max_fee_per_gas=max_fee,
        max_priority_fee_per_gas=priority,
    )
    lane.row.next_nonce = nonce + 1
    lane.row.save(update_fields=["next_nonce"])
    return tx


#: Node answers to a (re)broadcast that mean it has the transaction (or mined it): not errors.
ACCEPTED_ANSWERS = ("already known", "already imported", "nonce too low", "transaction already exists")
#: A node's refusal because the sender cannot pay for gas: higher fees would not help.
NO_FUNDS = "insufficient funds"


def send_raw(url: str, raw: str) -> str | None:
    """Send signed bytes (again; safe to repeat): the node's refusal, or None when it took them
    or already has them (the receipt decides the rest)."""
    try:
        rpc(url, "eth_sendRawTransaction", [raw])
    except RpcError as exc:
        error = str(exc)
        if not any(answer in error.lower() for answer in ACCEPTED_ANSWERS):
            return error
    return None


def cannot_pay(error: str | None) -> bool:
    """The node refused because the sender has not the gas money."""
    return error is not None and NO_FUNDS in error.lower()


def flag_unfunded(network: str, address: str, error: str) -> None:
    """The node refused a transaction of this lane for lack of gas money: flag it (once; the
    first refusal's time is kept) and count it."""
    UNFUNDED_BROADCASTS.labels(network=network).inc()
    flagged = RelayerNonce.objects.filter(network=network, address=address, unfunded_since=None).update(
        unfunded_since=timezone.now(), unfunded_reason=error[:2000]
    )
    if flagged:
        log.error("lane %s on %s cannot pay for gas; it takes no new transactions: %s", address, network, error)


def recheck_unfunded(rpc_urls: dict[str, str]) -> set[str]:
    """The balance check of every flagged lane (``rpc_urls``: network -> RPC URL): a lane
    holding at least ``X402_RELAYER_MIN_BALANCE_WEI`` and what its signed, unmined transactions
    may cost (gas limit x max fee) can pay again; its flag is cleared. The networks where a lane
    was cleared."""
    cleared = set()
    for row in RelayerNonce.objects.filter(unfunded_since__isnull=False, network__in=list(rpc_urls)):
        wei = int(rpc(rpc_urls[row.network], "eth_getBalance", [row.address, "latest"]), 16)
        waiting = SettlementTx.objects.holding_nonce().filter(network=row.network, relayer=row.address)
        need = x402.relayer.min_balance_wei + sum(t.gas_limit * t.max_fee_per_gas for t in waiting)
        if wei >= need:
            RelayerNonce.objects.filter(pk=row.pk).update(unfunded_since=None, unfunded_reason="")
            log.warning("lane %s on %s can pay again (%s wei)", row.address, row.network, wei)
            cleared.add(row.network)
    return cleared


def broadcast(url: str, tx: SettlementTx) -> str | None:
    """Send the stored transaction (again). Safe to repeat: it is the same signed bytes. The
    node's refusal (None: it took it or has it); a refusal for lack of gas money flags the lane."""
    error = send_raw(url, tx.raw_tx)
    if error is not None:
        log.info("broadcast of %s %s (%s items): %s", tx.kind, tx.tx_hash, tx.items, error)
        if cannot_pay(error):
            flag_unfunded(tx.network, tx.relayer, error)
    SettlementTx.objects.filter(pk=tx.pk).update(broadcast_at=timezone.now())
    return error


class Resend(StrEnum):
    """What a pass did with an outgoing transaction not mined yet (:func:`resend`)."""

    #: The same bytes were sent again (the node took them, has them, or refused them for a
    #: reason that higher fees would not cure yet: not stuck).
    SENT = "sent"
    #: The sender cannot pay for gas: the same bytes stay, fees are never raised.
    NO_FUNDS = "no_funds"
    #: Stuck, and the node holds it as pending (its fee is too low) or refused it for another
    #: reason than funds (a fee below the base fee): sign it again with higher fees.
    RESIGN = "resign"


def resend(url: str, tx_hash: str, *, stuck: bool, send: Callable[[], str | None]) -> Resend:
    """The one rule for every outgoing transaction not mined yet (settlements, batches, upto
    settles, refunds). ``send`` rebroadcasts the stored bytes and returns the node's refusal.

    Re-signing raises the fees 12.5% a time; done on every pass while the sender cannot pay,
    the fees would compound for hours and a refilled relayer would pay tips thousands of times
    normal. So: re-sign only when stuck and the node holds the transaction as pending, or
    refused it for a reason other than the sender's funds."""
    if stuck and rpc(url, "eth_getTransactionByHash", [tx_hash]) is not None:
        return Resend.RESIGN
    error = send()
    if cannot_pay(error):
        return Resend.NO_FUNDS
    return Resend.RESIGN if stuck and error is not None else Resend.SENT


def is_stuck(tx: SettlementTx) -> bool:
    return (timezone.now() - tx.signed_at).total_seconds() > x402.chain.stuck_after_seconds


def nonces_used(url: str, tx: SettlementTx, latest: int, depth: int) -> int:
    """How many nonces the transaction's signer had used at confirmation ``depth`` below block
    ``latest``: past ``tx.nonce``, none of its unmined hashes can ever be mined (a sibling
    signature of the same nonce, or another transaction of the signer, took it).
    ChainUnavailable when the node cannot say."""
    at = max(0, latest - max(depth, 1) + 1)
    try:
        return int(rpc(url, "eth_getTransactionCount", [tx.relayer, hex(at)]), 16)
    except (RpcError, TypeError, ValueError) as exc:
        raise ChainUnavailable(f"nonce of {tx.relayer} unreadable: {exc}") from exc


def nonce_spent_elsewhere(url: str, tx: SettlementTx, latest: int, depth: int) -> int | None:
    """For a transaction none of whose hashes had a receipt: the nonces its signer had used at
    ``depth`` below ``latest`` when they are past ``tx.nonce`` and, read again after that, still
    none of its hashes has a receipt: it was dropped. None otherwise. (A node may count a new
    block's nonces before it serves the block's receipts, anvil does: the receipts read before
    the count are not enough.)"""
    used = nonces_used(url, tx, latest, depth)
    if used <= tx.nonce:
        return None
    found, _ = read_receipts(url, tx.hashes)
    if any(found.get(h) and not isinstance(found[h], RpcError) for h in tx.hashes):
        return None
    return used


def decode(raw: str) -> dict[str, Any]:
    """The fields of a signed EIP-1559 transaction (to re-sign it)."""
    import rlp

    fields = rlp.decode(bytes.fromhex(raw[4:]))  # skip "0x" and the type byte 0x02

    def number(b: bytes) -> int:
        return int.from_bytes(b, "big")

    return {
        "chainId": number(fields[0]),
        "nonce": number(fields[1]),
        "maxPriorityFeePerGas": number(fields[2]),
        "maxFeePerGas": number(fields[3]),
        "gas": number(fields[4]),
        "to": "0x" + fields[5].hex(),
        "value": number(fields[6]),
        "data": "0x" + fields[7].hex(),
        "type": 2,
    }


@contextmanager
def locked(tx_id: int) -> Iterator[SettlementTx]:
    with transaction.atomic():
        yield SettlementTx.objects.select_for_update().get(pk=tx_id)


def replace(tx: SettlementTx, account: LocalAccount, block: dict[str, Any]) -> tuple[str, int] | None:
    """Re-sign the stored transaction (locked by the caller, see :func:`locked`) as ``account``
    with the same nonce and higher fees, and store it (every earlier hash stays watched):
    (the hash it replaced, its new max fee); None at the fee cap (the last one is rebroadcast)."""
    resigned = resign_raw(tx.raw_tx, account, block)
    if resigned is None:
        return None
    old = tx.tx_hash
    tx.replaced_hashes = tx.hashes
    tx.tx_hash, tx.raw_tx, tx.max_fee_per_gas = resigned
    tx.signed_at = timezone.now()
    tx.save(update_fields=["replaced_hashes", "tx_hash", "raw_tx", "signed_at", "max_fee_per_gas"])
    return old, int(tx.max_fee_per_gas)


def _bumped(fee: int) -> int:
    """``fee`` raised by the smallest replacement bump nodes accept, rounded up."""
    return -(-fee * REPLACEMENT_BUMP_EIGHTHS // 8)


def resign_raw(raw: str, account: LocalAccount, block: dict[str, Any]) -> tuple[str, str, int] | None:
    """``raw`` (signed by ``account``) again with the same nonce and calldata and fees raised
    past the node's replacement rule: (hash, raw, max fee). Same nonce: at most one of them is
    ever mined.

    Each fee is the higher of the last one raised by 12.5% (the least a node accepts for a
    replacement) and what the latest block asks, never above ``X402_MAX_FEE_PER_GAS``: fees do
    not compound while the sender cannot pay (every broadcast refused) or the chain is
    congested. None when the cap leaves no room for a valid replacement (the caller keeps
    rebroadcasting the last one)."""
    from eth_utils import to_checksum_address

    fields = decode(raw)
    cap = x402.chain.max_fee_per_gas
    floor_max, floor_priority = fees(block)
    least_max, least_priority = _bumped(fields["maxFeePerGas"]), _bumped(fields["maxPriorityFeePerGas"])
    max_fee = min(cap, max(least_max, floor_max))
    priority = min(max_fee, max(least_priority, floor_priority))
    if max_fee < least_max or priority < least_priority:
        log.warning(
            "nonce %s of %s not re-signed: its fees (%s wei/gas) are at X402_MAX_FEE_PER_GAS (%s)",
            fields["nonce"], account.address, fields["maxFeePerGas"], cap,
        )
        return None
    fields.update(maxFeePerGas=max_fee, maxPriorityFeePerGas=priority, to=to_checksum_address(fields["to"]))
    signed = account.sign_transaction(fields)
    return _hex(signed.hash), _hex(signed.raw_transaction), max_fee
