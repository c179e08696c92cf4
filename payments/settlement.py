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
    sig = bytes.fromhex(p.signature[2:])
    return _token_contract().encode_abi(
        "transferWithAuthorization",
        [
            to_checksum_address(p.payer),
            to_checksum_address(p.pay_to),
            int(p.amount),
            p.valid_after,
            p.valid_before,
            bytes.fromhex(p.nonce[2:]),
            sig[64] if sig[64] >= 27 else sig[64] + 27,
            sig[:32],
            sig[32:64],
        ],
    )


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
    lapsed = _expire_if_lapsed(payment_id)
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
        signed = relayer.sign_transaction(
            {
                "chainId": conf.option.chain_id,
                "nonce": nonce,
                "to": p.asset,
                "data": call["data"],
                "gas": GAS_LIMIT,
                "maxFeePerGas": 2 * base_fee + priority,
                "maxPriorityFeePerGas": priority,
                "value": 0,
                "type": 2,
            }
        )
        p.advance(
            S.SETTLING,
            settle_tx_hash="0x" + signed.hash.hex().removeprefix("0x"),
            settle_raw_tx="0x" + signed.raw_transaction.hex().removeprefix("0x"),
            relayer=relayer.address,
            relayer_nonce=nonce,
        )
        row.next_nonce = nonce + 1
        row.save(update_fields=["next_nonce"])
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


def track(payment_id: Any) -> Payment:
    """Read the receipt and move SETTLING/SETTLED forward (or back, after a reorg)."""
    p = Payment.objects.get(pk=payment_id)
    if p.status not in (S.SETTLING, S.SETTLED) or not p.settle_tx_hash:
        return p
    conf = for_payment(p.network, p.asset)
    receipt, latest = rpc_batch(
        conf.rpc_url,
        [("eth_getTransactionReceipt", [p.settle_tx_hash]), ("eth_blockNumber", [])],
    )
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status not in (S.SETTLING, S.SETTLED):
            return p
        if receipt is None:
            if p.status == S.SETTLED:
                p.advance(
                    S.SETTLING,
                    block_number=None,
                    block_hash="",
                    confirmations=0,
                    detail={"reorg": "receipt disappeared"},
                )
            elif p.valid_before < time.time() - 60 and p.settle_raw_tx:
                # Never mined and no longer minable: the authorization lapsed unpaid.
                p.advance(S.EXPIRED, failure_reason="settlement not mined before validBefore")
            return p
        if not transfer_matches(receipt, p):
            p.advance(
                S.FAILED,
                failure_reason="settlement reverted or moved no matching Transfer",
                block_number=int(receipt["blockNumber"], 16),
                block_hash=receipt["blockHash"],
                detail={"tx": p.settle_tx_hash, "status": receipt.get("status")},
            )
            return p
        block_number = int(receipt["blockNumber"], 16)
        confirmations = max(0, int(latest, 16) - block_number + 1)
        ours = p.relayer and receipt.get("from", "").lower() == p.relayer.lower()
        fields: dict[str, Any] = {
            "block_number": block_number,
            "block_hash": receipt["blockHash"],
            "confirmations": confirmations,
        }
        if ours:
            gas_used = int(receipt["gasUsed"], 16)
            fields["gas_used"] = gas_used
            fields["gas_cost_wei"] = gas_used * int(receipt.get("effectiveGasPrice", "0x0"), 16)
        if confirmations >= conf.option.confirmations:
            p.advance(S.CONFIRMED, **fields)
        elif p.status == S.SETTLING:
            p.advance(S.SETTLED, **fields)
        else:
            for name, value in fields.items():
                setattr(p, name, value)
            p.save(update_fields=list(fields))
    return p


def _expire_if_lapsed(payment_id: Any) -> Payment | None:
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
    lapsed = _expire_if_lapsed(payment_id)
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
