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

How a payment is settled depends on its option's mode (our relayer one payment per
transaction, our relayer in batches, or a remote facilitator): the settlers are registered in
:data:`SETTLERS`, and nothing else branches on the mode. Our own transactions are
:class:`~payments.models.SettlementTx` rows (one per signed transaction, several payments each
when batched); receipts are read per transaction, and each payment is judged by its own logs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Any, Protocol, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from eth_utils import to_checksum_address

from payments.chain import relayer as relayers
from payments.chain.abi import (
    AUTHORIZATION_USED_TOPIC,
    NONCE_BITMAP,
    TOKEN_ABI,
    TRANSFER_TOPIC,
    UPTO_SETTLE,
    UPTO_SETTLE_TYPES,
)
from payments.chain.node import (
    AuthorizationUse,
    ChainUnavailable,
    RpcError,
    authorization_use,
    rpc,
    rpc_batch,
)
from payments.chain.receipts import read_receipts
from payments.chain.relayer import relayer_account
from payments.facilitator import FacilitatorClient, FacilitatorUnavailable
from payments.metrics import RECONCILE_ERRORS
from payments.models import Payment, PaymentStatus, SettlementTx, UnpaidReason
from payments.options import ConfiguredOption, SettlementMode, for_payment
from payments.signals import payment_unsettled
from payments.x402.eip712 import Authorization
from payments.x402.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoPermit
from payments.x402.types import SCHEME_UPTO, parse_payload
from payments.x402.verify import VerifiedPayment

__all__ = ["relayer_account"]  # re-exported: views and ops name the relayer through this module

log = logging.getLogger("payments.chain.settlement")
T = TypeVar("T")
S = PaymentStatus

#: Gas limit for one transferWithAuthorization (82,900 measured on anvil; USDC needs a little more).
GAS_LIMIT = 150_000
#: Gas limit for one upto proxy ``settle`` (Permit2 witness transfer; about 90,000 on anvil).
UPTO_GAS_LIMIT = 200_000
#: A payment is taken as lapsed this long after validBefore by our clock, even if no block has
#: been stamped past it yet (a quiet dev chain mines no blocks; real chains stamp wall time).
LAPSE_MARGIN_SECONDS = 60
#: A VERIFIED payment this close to validBefore is not signed any more: it lapses instead.
SETTLE_SAFETY_SECONDS = 2


@lru_cache(maxsize=1)
def _token_contract() -> Any:
    from web3 import Web3  # imported lazily: web3 costs ~0.6 s and only workers need it

    return Web3().eth.contract(abi=TOKEN_ABI)


def _exact_calldata(auth: Authorization, pay_to: str, signature: bytes) -> str:
    """transferWithAuthorization with (v, r, s) for a canonical 65-byte ECDSA signature, else the
    ``bytes`` overload (contract wallets, EIP-1271): the chain gets the bytes that were verified."""
    head = [
        to_checksum_address("0x" + auth.from_.hex()),
        to_checksum_address(pay_to),
        auth.value,
        auth.valid_after,
        auth.valid_before,
        auth.nonce,
    ]
    contract = _token_contract()
    if len(signature) != 65 or signature[64] not in (27, 28):
        return contract.encode_abi(
            "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
            [*head, signature],
        )
    return contract.encode_abi(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)",
        [*head, signature[64], signature[:32], signature[32:64]],
    )


def _calldata(p: Payment) -> str:
    auth = Authorization(
        from_=bytes.fromhex(p.payer[2:]),
        to=bytes.fromhex(p.pay_to[2:]),
        value=int(p.amount),
        valid_after=p.valid_after,
        valid_before=p.valid_before,
        nonce=bytes.fromhex(p.nonce[2:]),
    )
    return _exact_calldata(auth, p.pay_to, bytes.fromhex(p.signature[2:]))


def _permit(p: Payment) -> UptoPermit:
    permit = parse_payload(p.payload).permit
    if permit is None:
        raise ValueError(f"payment {p.pk} is upto but its payload holds no permit")
    return permit


def _permit_calldata(permit: UptoPermit, amount: int, signature: bytes) -> str:
    """The upto proxy's ``settle(permit, amount, owner, witness, signature)`` for ``amount``."""
    from eth_abi import encode

    def address(raw: bytes) -> str:
        return to_checksum_address("0x" + raw.hex())

    args = [
        ((address(permit.token), permit.maximum), permit.nonce, permit.deadline),
        amount,
        address(permit.owner),
        (address(permit.to), address(permit.facilitator), permit.valid_after),
        signature,
    ]
    return "0x" + (UPTO_SETTLE + encode(UPTO_SETTLE_TYPES, args)).hex()


def _upto_calldata(p: Payment) -> str:
    """The upto proxy's settle for the charge."""
    return _permit_calldata(_permit(p), int(p.amount), bytes.fromhex(p.signature[2:]))


@dataclass(frozen=True, slots=True)
class SettlementCall:
    """The transaction that settles one payment: whom it calls, with what, from which lane."""

    to: str
    data: str
    gas_limit: int
    #: The lane that must send it (None: any).
    sender: str | None = None


def _upto_call(permit: UptoPermit, data: str) -> SettlementCall:
    """From the lane the permit names as its facilitator (the proxy refuses any other sender)."""
    facilitator = to_checksum_address("0x" + permit.facilitator.hex())
    return SettlementCall(UPTO_PROXY_ADDRESS, data, UPTO_GAS_LIMIT, facilitator)


def settlement_call(p: Payment) -> SettlementCall:
    """exact: the token's transferWithAuthorization, from any lane. upto: the proxy's settle for
    the charge, from the lane the permit names as its facilitator."""
    if p.scheme == SCHEME_UPTO:
        return _upto_call(_permit(p), _upto_calldata(p))
    return SettlementCall(p.asset, _calldata(p), GAS_LIMIT)


def held_settlement_call(verified: VerifiedPayment) -> SettlementCall:
    """The call that will settle a payment held until after its run, at the most it can settle
    (an upto permit's signed maximum), as it will be sent."""
    payload, option = verified.payload, verified.requirement.option
    if payload.permit is not None:
        permit = payload.permit
        return _upto_call(permit, _permit_calldata(permit, permit.maximum, payload.signature))
    data = _exact_calldata(payload.authorization, option.pay_to, payload.signature)
    return SettlementCall(option.asset, data, GAS_LIMIT)


#: How the chain says a settlement came before its authorization's ``validAfter``: the token's
#: require message, and the upto proxy's ``PaymentTooEarly()`` error (its selector).
NOT_YET_VALID_MESSAGE = "authorization is not yet valid"
PAYMENT_TOO_EARLY = "0xa65539fa"
#: Longest wait, in a settlement or at the gate, for an authorization that becomes valid in the
#: next seconds (the token wants ``block.timestamp > validAfter``, and a client may sign
#: ``validAfter`` = now): waited out, never called a failure.
VALID_AFTER_WAIT_SECONDS = 3


def not_yet_valid(exc: RpcError) -> bool:
    """The call reverted only because its block is earlier than the authorization's validAfter."""
    data = exc.data if isinstance(exc.data, str) else ""
    return NOT_YET_VALID_MESSAGE in str(exc) or data.lower().startswith(PAYMENT_TOO_EARLY)


def is_revert(exc: RpcError) -> bool:
    """The call reverted (the EVM said no: JSON-RPC code 3, a revert message or revert data), as
    opposed to the node failing to answer it (a provider's rate limit, missing state): only a
    revert may refuse a payment; anything else is the chain being unavailable."""
    data = exc.data if isinstance(exc.data, str) else ""
    return exc.code == 3 or "revert" in str(exc).lower() or len(data) > 2


def wait_for_valid_after(valid_after: int) -> None:
    """Sleep until our clock is past ``valid_after`` if that is at most a few seconds away."""
    wait = valid_after + 1 - time.time()
    if 0 < wait <= VALID_AFTER_WAIT_SECONDS:
        time.sleep(wait)


def when_valid(valid_after: int, simulation: Callable[[], T]) -> T:
    """``simulation()`` once a block mined now may use an authorization valid after
    ``valid_after`` (its timestamp must be past it): waited out for a few seconds at most,
    by our clock and then by the node's (asked again while it answers "not yet valid"). Raises
    the last RpcError."""
    deadline = time.monotonic() + VALID_AFTER_WAIT_SECONDS
    wait_for_valid_after(valid_after)
    while True:
        try:
            return simulation()
        except RpcError as exc:
            if not not_yet_valid(exc) or time.monotonic() + 0.5 > deadline:
                raise
            time.sleep(0.5)


def simulate(url: str, call: SettlementCall) -> None:
    """Run ``call`` as the transaction that will be sent: from its lane, in the block it will be
    mined in (``pending``: on a chain idle for a while the latest block is minutes old, and an
    authorization valid now would look not yet valid there). Raises RpcError when it reverts."""
    sender = call.sender or relayers.lanes()[0].address
    tx = {"from": sender, "to": call.to, "data": call.data, "gas": hex(call.gas_limit)}
    rpc(url, "eth_call", [tx, "pending"])


def _lock(payment_id: Any) -> Payment:
    return Payment.objects.select_for_update(of=("self",)).select_related("settlement_tx").get(pk=payment_id)


def _word(address: str) -> str:
    return "0x" + address[2:].lower().rjust(64, "0")


def _topics(entry: dict[str, Any]) -> list[str]:
    return [t.lower() for t in entry.get("topics", [])]


def transfer_matches(receipt: dict[str, Any], p: Payment) -> bool:
    """True when the receipt succeeded and carries this payment's own transfer: the token's
    ``AuthorizationUsed(payer, nonce)`` log, followed by its ``Transfer(payer, payTo, amount)``.

    Matching the authorization, not just a Transfer of the right amount, matters in a batch: two
    payments of one payer for the same price may share a transaction, and only the one whose
    authorization was used is paid.
    """
    if int(receipt.get("status", "0x0"), 16) != 1:
        return False
    logs = [_topics(e) + [e.get("data", "0x0")] for e in receipt.get("logs", []) if e.get("address", "").lower() == p.asset.lower()]
    transfer = [TRANSFER_TOPIC, _word(p.payer), _word(p.pay_to)]
    if p.scheme == SCHEME_UPTO:
        # One permit per transaction of ours (upto is never batched), to our proxy: its Transfer
        # of the charge. Permit2 logs no nonce use; the nonce's bit is read apart (chain_use).
        to_proxy = (receipt.get("to") or "").lower() == UPTO_PROXY_ADDRESS.lower()
        return to_proxy and any(e[:3] == transfer and int(e[3], 16) == int(p.amount) for e in logs)
    used = [AUTHORIZATION_USED_TOPIC, _word(p.payer), p.nonce.lower()]
    for i, entry in enumerate(logs):
        if entry[:3] == used:
            # Its Transfer: after it, before the next authorization's use (the token emits
            # AuthorizationUsed, then Transfer).
            for later in logs[i + 1 :]:
                if later[0] == AUTHORIZATION_USED_TOPIC:
                    return False
                if later[:3] == transfer and int(later[3], 16) == int(p.amount):
                    return True
            return False
    return False


def _revert_message(exc: RpcError) -> str:
    return str(exc)[:500]


class UseNotFound(RuntimeError):
    """The chain says the authorization was used, but not (within the searched blocks) by what."""


def _permit2_use(p: Payment, url: str) -> AuthorizationUse:
    """The chain's word on an upto permit: its nonce's bit in Permit2's bitmap, and which of our
    transactions for it paid. The proxy lets only the permit's facilitator (our lane) settle it,
    so a used nonce that none of our transactions paid was spent by the payer elsewhere (another
    Permit2 transfer, or ``invalidateUnorderedNonces``): no money moved for this payment."""
    permit = _permit(p)
    call = {
        "to": PERMIT2_ADDRESS,
        "data": "0x" + NONCE_BITMAP.hex() + _word(p.payer)[2:] + permit.nonce_word.to_bytes(32, "big").hex(),
    }
    hashes = _hashes(p)
    try:
        head, bitmap, *receipts = rpc_batch(
            url,
            [
                ("eth_getBlockByNumber", ["latest", False]),
                ("eth_call", [call, "latest"]),
                *[("eth_getTransactionReceipt", [h]) for h in hashes],
            ],
        )
        head_block, head_ts = int(head["number"], 16), int(head["timestamp"], 16)
        used = int(bitmap, 16) & permit.nonce_bit != 0
    except (RpcError, TypeError, KeyError, ValueError) as exc:
        raise ChainUnavailable(f"Permit2 nonce state unreadable: {exc}") from exc
    paid_in = next((h for h, r in zip(hashes, receipts, strict=True) if r and transfer_matches(r, p)), None)
    start = p.search_from_block or 0
    if used and paid_in is None and any(r is None for r in receipts) and not _lane_nonce_spent(p, url, head_block):
        # One of ours is not mined (yet, or any more): it may be the use. Ask again later.
        raise UseNotFound(f"payment {p.pk}: Permit2 nonce used, our transaction for it not mined")
    return AuthorizationUse(
        used, paid_in, None, head_block, head_ts, start, used_elsewhere=used and paid_in is None
    )


def _lane_nonce_spent(p: Payment, url: str, head_block: int) -> bool:
    """True when none of our transaction's unmined hashes can ever be mined: its lane's nonce was
    spent at confirmation depth (by a sibling signature of the same nonce, e.g. the replacement
    that reverted, or by a later transaction reusing it). A replaced signature never gets a
    receipt; without this, a payment whose replacement reverted would wait for it forever."""
    tx = p.settlement_tx
    if tx is None:
        return False  # a hash found on chain, not ours: its receipt may come back after a reorg
    depth = for_payment(p.network, p.asset).option.confirmations
    at = max(0, head_block - max(depth, 1) + 1)
    try:
        spent = int(rpc(url, "eth_getTransactionCount", [tx.relayer, hex(at)]), 16)
    except (RpcError, TypeError, ValueError) as exc:
        raise ChainUnavailable(f"nonce of lane {tx.relayer} unreadable: {exc}") from exc
    return spent > tx.nonce


def chain_use(p: Payment) -> AuthorizationUse:
    """The chain's word on this payment's authorization: used (by which transaction) or not."""
    conf = for_payment(p.network, p.asset)
    if p.scheme == SCHEME_UPTO:
        return _permit2_use(p, conf.rpc_url)
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
    """No block can use the authorization any more (the token requires timestamp < validBefore;
    Permit2, for an upto permit, timestamp <= deadline)."""
    last_usable = p.valid_before if p.scheme == SCHEME_UPTO else p.valid_before - 1
    head_past = use is not None and use.head_timestamp > last_usable
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
    state. Otherwise it may still be used: nothing changes (``payment_unsettled`` is sent: what
    waits for the payment need not wait for its lapse).
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
            # Ours only if it is one of our transaction's hashes (a replaced signature mined late).
            ours = p.settlement_tx if p.settlement_tx and use.used_in in p.settlement_tx.hashes else None
            # Paid: why it was going unpaid no longer holds (kept in the event for the books; a
            # payment we had released is refunded, see predictions.lifecycle._refund_if_owed).
            p.advance(
                S.SETTLING,
                settle_tx_hash=use.used_in,
                settlement_tx=ours,
                unpaid_reason="",
                failure_reason="",
                detail={"found_on_chain": use.used_in, "chain": chain, "was_unpaid": p.unpaid_reason},
            )
        elif receipt is not None or use.canceled_in or use.used_elsewhere:
            reason = (
                UnpaidReason.PAYER_CANCELED if use.canceled_in and receipt is None else UnpaidReason.NONCE_USED_ELSEWHERE
            )
            p.advance(
                S.FAILED,
                unpaid_reason=reason,
                failure_reason=f"{reason.label} ({use.used_in or use.canceled_in or 'Permit2 nonce'})",
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
        else:
            payment_unsettled.send(sender=Payment, payment=p)
    if p.status == S.SETTLING:
        p = track(p.pk)
    return p


def refusal_before_run(verified: VerifiedPayment, conf: ConfiguredOption) -> str | None:
    """Why the settlement of a payment held until after its run (upto, ``after_success``) would
    revert if sent now (the chain's message), else None. Simulated as it will be sent: from the
    lane that sends it, at the most it can settle, in the next block. An option settled by a
    remote facilitator is that facilitator's to judge (its ``/verify``): None."""
    if conf.mode == SettlementMode.FACILITATOR:
        return None
    call = held_settlement_call(verified)
    try:
        when_valid(verified.payload.authorization.valid_after, lambda: simulate(conf.rpc_url, call))
    except RpcError as exc:
        if not_yet_valid(exc):
            return None
        if not is_revert(exc):
            raise ChainUnavailable(f"settlement simulation: {exc}") from exc
        return _revert_message(exc)
    return None


def refuse_if_unsettleable(payment_id: Any) -> Payment:
    """Before a held payment's run starts (VERIFIED, its settlement not asked for yet): simulate
    the settlement at the most it can settle; if it would revert, the payment is refused before
    the run (LAPSING, ``refused_before_run``; the chain then says what it became) and, once the
    chain says it is unused, its prediction fails unstarted (``payment_unsettled``). A node that
    does not answer (not a revert) raises ChainUnavailable: the caller tries again later."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED or p.settle_requested_at is not None:
        return p
    conf = for_payment(p.network, p.asset)
    if conf.mode == SettlementMode.FACILITATOR:
        return p
    signature = bytes.fromhex(p.signature[2:])
    if p.scheme == SCHEME_UPTO:
        permit = _permit(p)
        call = _upto_call(permit, _permit_calldata(permit, permit.maximum, signature))
    else:
        call = settlement_call(p)
    try:
        when_valid(p.valid_after, lambda: simulate(conf.rpc_url, call))
    except RpcError as exc:
        if not_yet_valid(exc):
            return p
        if not is_revert(exc):
            raise ChainUnavailable(f"settlement simulation: {exc}") from exc
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status != S.VERIFIED or p.settle_requested_at is not None:
                return p
            why = f"refused before the run: its settlement would revert: {_revert_message(exc)}"
            _lapse(p, UnpaidReason.REFUSED_BEFORE_RUN, why)
        return resolve_lapsing(payment_id)
    return p


def _fault_pause() -> None:
    if settings.X402_FAULT_PAUSE_AFTER_SIGN:
        # Fault injection for the crash tests only: a window between store and broadcast.
        time.sleep(settings.X402_FAULT_PAUSE_AFTER_SIGN)


def prepare(payment_id: Any) -> Payment:
    """VERIFIED -> SETTLING, one transaction for this payment: simulate, then sign and store it
    with a nonce of the least loaded relayer lane."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED:
        return p
    lapsed = expire_if_lapsed(payment_id)
    if lapsed is not None:
        return lapsed
    conf = for_payment(p.network, p.asset)
    settle = settlement_call(p)
    call = {"from": settle.sender or relayers.lanes()[0].address, "to": settle.to, "data": settle.data}
    try:
        # Simulated in the block the transaction will be mined in (see simulate).
        block, _ = when_valid(
            p.valid_after,
            lambda: rpc_batch(
                conf.rpc_url,
                [("eth_getBlockByNumber", ["latest", False]), ("eth_estimateGas", [call, "pending"])],
            ),
        )
    except RpcError as exc:
        if not_yet_valid(exc):
            # The node's clock is behind validAfter: a correct payment, settled later (it stays
            # VERIFIED: the reconciler's sweep sends it again), never lapsed.
            log.info("payment %s: not yet valid on chain (validAfter %s), settled later", p.pk, p.valid_after)
            return p
        # The transfer would revert: maybe someone already settled it (front-running), maybe
        # the payer moved the funds. The chain decides which (resolve_lapsing).
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status == S.VERIFIED:
                _lapse(p, UnpaidReason.SIMULATION_REVERTED, f"simulation reverted: {_revert_message(exc)}")
        return resolve_lapsing(payment_id)
    try:
        with transaction.atomic():
            p = _lock(payment_id)
            if p.status != S.VERIFIED:
                return p
            lane = relayers.take_lane(p.network, settle.sender)
            p = _sign(p, conf, settle, lane, block)
    except relayers.NoLaneCanPay as exc:
        # Nothing signed: the payment waits, VERIFIED, until a lane can pay again (the
        # reconciler then sends it its way, see ledger.resend_lost).
        log.warning("payment %s not signed: %s", payment_id, exc)
        return Payment.objects.get(pk=payment_id)
    _fault_pause()
    return p


def _sign(
    p: Payment, conf: ConfiguredOption, settle: SettlementCall, lane: relayers.Lane, block: dict[str, Any]
) -> Payment:
    """Sign and store the payment's transaction on ``lane`` and move it to SETTLING (the payment
    and the lane locked by the caller)."""
    tx = relayers.sign_and_store(
        conf,
        lane,
        kind=SettlementTx.Kind.SINGLE,
        to=settle.to,
        data=settle.data,
        gas_limit=settle.gas_limit,
        items=1,
        block=block,
    )
    p.advance(
        S.SETTLING,
        settle_tx_hash=tx.tx_hash,
        settlement_tx=tx,
        settlement_index=0,
        search_from_block=p.search_from_block or int(block["number"], 16),
    )
    return p


def broadcast(p: Payment) -> None:
    """Send the payment's stored transaction (again). Safe to repeat: the same signed bytes."""
    if p.status != S.SETTLING or p.settlement_tx_id is None:
        return
    relayers.broadcast(for_payment(p.network, p.asset).rpc_url, p.settlement_tx)


# --- receipts -------------------------------------------------------------------------------------


def _hashes(p: Payment) -> list[str]:
    """Every transaction that may settle this payment: our transaction's hashes (the current
    one and those it replaced), or the one found on chain."""
    if p.settlement_tx_id is not None:
        return p.settlement_tx.hashes
    return [p.settle_tx_hash] if p.settle_tx_hash else []


@dataclass
class Move:
    """What the chain says a locked payment becomes: a transition (or only new fields)."""

    to: str | None
    fields: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] | None = None


BlockClock = Callable[[dict[str, Any]], int]


def block_clock(url: str) -> BlockClock:
    """The timestamp of a receipt's block (read once per block, only for payments that failed)."""
    seen: dict[str, int] = {}

    def at(receipt: dict[str, Any]) -> int:
        block_hash = receipt["blockHash"]
        if block_hash not in seen:
            block = rpc(url, "eth_getBlockByHash", [block_hash, False])
            seen[block_hash] = int(block["timestamp"], 16) if block else 0
        return seen[block_hash]

    return at


def _note_mined(tx: SettlementTx, receipts: dict[str, Any]) -> None:
    """Record on our transaction which of its hashes was mined, where, and the gas it cost (or
    that its block was dropped by a reorg)."""
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
            gas = int(receipt["gasUsed"], 16)
            cost = gas * int(receipt.get("effectiveGasPrice", "0x0"), 16)
            if (tx.gas_used, tx.gas_cost_wei) != (gas, cost):
                changes.update(gas_used=gas, gas_cost_wei=cost)
    if changes:
        for name, value in changes.items():
            setattr(tx, name, value)
        SettlementTx.objects.filter(pk=tx.pk).update(**changes)


def _decide(p: Payment, receipts: dict[str, Any], latest: int, conf: ConfiguredOption, clock: BlockClock) -> Move | None:
    """What the receipts say about a SETTLING/SETTLED payment (no writes, no RPC but ``clock``)."""
    mined = next(((h, receipts[h]) for h in _hashes(p) if receipts.get(h)), None)
    if mined is None:
        if p.status == S.SETTLED:
            # Reorg: the block holding our settlement is gone. The stored transaction is
            # rebroadcast while the authorization is still valid.
            return Move(
                S.SETTLING,
                {"block_number": None, "block_hash": "", "confirmations": 0},
                {"reorg": f"receipt of {p.settle_tx_hash} disappeared"},
            )
        if has_lapsed(p):
            # Not mined, and no longer minable: unless another transaction used the
            # authorization (a replaced facilitator transaction, a third party).
            return Move(
                S.LAPSING,
                {"unpaid_reason": UnpaidReason.NOT_MINED, "failure_reason": "settlement not mined before validBefore"},
            )
        return None
    tx_hash, receipt = mined
    block_number = int(receipt["blockNumber"], 16)
    fields: dict[str, Any] = {
        "block_number": block_number,
        "block_hash": receipt["blockHash"],
        "confirmations": max(0, latest - block_number + 1),
    }
    if tx_hash != p.settle_tx_hash:
        fields["settle_tx_hash"] = tx_hash
    tx = p.settlement_tx
    if tx is not None and tx.gas_used is not None and (p.gas_used is None or p.block_hash != receipt["blockHash"]):
        fields["gas_used"], fields["gas_cost_wei"] = tx.share(p.settlement_index or 0)
    if not transfer_matches(receipt, p):
        # Reverted (maybe someone else used the authorization first in the same block), or our
        # batch's call for it failed (used, expired, unfunded): the chain decides what it became.
        reverted = int(receipt.get("status", "0x0"), 16) != 1
        if clock(receipt) >= p.valid_before:
            reason, message = UnpaidReason.NOT_SETTLED_IN_TIME, "the authorization expired before its settlement was mined"
        elif reverted:
            reason, message = UnpaidReason.SETTLEMENT_REVERTED, "settlement transaction reverted"
        else:
            reason, message = UnpaidReason.SETTLEMENT_REVERTED, "settlement moved no Transfer of this authorization"
        return Move(
            S.LAPSING,
            {**fields, "unpaid_reason": reason, "failure_reason": message},
            {"tx": tx_hash, "status": receipt.get("status")},
        )
    if fields["confirmations"] >= conf.option.confirmations:
        return Move(S.CONFIRMED, fields)
    if p.status == S.SETTLING:
        return Move(S.SETTLED, fields)
    if (p.block_hash, p.confirmations) != (fields["block_hash"], fields["confirmations"]):
        return Move(None, fields)
    return None


def _write(moves: list[tuple[Payment, Move]]) -> None:
    """Write the moves of locked payments: one ledger transaction, transitions in bulk."""
    groups: dict[tuple[str | None, str], list[tuple[Payment, dict[str, Any]]]] = {}
    for p, move in moves:
        key = (move.to, json.dumps(move.detail or {}, sort_keys=True, default=str))
        groups.setdefault(key, []).append((p, move.fields))
    for (to, detail), changes in groups.items():
        if to is None:
            for p, fields in changes:
                for name, value in fields.items():
                    setattr(p, name, value)
            Payment.update_many(changes)
        else:
            Payment.advance_many(changes, to, detail=json.loads(detail) or None)


def _read_receipts(url: str, hashes: list[str]) -> tuple[dict[str, Any], int]:
    """Receipts of ``hashes`` and the latest block number (:func:`receipts.read_receipts`)."""
    return read_receipts(url, hashes)


def _mine(p: Payment, receipts: dict[str, Any]) -> dict[str, Any]:
    """This payment's receipts; raises the node's error about one of its hashes."""
    mine = {h: receipts.get(h) for h in _hashes(p)}
    for answer in mine.values():
        if isinstance(answer, RpcError):
            raise answer
    return mine


def _apply(payment_ids: list[Any], receipts: dict[str, Any], latest: int, conf: ConfiguredOption, clock: BlockClock) -> list[Payment]:
    """Lock the payments (one transaction of ours, or one payment), record what the chain says
    about the transaction, and move each payment by its own logs: one ledger transaction."""
    with transaction.atomic():
        locked = list(
            Payment.objects.select_for_update(of=("self",))
            .select_related("settlement_tx")
            .filter(pk__in=payment_ids, status__in=[S.SETTLING, S.SETTLED])
            .order_by("pk")
        )
        txs: dict[int, SettlementTx] = {}
        for p in locked:
            if p.settlement_tx_id is not None:
                # One instance per transaction, so that every payment sees what _note_mined wrote.
                p.settlement_tx = txs.setdefault(p.settlement_tx_id, p.settlement_tx)
        for tx in txs.values():
            _note_mined(tx, {h: receipts.get(h) for h in tx.hashes})
        moves = []
        for p in locked:
            move = _decide(p, _mine(p, receipts), latest, conf, clock)
            if move is not None:
                moves.append((p, move))
        _write(moves)
    return locked


def _group_of(p: Payment) -> list[Any]:
    """The open payments tracked together with ``p``: those of its transaction, or itself."""
    if p.settlement_tx_id is None:
        return [p.pk]
    return list(
        Payment.objects.filter(settlement_tx_id=p.settlement_tx_id, status__in=[S.SETTLING, S.SETTLED]).values_list(
            "pk", flat=True
        )
    )


def track(payment_id: Any) -> Payment:
    """Read the receipt and move SETTLING/SETTLED forward (or back, after a reorg), together
    with every payment its transaction carries."""
    p = Payment.objects.select_related("settlement_tx").get(pk=payment_id)
    if p.status not in (S.SETTLING, S.SETTLED) or not p.settle_tx_hash:
        return p
    conf = for_payment(p.network, p.asset)
    receipts, latest = _read_receipts(conf.rpc_url, _hashes(p))
    _apply(_group_of(p), receipts, latest, conf, block_clock(conf.rpc_url))
    return Payment.objects.get(pk=payment_id)


def track_tx(tx_id: int) -> list[Payment]:
    """Track every open payment of one of our transactions; the payments, as they are now."""
    tx = SettlementTx.objects.get(pk=tx_id)
    ids = list(tx.payments.filter(status__in=[S.SETTLING, S.SETTLED]).values_list("pk", flat=True))
    if not ids:
        return []
    p = Payment.objects.get(pk=ids[0])
    conf = for_payment(p.network, p.asset)
    receipts, latest = _read_receipts(conf.rpc_url, tx.hashes)
    return _apply(ids, receipts, latest, conf, block_clock(conf.rpc_url))


#: Receipts read per JSON-RPC batch by the reconciler.
RECONCILE_BATCH = 200
#: Longest wait before a row that raised is tried again.
MAX_BACKOFF_SECONDS = 300


def isolated(stats: Counter[str], payment_ids: Any, step: str, fn: Callable[..., object], *args: Any) -> None:
    """Run one row's (or a list of rows': one transaction's) step so that its failure is logged,
    counted and backed off, and the others go on. A node that cannot be reached at all
    (ChainUnavailable) ends the pass instead."""
    ids = list(payment_ids) if isinstance(payment_ids, list) else [payment_ids]
    try:
        fn(*args)
    except ChainUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad row must not stop the reconciler
        stats["errors"] += 1
        RECONCILE_ERRORS.labels(step=step).inc()
        failures = max(Payment.objects.filter(pk__in=ids).values_list("reconcile_failures", flat=True), default=0)
        delay = min(2 ** min(failures, 16), MAX_BACKOFF_SECONDS)
        Payment.objects.filter(pk__in=ids).update(
            reconcile_failures=F("reconcile_failures") + 1, reconcile_after=timezone.now() + timedelta(seconds=delay)
        )
        log.exception("reconcile %s of payments %s failed (retry in %ss): %s", step, ids[:5], delay, exc)
    else:
        Payment.objects.filter(pk__in=ids, reconcile_failures__gt=0).update(reconcile_failures=0, reconcile_after=None)


def reconcile_batch(payment_ids: list[Any], stats: Counter[str] | None = None) -> Counter[str]:
    """Track many SETTLING/SETTLED payments with one RPC batch per chunk; rebroadcast the unmined.

    Payments are taken together per transaction of ours (a batch moves as one ledger
    transaction), else alone. A transaction not mined ``X402_STUCK_AFTER_SECONDS`` after it was
    signed is replaced (same nonce, higher fees); every replaced hash is still watched, since any
    of them may be mined. Each group is handled in isolation (:func:`isolated`).
    """
    stats = Counter() if stats is None else stats
    payments = list(
        Payment.objects.filter(pk__in=payment_ids, status__in=[S.SETTLING, S.SETTLED])
        .exclude(settle_tx_hash=None)
        .select_related("settlement_tx")
    )
    by_option: dict[tuple[str, str], dict[Any, list[Payment]]] = {}
    for p in payments:
        key = ("tx", p.settlement_tx_id) if p.settlement_tx_id is not None else ("payment", p.pk)
        by_option.setdefault((p.network, p.asset), {}).setdefault(key, []).append(p)
    for (network, asset), groups in by_option.items():
        try:
            conf = for_payment(network, asset)
        except LookupError:
            for group in groups.values():
                isolated(stats, [p.pk for p in group], "receipt", for_payment, network, asset)
            continue
        chunk: list[list[Payment]] = []
        for group in [*groups.values(), None]:
            if group is not None:
                chunk.append(group)
            hashes = sum(len(_hashes(g[0])) for g in chunk)
            if chunk and (group is None or hashes >= RECONCILE_BATCH):
                receipts, latest = _read_receipts(conf.rpc_url, [h for g in chunk for h in _hashes(g[0])])
                stats["rpc_batches"] += 1
                clock = block_clock(conf.rpc_url)
                for g in chunk:
                    isolated(stats, [p.pk for p in g], "receipt", _reconcile_group, g, receipts, latest, conf, clock, stats)
                chunk = []
    return stats


def _reconcile_group(
    group: list[Payment],
    receipts: dict[str, Any],
    latest: int,
    conf: ConfiguredOption,
    clock: BlockClock,
    stats: Counter[str],
) -> None:
    locked = _apply([p.pk for p in group], receipts, latest, conf, clock)
    stats["payments"] += len(locked)
    waiting = [p for p in locked if p.status == S.SETTLING and p.settlement_tx_id is not None]
    if not waiting:
        return
    tx = SettlementTx.objects.get(pk=waiting[0].settlement_tx_id)
    if tx.block_number is not None:
        return
    sent = tx
    stuck = relayers.is_stuck(tx)
    step = relayers.resend(conf.rpc_url, tx.tx_hash, stuck=stuck, send=lambda: relayers.broadcast(conf.rpc_url, sent))
    stats["rebroadcast"] += 1
    if step == relayers.Resend.NO_FUNDS:
        stats["unfunded"] += 1
    elif step == relayers.Resend.RESIGN:
        tx = replace_tx(tx.pk, conf)
        stats["replaced"] += tx.tx_hash != sent.tx_hash
        relayers.broadcast(conf.rpc_url, tx)


def replace_tx(tx_id: int, conf: ConfiguredOption) -> SettlementTx:
    """Re-sign a stuck transaction with the same nonce and fees raised past the node's bump rule;
    its waiting payments follow the new hash (the old ones are still watched)."""
    block = rpc(conf.rpc_url, "eth_getBlockByNumber", ["latest", False])
    with transaction.atomic():
        tx = SettlementTx.objects.select_for_update().get(pk=tx_id)
        waiting = list(
            Payment.objects.select_for_update().filter(settlement_tx=tx, status=S.SETTLING).order_by("pk")
        )
        if not waiting or tx.block_number is not None:
            return tx
        resigned = relayers.resign(tx, block)
        if resigned is None:  # at the fee cap: the last one is rebroadcast
            return tx
        new_hash, raw, max_fee = resigned
        old = tx.tx_hash
        tx.replaced_hashes = tx.hashes
        tx.tx_hash, tx.raw_tx, tx.signed_at = new_hash, raw, timezone.now()
        tx.max_fee_per_gas = max_fee
        tx.save(update_fields=["replaced_hashes", "tx_hash", "raw_tx", "signed_at", "max_fee_per_gas"])
        for p in waiting:
            p.settlement_tx = tx
        Payment.advance_many(
            [(p, {"settle_tx_hash": new_hash}) for p in waiting],
            S.SETTLING,
            detail={"replaced": old, "by": new_hash, "max_fee": max_fee},
        )
    return tx


def expire_if_lapsed(payment_id: Any) -> Payment | None:
    """A VERIFIED payment whose authorization lapsed before we settled it goes LAPSING, and the
    chain is asked at once whether someone else used it (then it is paid, not expired)."""
    p = Payment.objects.get(pk=payment_id)
    if p.status != S.VERIFIED or p.valid_before > time.time() + SETTLE_SAFETY_SECONDS:
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


#: How each SettlementMode settles; payments.chain.batching registers SettlementMode.BATCH's
#: (imported by PaymentsConfig.ready), as the module that forms batches.
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


def recheck_lanes() -> set[str]:
    """The balance check of the lanes flagged as unable to pay (:func:`relayer.recheck_unfunded`);
    the networks where one can pay again. An RPC failure leaves them flagged until next pass."""
    from payments.options import configured

    urls = {c.option.network: c.rpc_url for c in configured()}
    try:
        return relayers.recheck_unfunded(urls)
    except (RpcError, ChainUnavailable, ValueError, TypeError) as exc:
        log.warning("reconcile: balance check of unfunded lanes failed (%s); next pass", exc)
        return set()


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
