"""Settlement through our relayer: sign, store, broadcast, then track the receipt.

Each step is idempotent and driven by the ledger state, so a task delivered twice, a worker
killed between steps or an RPC outage never sends a second transaction for one payment:
the signed transaction is stored before it is broadcast, and only that stored transaction is
ever rebroadcast.

Paid means: a receipt with status 1 that carries the token's ``Transfer(from, payTo, value)``.
Unpaid is never decided from our side alone: a payment we cannot or will not settle goes
LAPSING, and only :func:`resolve_lapsing`, after asking the chain whether the authorization was
used (by anyone, in any transaction), writes FAILED or EXPIRED, or adopts the transaction that
paid.

How a payment is settled depends on its option's mode (our relayer, or a remote facilitator):
the settlers are registered in :data:`SETTLERS`, and nothing else branches on the mode.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache
from typing import Any, Protocol

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from .abi import TOKEN_ABI, TRANSFER_TOPIC
from .chain import AuthorizationUse, ChainUnavailable, RpcError, authorization_use, rpc, rpc_batch
from .facilitator import FacilitatorClient, FacilitatorUnavailable
from .metrics import RECONCILE_ERRORS
from .models import Payment, PaymentStatus, RelayerNonce, UnpaidReason
from .options import ConfiguredOption, SettlementMode, for_payment

log = logging.getLogger("payments.settlement")
S = PaymentStatus

#: Gas limit for one transferWithAuthorization (82,900 measured on anvil; USDC needs a little more).
GAS_LIMIT = 150_000
#: A payment is taken as lapsed this long after validBefore by our clock, even if no block has
#: been stamped past it yet (a quiet dev chain mines no blocks; real chains stamp wall time).
LAPSE_MARGIN_SECONDS = 60


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


class UseNotFound(RuntimeError):
    """The chain says the authorization was used, but not (within the searched blocks) by what."""


def chain_use(p: Payment) -> AuthorizationUse:
    """The chain's word on this payment's authorization: used (by which transaction) or not."""
    conf = for_payment(p.network, p.asset)
    return authorization_use(
        conf.rpc_url,
        p.asset,
        p.payer,
        p.nonce,
        from_block=p.search_from_block,
        lookback=settings.X402_LOG_LOOKBACK_BLOCKS,
        span=settings.X402_LOG_SPAN_BLOCKS,
    )


def has_lapsed(p: Payment, use: AuthorizationUse | None = None) -> bool:
    """No block can use the authorization any more (the token requires timestamp < validBefore)."""
    head_past = use is not None and use.head_timestamp >= p.valid_before
    return head_past or time.time() >= p.valid_before + LAPSE_MARGIN_SECONDS


def _lapse(p: Payment, reason: UnpaidReason, message: str, **fields: Any) -> None:
    """Move a locked payment to LAPSING: not settled by us; the chain will say what it became."""
    p.advance(S.LAPSING, unpaid_reason=reason, failure_reason=message[:1000], **fields)


def resolve_lapsing(payment_id: Any) -> Payment:
    """The only writer of FAILED and EXPIRED: ask the chain whether the authorization was used.

    Used by a transaction that carries this payment's Transfer: SETTLING with that hash (its
    receipt then decides SETTLED or CONFIRMED), so money that moved is always on the books and
    its prediction is served. Used without that Transfer (the payer spent the nonce on another
    authorization) or canceled by the payer: FAILED. Unused and lapsed: the reason's terminal
    state. Otherwise it may still be used: nothing changes.
    """
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.LAPSING:
        return p
    use = chain_use(p)
    receipt = None
    if use.used_in:
        receipt = rpc(for_payment(p.network, p.asset).rpc_url, "eth_getTransactionReceipt", [use.used_in])
        if receipt is None:
            return p  # its block was just dropped: ask again next pass
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status != S.LAPSING:
            return p
        chain = use.as_detail()
        if receipt is not None and transfer_matches(receipt, p):
            p.advance(S.SETTLING, settle_tx_hash=use.used_in, detail={"found_on_chain": use.used_in, "chain": chain})
        elif receipt is not None or use.canceled_in:
            reason = UnpaidReason.NONCE_USED_ELSEWHERE if receipt is not None else UnpaidReason.PAYER_CANCELED
            p.advance(
                S.FAILED,
                unpaid_reason=reason,
                failure_reason=f"{reason.label} ({use.used_in or use.canceled_in})",
                detail={"chain": chain},
            )
        elif use.used:
            # Used, but the transaction lies outside the searched blocks: never call it unpaid.
            # Raised, so the reconciler counts it, backs off and keeps it in sight.
            raise UseNotFound(
                f"payment {p.pk}: authorization used on chain, no log of it since block {use.searched_from} "
                "(raise X402_LOG_LOOKBACK_BLOCKS or set search_from_block)"
            )
        elif has_lapsed(p, use):
            p.advance(UnpaidReason(p.unpaid_reason).final_status, detail={"chain": chain})
    if p.status == S.SETTLING:
        p = track(p.pk)
    return p


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
        # The transfer would revert: maybe someone already settled it (front-running), maybe
        # the payer moved the funds. The chain decides which (resolve_lapsing).
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status == S.VERIFIED:
                _lapse(p, UnpaidReason.SIMULATION_REVERTED, f"simulation reverted: {_revert_message(exc)}")
        return resolve_lapsing(payment_id)
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
            search_from_block=p.search_from_block or int(block["number"], 16),
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
        elif has_lapsed(p):
            # Not mined, and no longer minable: unless another transaction used the
            # authorization (a replaced facilitator transaction, a third party).
            _lapse(p, UnpaidReason.NOT_MINED, "settlement not mined before validBefore")
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
        # Reverted, maybe because someone else used the authorization first in the same block.
        reverted = int(receipt.get("status", "0x0"), 16) != 1
        _lapse(
            p,
            UnpaidReason.SETTLEMENT_REVERTED,
            "settlement transaction reverted" if reverted else "settlement moved no matching Transfer",
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
    """Receipts of ``hashes`` and the latest block number, in one JSON-RPC batch.

    A hash the node refuses maps to its RpcError (raised for that payment alone, see
    :func:`_mine`), so one malformed row cannot sink the batch.
    """
    answers = rpc_batch(
        url, [("eth_blockNumber", [])] + [("eth_getTransactionReceipt", [h]) for h in hashes], errors_inline=True
    )
    if isinstance(answers[0], RpcError):
        raise ChainUnavailable(f"eth_blockNumber: {answers[0]}")
    return dict(zip(hashes, answers[1:], strict=True)), int(answers[0], 16)


def _mine(p: Payment, receipts: dict[str, Any]) -> dict[str, Any]:
    """This payment's receipts; raises the node's error about one of its hashes."""
    mine = {h: receipts.get(h) for h in _hashes(p)}
    for answer in mine.values():
        if isinstance(answer, RpcError):
            raise answer
    return mine


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
            _apply_receipts(p, _mine(p, receipts), latest, conf)
    return p


#: Receipts read per JSON-RPC batch by the reconciler.
RECONCILE_BATCH = 200
#: Longest wait before a row that raised is tried again.
MAX_BACKOFF_SECONDS = 300


def isolated(stats: Counter[str], payment_id: Any, step: str, fn: Callable[..., object], *args: Any) -> None:
    """Run one row's step so that its failure is logged, counted and backed off, and the others
    go on. A node that cannot be reached at all (ChainUnavailable) ends the pass instead."""
    try:
        fn(*args)
    except ChainUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad row must not stop the reconciler
        stats["errors"] += 1
        RECONCILE_ERRORS.labels(step=step).inc()
        failures = Payment.objects.filter(pk=payment_id).values_list("reconcile_failures", flat=True).first() or 0
        delay = min(2 ** min(failures, 16), MAX_BACKOFF_SECONDS)
        Payment.objects.filter(pk=payment_id).update(
            reconcile_failures=F("reconcile_failures") + 1, reconcile_after=timezone.now() + timedelta(seconds=delay)
        )
        log.exception("reconcile %s of payment %s failed (retry in %ss): %s", step, payment_id, delay, exc)
    else:
        Payment.objects.filter(pk=payment_id, reconcile_failures__gt=0).update(
            reconcile_failures=0, reconcile_after=None
        )


def reconcile_batch(payment_ids: list[Any], stats: Counter[str] | None = None) -> Counter[str]:
    """Track many SETTLING/SETTLED payments with one RPC batch per chunk; rebroadcast the unmined.

    A transaction not mined ``X402_STUCK_AFTER_SECONDS`` after it was signed is replaced (same
    nonce, higher fees); every replaced hash is still watched, since any of them may be mined.
    Each row is handled in isolation (:func:`isolated`).
    """
    stats = Counter() if stats is None else stats
    payments = list(
        Payment.objects.filter(pk__in=payment_ids, status__in=[S.SETTLING, S.SETTLED]).exclude(
            settle_tx_hash=None
        )
    )
    by_option: dict[tuple[str, str], list[Payment]] = {}
    for p in payments:
        by_option.setdefault((p.network, p.asset), []).append(p)
    for (network, asset), group in by_option.items():
        try:
            conf = for_payment(network, asset)
        except LookupError:
            for p in group:
                isolated(stats, p.pk, "receipt", for_payment, network, asset)
            continue
        for i in range(0, len(group), RECONCILE_BATCH):
            chunk = group[i : i + RECONCILE_BATCH]
            receipts, latest = _read_receipts(conf.rpc_url, [h for p in chunk for h in _hashes(p)])
            stats["rpc_batches"] += 1
            for p in chunk:
                isolated(stats, p.pk, "receipt", _reconcile_one, p, receipts, latest, conf, stats)
    return stats


def _reconcile_one(
    p: Payment, receipts: dict[str, Any], latest: int, conf: ConfiguredOption, stats: Counter[str]
) -> None:
    with transaction.atomic():
        p = _lock(p.pk)
        if p.status in (S.SETTLING, S.SETTLED):
            _apply_receipts(p, _mine(p, receipts), latest, conf)
    stats["payments"] += 1
    if p.status == S.SETTLING and p.settle_raw_tx:
        if _is_stuck(p):
            p = replace_stuck(p.pk)
            stats["replaced"] += 1
        broadcast(p)
        stats["rebroadcast"] += 1


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
    """A VERIFIED payment whose authorization lapsed before we settled it goes LAPSING, and the
    chain is asked at once whether someone else used it (then it is paid, not expired)."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED or p.valid_before > time.time() + 2:
        return None
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status != S.VERIFIED:
            return p
        _lapse(p, UnpaidReason.NOT_SETTLED_IN_TIME, "authorization expired before settlement")
    return resolve_lapsing(payment_id)


class Settler(Protocol):
    """How one option's payments are settled (registered by SettlementMode in SETTLERS)."""

    def start(self, payment_id: Any) -> Payment:
        """VERIFIED -> SETTLING (or LAPSING), at most once whatever the concurrency."""
        ...

    def retry_unknown(self, p: Payment, conf: ConfiguredOption) -> Payment:
        """A SETTLING payment with no transaction hash, not yet lapsed: try to learn or finish it."""
        ...


class RelayerSettler:
    """Our relayer signs transferWithAuthorization, stores it, then broadcasts it."""

    def start(self, payment_id: Any) -> Payment:
        p = prepare(payment_id)
        broadcast(p)
        return p

    def retry_unknown(self, p: Payment, conf: ConfiguredOption) -> Payment:
        return p  # our own settlements always carry their hash; the chain search decides


class FacilitatorSettler:
    """The option's x402 facilitator settles; an unknown outcome stays SETTLING for the reconciler."""

    def start(self, payment_id: Any) -> Payment:
        """The payment is claimed (VERIFIED -> SETTLING) before the call, so only one worker asks."""
        lapsed = expire_if_lapsed(payment_id)
        if lapsed is not None:
            return lapsed
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status != S.VERIFIED:
                return p
            conf = for_payment(p.network, p.asset)
            p.advance(S.SETTLING, detail={"facilitator": conf.facilitator_url})
        try:
            return self.retry_unknown(p, conf)
        except FacilitatorUnavailable:
            return p  # unknown outcome: the reconciler finds it on chain or asks again

    def retry_unknown(self, p: Payment, conf: ConfiguredOption) -> Payment:
        """Ask (again): sending the identical payload is safe, one authorization moves money once.

        A facilitator that cannot answer raises FacilitatorUnavailable, so the reconciler backs
        this row off instead of waiting out its timeouts on every pass."""
        client = FacilitatorClient(conf.facilitator_url, conf.facilitator_auth)
        try:
            answer = client.settle(p.x402_version, p.payload, p.requirement)
        except FacilitatorUnavailable as exc:
            log.warning("facilitator settle for payment %s: unknown outcome (%s)", p.pk, exc)
            raise
        tx = answer.get("transaction") or ""
        with transaction.atomic():
            p = _lock(p.pk)
            if p.status != S.SETTLING or p.settle_tx_hash:
                return p
            if tx:
                # Success or "settlement_pending" with a hash: the receipt decides either way.
                p.advance(S.SETTLING, settle_tx_hash=tx, detail={"facilitator_answer": answer})
            elif answer.get("success") is False and answer.get("errorReason") != "settlement_pending":
                # A refusal is the facilitator's word, not the chain's: it may still have landed.
                _lapse(
                    p,
                    UnpaidReason.FACILITATOR_REFUSED,
                    f"facilitator refused: {answer.get('errorReason')}",
                    detail={"facilitator_answer": answer},
                )
        return resolve_lapsing(p.pk) if p.status == S.LAPSING else p


SETTLERS: dict[str, Settler] = {
    SettlementMode.RELAYER: RelayerSettler(),
    SettlementMode.FACILITATOR: FacilitatorSettler(),
}


def resolve_unknown(payment_id: Any) -> Payment:
    """A SETTLING payment with no transaction hash: find its settlement on chain, or ask again."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.SETTLING or p.settle_tx_hash:
        return p
    use = chain_use(p)
    with transaction.atomic():
        p = _lock(payment_id)
        if p.status != S.SETTLING or p.settle_tx_hash:
            return p
        if use.used_in:
            p.advance(S.SETTLING, settle_tx_hash=use.used_in, detail={"found_on_chain": use.used_in})
        elif use.canceled_in or has_lapsed(p, use):
            _lapse(p, UnpaidReason.NOT_MINED, "no settlement found on chain before validBefore")
    if p.status == S.LAPSING:
        return resolve_lapsing(payment_id)
    if p.settle_tx_hash:
        return track(payment_id)
    conf = for_payment(p.network, p.asset)
    return SETTLERS[conf.mode].retry_unknown(p, conf)


def reconcile_all() -> Counter[str]:
    """One reconciliation pass (:func:`reconcile_open`), then re-enqueue VERIFIED payments whose
    settle task was lost."""
    from .tasks import SWEEP_AFTER, settle_payment

    stats = reconcile_open()
    stale = timezone.now() - SWEEP_AFTER
    for pk in Payment.objects.filter(status=S.VERIFIED, settle_requested_at__lt=stale).values_list("pk", flat=True):
        settle_payment.delay(str(pk))
        stats["swept"] += 1
    return stats


def reconcile_open() -> Counter[str]:
    """Re-derive every open payment from the chain, each row in isolation: finish unknown
    outcomes, track receipts in batches (rebroadcasting or replacing the unmined), and ask the
    chain about LAPSING payments and lapsed VERIFIED ones."""
    stats: Counter[str] = Counter()
    due = Payment.objects.due_for_reconcile()
    try:
        for pk in due.filter(status=S.SETTLING, settle_tx_hash=None).values_list("pk", flat=True):
            isolated(stats, pk, "unknown", resolve_unknown, pk)
            stats["unknown"] += 1
        open_ids = list(due.filter(status__in=[S.SETTLING, S.SETTLED]).values_list("pk", flat=True))
        reconcile_batch(open_ids, stats)
        for pk in due.filter(status=S.LAPSING).values_list("pk", flat=True):
            isolated(stats, pk, "lapsing", resolve_lapsing, pk)
            stats["lapsing"] += 1
        for pk in due.filter(status=S.VERIFIED, valid_before__lt=time.time()).values_list("pk", flat=True):
            isolated(stats, pk, "expire", expire_if_lapsed, pk)
            stats["expired"] += 1
    except ChainUnavailable as exc:
        stats["errors"] += 1
        stats["chain_unavailable"] += 1
        log.warning("reconcile: RPC unavailable (%s); will retry next pass", exc)
    return stats


def settle(payment_id: Any, wait_seconds: float = 30.0) -> Payment:
    """Drive one payment as far as it goes now; the reconciler finishes anything left."""
    p = Payment.objects.get(pk=payment_id)
    if p.status == S.VERIFIED:
        p = SETTLERS[for_payment(p.network, p.asset).mode].start(payment_id)
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while p.status in (S.SETTLING, S.SETTLED) and p.settle_tx_hash:
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
