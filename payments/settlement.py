"""Settlement through our relayer: sign, store, broadcast, then track the receipt.

Each step is idempotent and driven by the ledger state, so a task delivered twice, a worker
killed between steps or an RPC outage never sends a second transaction for one payment:
the signed transaction is stored before it is broadcast, and only that stored transaction is
ever rebroadcast.

Paid means: a receipt with status 1 that carries the token's ``Transfer(from, payTo, value)``.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from .abi import AUTHORIZATION_USED_TOPIC, TOKEN_ABI, TRANSFER_TOPIC
from .chain import ChainUnavailable, RpcError, rpc, rpc_batch
from .facilitator import FacilitatorClient, FacilitatorUnavailable
from .models import Payment, PaymentStatus, RelayerNonce
from .options import ConfiguredOption, for_payment

log = logging.getLogger("payments.settlement")
S = PaymentStatus

#: Gas limit for one transferWithAuthorization (82,900 measured on anvil; USDC needs a little more).
GAS_LIMIT = 150_000
#: How far back to look for a third party's use of an authorization.
PREEMPTION_LOOKBACK_BLOCKS = 5_000


@lru_cache(maxsize=4)
def relayer_account(key: str) -> LocalAccount:
    return Account.from_key(key)


def _relayer() -> LocalAccount:
    if not settings.X402_RELAYER_KEY:
        raise RuntimeError("X402_RELAYER_KEY is not set: cannot settle locally")
    return relayer_account(settings.X402_RELAYER_KEY)


@lru_cache(maxsize=1)
def _token_contract() -> Any:
    from web3 import Web3  # imported lazily: web3 costs ~0.6 s and only workers need it

    return Web3().eth.contract(abi=TOKEN_ABI)


def _calldata(p: Payment) -> str:
    """transferWithAuthorization with (v, r, s) for a 65-byte signature, else the ``bytes``
    overload (contract wallets: EIP-1271)."""
    sig = bytes.fromhex(p.signature[2:])
    head = [
        to_checksum_address(p.payer),
        to_checksum_address(p.pay_to),
        int(p.amount),
        p.valid_after,
        p.valid_before,
        bytes.fromhex(p.nonce[2:]),
    ]
    contract = _token_contract()
    if len(sig) != 65:
        signature = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
        return contract.encode_abi(signature, [*head, sig])
    signature = (
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
    )
    return contract.encode_abi(
        signature, [*head, sig[64] if sig[64] >= 27 else sig[64] + 27, sig[:32], sig[32:64]]
    )


def _tx_fields(conf: ConfiguredOption, p: Payment, nonce: int, max_fee: int, priority: int) -> dict[str, Any]:
    return {
        "chainId": conf.option.chain_id,
        "nonce": nonce,
        "to": p.asset,
        "data": _calldata(p),
        "gas": GAS_LIMIT,
        "maxFeePerGas": max_fee,
        "maxPriorityFeePerGas": priority,
        "value": 0,
        "type": 2,
    }


def _lock(payment_id: Any) -> Payment:
    return Payment.objects.select_for_update().get(pk=payment_id)


def _word(address: str) -> str:
    return "0x" + address[2:].lower().rjust(64, "0")


def transfer_matches(receipt: dict[str, Any], p: Payment) -> bool:
    """True when the receipt succeeded and moved exactly ``amount`` from payer to pay-to."""
    if int(receipt.get("status", "0x0"), 16) != 1:
        return False
    for entry in receipt.get("logs", []):
        topics = [t.lower() for t in entry.get("topics", [])]
        if (
            entry.get("address", "").lower() == p.asset.lower()
            and len(topics) == 3
            and topics[0] == TRANSFER_TOPIC
            and topics[1] == _word(p.payer)
            and topics[2] == _word(p.pay_to)
            and int(entry.get("data", "0x0"), 16) == int(p.amount)
        ):
            return True
    return False


def _revert_message(exc: RpcError) -> str:
    return str(exc)[:500]


def _find_preemption(conf: ConfiguredOption, p: Payment) -> str | None:
    """Hash of a transaction by someone else that used this authorization, if any."""
    latest = int(rpc(conf.rpc_url, "eth_blockNumber", []), 16)
    logs = rpc(
        conf.rpc_url,
        "eth_getLogs",
        [
            {
                "address": p.asset,
                "fromBlock": hex(max(0, latest - PREEMPTION_LOOKBACK_BLOCKS)),
                "toBlock": "latest",
                "topics": [AUTHORIZATION_USED_TOPIC, _word(p.payer), p.nonce.lower()],
            }
        ],
    )
    return logs[0]["transactionHash"] if logs else None


def _allocate_nonce(conf: ConfiguredOption, network: str, relayer: str) -> int:
    """The lowest nonce the chain has not seen that no stored, unmined settlement holds.

    Called with the relayer's RelayerNonce row locked, so allocations are serial across
    workers. Signed transactions still SETTLING keep their nonces (the reconciler rebroadcasts
    them); a nonce whose transaction was given up (expired, never mined) is reused, so no gap
    is left that would block every later settlement.
    """
    pending = int(rpc(conf.rpc_url, "eth_getTransactionCount", [relayer, "pending"]), 16)
    held = set(
        Payment.objects.filter(
            network=network, relayer=relayer, status=S.SETTLING, relayer_nonce__gte=pending
        ).values_list("relayer_nonce", flat=True)
    )
    nonce = pending
    while nonce in held:
        nonce += 1
    return nonce


def prepare(payment_id: Any) -> Payment:
    """VERIFIED -> SETTLING: simulate, then sign and store the transaction with a relayer nonce."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED:
        return p
    lapsed = expire_if_lapsed(payment_id)
    if lapsed is not None:
        return lapsed
    conf = for_payment(p.network, p.asset)
    relayer = _relayer()
    call = {"from": relayer.address, "to": p.asset, "data": _calldata(p)}
    try:
        block, _ = rpc_batch(
            conf.rpc_url,
            [("eth_getBlockByNumber", ["latest", False]), ("eth_estimateGas", [call, "latest"])],
        )
    except RpcError as exc:
        # The transfer would revert: maybe someone already settled it for us (front-running).
        preempted = _find_preemption(conf, p)
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status != S.VERIFIED:
                return p
            if preempted:
                p.advance(S.SETTLING, settle_tx_hash=preempted, detail={"preempted_by": preempted})
            else:
                p.advance(S.FAILED, failure_reason=f"simulation reverted: {_revert_message(exc)}")
        return p
    base_fee = int(block.get("baseFeePerGas") or "0x0", 16)
    priority = 10**6  # 0.001 gwei: ample on Base and on anvil
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status != S.VERIFIED:
            return p
        row, _ = RelayerNonce.objects.select_for_update().get_or_create(
            network=p.network, address=relayer.address, defaults={"next_nonce": 0}
        )
        nonce = _allocate_nonce(conf, p.network, relayer.address)
        signed = relayer.sign_transaction(_tx_fields(conf, p, nonce, 2 * base_fee + priority, priority))
        p.advance(
            S.SETTLING,
            settle_tx_hash="0x" + signed.hash.hex().removeprefix("0x"),
            settle_raw_tx="0x" + signed.raw_transaction.hex().removeprefix("0x"),
            relayer=relayer.address,
            relayer_nonce=nonce,
        )
        row.next_nonce = nonce + 1
        row.save(update_fields=["next_nonce"])
    if settings.X402_FAULT_PAUSE_AFTER_SIGN:
        # Fault injection for the crash tests only: a window between store and broadcast.
        time.sleep(settings.X402_FAULT_PAUSE_AFTER_SIGN)
    return p


def broadcast(p: Payment) -> None:
    """Send the stored transaction (again). Safe to repeat: it is the same signed bytes."""
    if p.status != S.SETTLING or not p.settle_raw_tx:
        return
    conf = for_payment(p.network, p.asset)
    try:
        rpc(conf.rpc_url, "eth_sendRawTransaction", [p.settle_raw_tx])
    except RpcError as exc:
        # "already known", "nonce too low" (mined already) and the like: the receipt decides.
        log.info("broadcast of %s for payment %s: %s", p.settle_tx_hash, p.pk, exc)


def _hashes(p: Payment) -> list[str]:
    """Every transaction that may settle this payment: the current one and those it replaced."""
    return [h for h in [p.settle_tx_hash, *p.replaced_tx_hashes] if h]


def _apply_receipts(p: Payment, receipts: dict[str, Any], latest: int, conf: ConfiguredOption) -> None:
    """Move a locked SETTLING/SETTLED payment by what the chain says (no RPC here)."""
    mined = next(((h, receipts[h]) for h in _hashes(p) if receipts.get(h)), None)
    if mined is None:
        if p.status == S.SETTLED:
            # Reorg: the block holding our settlement is gone. The stored transaction is
            # rebroadcast while the authorization is still valid.
            p.advance(
                S.SETTLING,
                block_number=None,
                block_hash="",
                confirmations=0,
                detail={"reorg": f"receipt of {p.settle_tx_hash} disappeared"},
            )
        elif p.valid_before < time.time() - 60:
            # Never mined and no longer minable: the authorization lapsed unpaid.
            p.advance(S.EXPIRED, failure_reason="settlement not mined before validBefore")
        return
    tx_hash, receipt = mined
    block_number = int(receipt["blockNumber"], 16)
    fields: dict[str, Any] = {
        "block_number": block_number,
        "block_hash": receipt["blockHash"],
        "confirmations": max(0, latest - block_number + 1),
    }
    if tx_hash != p.settle_tx_hash:  # an older, replaced transaction was the one mined
        fields["settle_tx_hash"] = tx_hash
        fields["replaced_tx_hashes"] = [h for h in _hashes(p) if h != tx_hash]
    if p.relayer and receipt.get("from", "").lower() == p.relayer.lower():
        fields["gas_used"] = int(receipt["gasUsed"], 16)
        fields["gas_cost_wei"] = fields["gas_used"] * int(receipt.get("effectiveGasPrice", "0x0"), 16)
    if not transfer_matches(receipt, p):
        reverted = int(receipt.get("status", "0x0"), 16) != 1
        p.advance(
            S.FAILED,
            failure_reason="settlement transaction reverted"
            if reverted
            else "settlement moved no matching Transfer",
            detail={"tx": tx_hash, "status": receipt.get("status")},
            **fields,
        )
    elif fields["confirmations"] >= conf.option.confirmations:
        p.advance(S.CONFIRMED, **fields)
    elif p.status == S.SETTLING:
        p.advance(S.SETTLED, **fields)
    elif (p.block_hash, p.confirmations) != (fields["block_hash"], fields["confirmations"]):
        for name, value in fields.items():
            setattr(p, name, value)
        p.save(update_fields=list(fields))


def _read_receipts(url: str, hashes: list[str]) -> tuple[dict[str, Any], int]:
    """Receipts of ``hashes`` and the latest block number, in one JSON-RPC batch."""
    answers = rpc_batch(url, [("eth_blockNumber", [])] + [("eth_getTransactionReceipt", [h]) for h in hashes])
    return dict(zip(hashes, answers[1:], strict=True)), int(answers[0], 16)


def track(payment_id: Any) -> Payment:
    """Read the receipt and move SETTLING/SETTLED forward (or back, after a reorg)."""
    p = Payment.objects.get(pk=payment_id)
    if p.status not in (S.SETTLING, S.SETTLED) or not p.settle_tx_hash:
        return p
    conf = for_payment(p.network, p.asset)
    receipts, latest = _read_receipts(conf.rpc_url, _hashes(p))
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status in (S.SETTLING, S.SETTLED):
            _apply_receipts(p, receipts, latest, conf)
    return p


#: Receipts read per JSON-RPC batch by the reconciler.
RECONCILE_BATCH = 200


def reconcile_batch(payment_ids: list[Any]) -> dict[str, int]:
    """Track many SETTLING/SETTLED payments with one RPC batch per chunk; rebroadcast the unmined.

    A transaction not mined ``X402_STUCK_AFTER_SECONDS`` after it was signed is replaced (same
    nonce, higher fees); every replaced hash is still watched, since any of them may be mined.
    """
    stats = {"payments": 0, "rpc_batches": 0, "rebroadcast": 0, "replaced": 0}
    payments = list(
        Payment.objects.filter(pk__in=payment_ids, status__in=[S.SETTLING, S.SETTLED]).exclude(
            settle_tx_hash=None
        )
    )
    by_option: dict[tuple[str, str], list[Payment]] = {}
    for p in payments:
        by_option.setdefault((p.network, p.asset), []).append(p)
    for (network, asset), group in by_option.items():
        conf = for_payment(network, asset)
        for i in range(0, len(group), RECONCILE_BATCH):
            chunk = group[i : i + RECONCILE_BATCH]
            receipts, latest = _read_receipts(conf.rpc_url, [h for p in chunk for h in _hashes(p)])
            stats["rpc_batches"] += 1
            for p in chunk:
                with transaction.atomic():
                    p = _lock(p.pk)
                    if p.status in (S.SETTLING, S.SETTLED):
                        _apply_receipts(p, receipts, latest, conf)
                stats["payments"] += 1
                if p.status == S.SETTLING and p.settle_raw_tx:
                    if _is_stuck(p):
                        p = replace_stuck(p.pk)
                        stats["replaced"] += 1
                    broadcast(p)
                    stats["rebroadcast"] += 1
    return stats


def _is_stuck(p: Payment) -> bool:
    return (
        bool(p.relayer and p.settling_at)
        and (timezone.now() - p.settling_at).total_seconds() > settings.X402_STUCK_AFTER_SECONDS
    )


def replace_stuck(payment_id: Any) -> Payment:
    """Re-sign a stuck settlement with the same nonce and fees raised past the node's bump rule."""
    p = Payment.objects.get(pk=payment_id)
    conf = for_payment(p.network, p.asset)
    block = rpc(conf.rpc_url, "eth_getBlockByNumber", ["latest", False])
    base_fee = int(block.get("baseFeePerGas") or "0x0", 16)
    old = _decode_fees(p.settle_raw_tx)
    priority = max(old[1] * 2, 10**6)
    max_fee = max(2 * base_fee + priority, old[0] * 2)
    relayer = _relayer()
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status != S.SETTLING or p.relayer != relayer.address:
            return p
        signed = relayer.sign_transaction(_tx_fields(conf, p, p.relayer_nonce, max_fee, priority))
        new_hash = "0x" + signed.hash.hex().removeprefix("0x")
        p.advance(
            S.SETTLING,
            replaced_tx_hashes=_hashes(p),
            settle_tx_hash=new_hash,
            settle_raw_tx="0x" + signed.raw_transaction.hex().removeprefix("0x"),
            settling_at=timezone.now(),
            detail={"replaced": p.settle_tx_hash, "by": new_hash, "max_fee": max_fee},
        )
    return p


def _decode_fees(raw: str) -> tuple[int, int]:
    """(maxFeePerGas, maxPriorityFeePerGas) of a signed EIP-1559 transaction."""
    import rlp

    fields = rlp.decode(bytes.fromhex(raw[4:]))  # skip "0x" and the type byte 0x02
    return int.from_bytes(fields[3], "big"), int.from_bytes(fields[2], "big")


def expire_if_lapsed(payment_id: Any) -> Payment | None:
    """Mark a VERIFIED payment EXPIRED when its authorization can no longer be settled."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED or p.valid_before > time.time() + 2:
        return None
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status == S.VERIFIED:
            p.advance(S.EXPIRED, failure_reason="authorization expired before settlement")
    return p


def settle_via_facilitator(payment_id: Any) -> Payment:
    """Ask the option's facilitator to settle; an unknown outcome stays SETTLING for the reconciler.

    The payment is claimed (VERIFIED -> SETTLING) before the call, so only one worker ever asks.
    """
    lapsed = expire_if_lapsed(payment_id)
    if lapsed is not None:
        return lapsed
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status != S.VERIFIED:
            return p
        conf = for_payment(p.network, p.asset)
        p.advance(S.SETTLING, detail={"facilitator": conf.facilitator_url})
    return _ask_facilitator(p, conf)


def _ask_facilitator(p: Payment, conf: ConfiguredOption) -> Payment:
    client = FacilitatorClient(conf.facilitator_url, conf.facilitator_auth)
    try:
        answer = client.settle(p.x402_version, p.payload, p.requirement)
    except FacilitatorUnavailable as exc:
        log.warning("facilitator settle for payment %s: unknown outcome (%s)", p.pk, exc)
        return p
    tx = answer.get("transaction") or ""
    with transaction.atomic():
        p = _lock(p.pk)
        if p.status != S.SETTLING or p.settle_tx_hash:
            return p
        if tx:
            # Success or "settlement_pending" with a hash: the receipt decides either way.
            p.advance(S.SETTLING, settle_tx_hash=tx, detail={"facilitator_answer": answer})
        elif answer.get("success") is False and answer.get("errorReason") != "settlement_pending":
            p.advance(
                S.FAILED, failure_reason=str(answer.get("errorReason")), detail={"facilitator_answer": answer}
            )
    return p


def resolve_unknown(payment_id: Any) -> Payment:
    """A SETTLING payment with no transaction hash: find its settlement on chain, or ask again.

    Sending the identical payload again is safe: one authorization moves money at most once.
    """
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.SETTLING or p.settle_tx_hash:
        return p
    conf = for_payment(p.network, p.asset)
    used_by = _find_preemption(conf, p)
    if used_by:
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status == S.SETTLING and not p.settle_tx_hash:
                p.advance(S.SETTLING, settle_tx_hash=used_by, detail={"found_on_chain": used_by})
        return p
    if p.valid_before < time.time() - 60:
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status == S.SETTLING and not p.settle_tx_hash:
                p.advance(S.EXPIRED, failure_reason="authorization lapsed with no settlement on chain")
        return p
    if conf.facilitator_url:
        return _ask_facilitator(p, conf)
    return p


def settle(payment_id: Any, wait_seconds: float = 30.0) -> Payment:
    """Drive one payment as far as it goes now; the reconciler finishes anything left."""
    p = Payment.objects.get(pk=payment_id)
    if p.status == S.VERIFIED and for_payment(p.network, p.asset).facilitator_url:
        p = settle_via_facilitator(payment_id)
    else:
        p = prepare(payment_id)
        broadcast(p)
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while p.status in (S.SETTLING, S.SETTLED):
        try:
            p = track(p.pk)
        except ChainUnavailable:
            log.warning("RPC unavailable while tracking payment %s; the reconciler will finish", p.pk)
            break
        if p.status not in (S.SETTLING, S.SETTLED) or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return p
