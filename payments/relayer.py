"""Our relayer accounts ("lanes"): nonces, fees, and signed settlement transactions.

Every transaction is signed and **stored** (a :class:`SettlementTx` row, committed with the
payments it carries) before it is broadcast; only that stored transaction is ever rebroadcast,
or replaced with the same nonce and higher fees while it is stuck. Each lane (one key from
``X402_RELAYER_KEYS``) has its own nonce sequence, allocated under its ``RelayerNonce`` row
lock; a worker takes the least loaded lane it can lock (``SKIP LOCKED``), so workers sign in
parallel and a transaction stuck on one lane does not hold the payments of the others.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count
from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount

from .chain import RpcError, rpc
from .models import PaymentStatus, RelayerNonce, SettlementTx
from .options import ConfiguredOption

log = logging.getLogger("payments.relayer")

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
    keys = [k for k in settings.X402_RELAYER_KEYS if k]
    primary = settings.X402_RELAYER_KEY
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


def take_lane(network: str, address: str | None = None) -> Lane:
    """Lock the least loaded lane this worker can have at once (call inside a transaction).

    Lanes locked by other workers are skipped; when all are, wait for the least loaded one.
    ``address``: that lane and no other (an upto permit names the one address that may settle
    it), waited for if another worker holds it.
    """
    if address is not None:
        account = account_of(address)
        _ensure_rows(network, [account])
        return Lane(account, RelayerNonce.objects.select_for_update().get(network=network, address=account.address))
    accounts = lanes()
    _ensure_rows(network, accounts)
    load = loads(network)
    order = sorted(accounts, key=lambda a: (load.get(a.address, 0), random.random()))
    for account in order:
        row = (
            RelayerNonce.objects.select_for_update(skip_locked=True)
            .filter(network=network, address=account.address)
            .first()
        )
        if row is not None:
            return Lane(account, row)
    account = order[0]
    return Lane(account, RelayerNonce.objects.select_for_update().get(network=network, address=account.address))


def allocate_nonce(conf: ConfiguredOption, network: str, relayer: str) -> int:
    """The lowest nonce the chain has not seen that no stored, unmined settlement holds.

    Called with the lane's RelayerNonce row locked, so allocations are serial per lane.
    Signed transactions still waited for keep their nonces (the reconciler rebroadcasts them);
    a nonce whose transaction was given up (its payments lapsed unmined) is reused, so no gap
    is left that would block every later settlement of the lane.
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
    """Allocate the lane's next nonce, sign, and store the transaction (inside the transaction
    that holds the lane's row and moves its payments to SETTLING)."""
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


def broadcast(url: str, tx: SettlementTx) -> None:
    """Send the stored transaction (again). Safe to repeat: it is the same signed bytes."""
    try:
        rpc(url, "eth_sendRawTransaction", [tx.raw_tx])
    except RpcError as exc:
        # "already known", "nonce too low" (mined already) and the like: the receipt decides.
        log.info("broadcast of %s (%s payments): %s", tx.tx_hash, tx.items, exc)
    SettlementTx.objects.filter(pk=tx.pk).update(broadcast_at=timezone.now())


def is_stuck(tx: SettlementTx) -> bool:
    return (timezone.now() - tx.signed_at).total_seconds() > settings.X402_STUCK_AFTER_SECONDS


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


def resign(tx: SettlementTx, block: dict[str, Any]) -> tuple[str, str, int] | None:
    """The same transaction (nonce, calldata) with fees raised past the node's replacement rule:
    (hash, raw, max fee); None at the fee cap (see :func:`resign_raw`)."""
    return resign_raw(tx.raw_tx, account_of(tx.relayer), block)


def _bumped(fee: int) -> int:
    """``fee`` raised by the smallest replacement bump nodes accept, rounded up."""
    return -(-fee * REPLACEMENT_BUMP_EIGHTHS // 8)


def resign_raw(raw: str, account: LocalAccount, block: dict[str, Any]) -> tuple[str, str, int] | None:
    """``raw`` (signed by ``account``) again with the same nonce and calldata and fees raised
    past the node's replacement rule: (hash, raw, max fee). Same nonce: at most one of them is
    ever mined (refunds use it too).

    Each fee is the higher of the last one raised by 12.5% (the least a node accepts for a
    replacement) and what the latest block asks, never above ``X402_MAX_FEE_PER_GAS``: fees do
    not compound while the sender cannot pay (every broadcast refused) or the chain is
    congested. None when the cap leaves no room for a valid replacement (the caller keeps
    rebroadcasting the last one)."""
    from eth_utils import to_checksum_address

    fields = decode(raw)
    cap = settings.X402_MAX_FEE_PER_GAS
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
