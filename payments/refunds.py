"""Refunds: money a payer paid for a prediction that ended without its output, under a policy
that promises it back.

A refund is *owed* when the lifecycle says so (``predictions.lifecycle``, the one place that
knows how a prediction ended); finance *approves* it in the admin, or, up to
``X402_REFUND_AUTO_APPROVE_MAX``, the refund policy approves it as it is owed (:func:`owe`), so
a payer is made whole in minutes; the refund wallet (its key in ``X402_REFUND_KEY``, never in
the database) signs an ERC-20 ``transfer`` back to the payer. The wallet is one more signer of
the relayer (``chain.relayer``, its own nonces): the signed transaction is stored in the outbox
with the settlements' and the refund points to it (*sent*) before it is broadcast; the
reconciler follows it to *confirmed* (or *failed*: the transfer reverted, at the network's
confirmation depth; or *review*: mined without the expected Transfer, for a human). State
changes go through :meth:`Refund.advance` only; what a receipt means for a refund is decided
here, how a transaction is sent, rebroadcast and replaced is the relayer's.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import lru_cache
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from payments.chain import relayer as relayers
from payments.chain.node import RpcError, rpc, rpc_batch
from payments.chain.receipts import gas_of, has_transfer, note_mined, raise_refused, read_receipts, word
from payments.metrics import REFUND_BROADCAST_ERRORS
from payments.models import (
    Payment,
    PaymentStatus,
    Refund,
    RefundEvent,
    RefundStatus,
    RelayerNonce,
    SettlementTx,
)
from payments.options import for_payment
from x402site import dispatch
from x402site.conf import x402

log = logging.getLogger("payments.refunds")
R = RefundStatus
#: ERC-20 transfer(address,uint256).
TRANSFER = "0xa9059cbb"
#: Gas asked for above the node's estimate.
GAS_HEADROOM = 1.3
#: An approved refund the wallet could not send is tried again after this, doubled per attempt...
RETRY_BASE_SECONDS = 60
#: ...up to this.
RETRY_MAX_SECONDS = 3600
#: Why an approved refund waits while the wallet is flagged as unable to pay (relayer.flag_unfunded).
WALLET_CANNOT_PAY = "the refund wallet cannot pay for gas"
#: An approved refund never tried this long after its approval lost its send task (the broker
#: was down): the reconciler sends it.
SEND_GRACE_SECONDS = 60
#: Who approved a refund the policy approved (on its APPROVED event; ``approved_by`` stays empty).
AUTO_APPROVER = "refund policy (X402_REFUND_AUTO_APPROVE_MAX)"


@lru_cache(maxsize=4)
def _account(key: str) -> LocalAccount:
    return Account.from_key(key)


def wallet() -> LocalAccount:
    """The refund wallet; ImproperlyConfigured without ``X402_REFUND_KEY``."""
    if not x402.refunds.key:
        raise ImproperlyConfigured("X402_REFUND_KEY is not set: refunds cannot be sent")
    return _account(x402.refunds.key)


def owe(payment: Payment, reason: str, *, detail: dict[str, Any] | None = None, auto_approve: bool = True) -> Refund:
    """Record the refund of a CONFIRMED ``payment`` (once; call inside the transaction that
    decided it, the payment locked). ``detail`` (the cause, the run seconds) goes on the OWED
    event for finance. A payment not yet confirmed (still SETTLED: a reorg may undo it) or not
    paid at all raises ValueError: nothing is owed back before the money is final. A refund of
    at most ``X402_REFUND_AUTO_APPROVE_MAX`` is approved here (sent after commit) when the
    caller says it may be (``auto_approve``: a failure on our side) and fewer than
    ``X402_REFUND_AUTO_APPROVE_PER_HOUR`` were approved so in the last hour (failures an input
    can provoke must not become a loop that spends our gas unwatched); any other waits for
    finance."""
    if payment.status != PaymentStatus.CONFIRMED:
        raise ValueError(f"payment {payment.pk} is {payment.status}, not confirmed: no refund is owed yet")
    existing = Refund.objects.filter(payment=payment).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            refund = Refund.objects.create(
                payment=payment,
                reason=reason[:2000],
                network=payment.network,
                asset=payment.asset,
                decimals=payment.decimals,
                recipient=payment.payer,
                amount=payment.amount,
            )
    except IntegrityError:
        return Refund.objects.get(payment=payment)
    RefundEvent.objects.create(refund=refund, to_status=R.OWED, detail={"reason": refund.reason, **(detail or {})})
    log.info("refund owed: %s for payment %s", refund.amount_decimal, payment.pk)
    if auto_approve and 0 < refund.amount <= x402.refunds.auto_approve_max and _auto_budget_left():
        return approve(refund.pk, None)
    return refund


def _auto_budget_left() -> bool:
    """Whether the refund policy may approve one more refund now (approved without a user)."""
    since = timezone.now() - timedelta(hours=1)
    recent = Refund.objects.filter(approved_by=None, approved_at__gte=since).count()
    return recent < x402.refunds.auto_approve_per_hour


def approve(refund_id: int, user: Any) -> Refund:
    """Finance approves an owed refund (or one that failed, to try again); it is sent after
    commit. Approving one already approved but not sent (the wallet could not) sends it again.
    ``user`` None: the refund policy approves it (see :func:`owe`)."""
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund_id)
        detail = {"approved_by": str(user) if user is not None else AUTO_APPROVER}
        if refund.status == R.FAILED:
            # The failed attempt's transaction is final (reverted at depth, or its nonce used
            # otherwise) and stays named by its events; the refund forgets it, so the next
            # attempt is judged by its own transaction only. Its gas was spent all the same: the
            # refund's gas stays the total of its attempts (see _earlier_gas).
            refund.advance(
                R.OWED,
                detail=detail,
                approved_by=user,
                approved_at=timezone.now(),
                failure_reason="",
                tx=None,
                tx_hash="",
                block_number=None,
                confirmations=0,
            )
        elif refund.status == R.OWED and refund.approved_at is None:
            refund.approved_by, refund.approved_at = user, timezone.now()
            refund.save(update_fields=["approved_by", "approved_at"])
            RefundEvent.objects.create(refund=refund, from_status=R.OWED, to_status=R.OWED, detail=detail)
        elif refund.status != R.OWED:
            return refund
    transaction.on_commit(lambda: dispatch.send(dispatch.SEND_REFUND, refund.pk))
    return refund


def send_again(refund_id: int) -> bool:
    """Finance's "send again" on an approved refund still owed (its send failed or its task was
    lost): the wait is cleared and it is sent after commit. False for any other refund."""
    if not Refund.objects.filter(pk=refund_id, status=R.OWED, approved_at__isnull=False).update(retry_at=None):
        return False
    transaction.on_commit(lambda: dispatch.send(dispatch.SEND_REFUND, refund_id))
    return True


def send(refund_id: int) -> Refund:
    """Sign and store the approved refund's transfer, then broadcast it. A refund not approved,
    or already sent, is left alone. A wallet that cannot pay (the node's estimate reverts) leaves
    the refund owed, with the reason; so does a missing ``X402_REFUND_KEY``."""
    try:
        account = wallet()
    except ImproperlyConfigured as exc:
        _not_sent(refund_id, str(exc))
        return Refund.objects.get(pk=refund_id)
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund_id)
        if refund.status != R.OWED or refund.approved_at is None:
            return refund
        conf = for_payment(refund.network, refund.asset)
        lane = relayers.lock_signer(refund.network, account)
        if lane.row.unfunded_since is not None:  # flagged by a refused broadcast; cleared by a balance check
            _not_sent(refund.pk, f"{WALLET_CANNOT_PAY}: {lane.row.unfunded_reason}")
            return refund
        data = TRANSFER + word(refund.recipient)[2:] + hex(int(refund.amount))[2:].rjust(64, "0")
        call = {"from": account.address, "to": refund.asset, "data": data}
        try:
            estimate, block = rpc_batch(
                conf.rpc_url, [("eth_estimateGas", [call, "pending"]), ("eth_getBlockByNumber", ["latest", False])]
            )
        except RpcError as exc:
            _not_sent(refund.pk, f"the refund wallet cannot send: {exc}")
            return refund
        tx = relayers.sign_and_store(
            conf,
            lane,
            kind=SettlementTx.Kind.REFUND,
            to=to_checksum_address(refund.asset),
            data=data,
            gas_limit=int(int(estimate, 16) * GAS_HEADROOM),
            items=1,
            block=block,
        )
        refund.advance(
            R.SENT,
            detail={"nonce": tx.nonce, "tx": tx.tx_hash},
            tx=tx,
            sender=account.address,
            tx_hash=tx.tx_hash,
            failure_reason="",
            retry_at=None,
        )
    _broadcast(conf.rpc_url, refund)
    return refund


def _not_sent(refund_id: int, reason: str) -> None:
    """An approved refund the wallet could not send: why, and when the reconciler tries again
    (backing off: RETRY_BASE_SECONDS doubled per attempt, at most RETRY_MAX_SECONDS)."""
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund_id)
        if refund.status != R.OWED:
            return
        attempts = refund.send_attempts + 1
        delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempts - 1))
        refund.failure_reason, refund.send_attempts = reason[:2000], attempts
        refund.retry_at = timezone.now() + timedelta(seconds=delay)
        refund.save(update_fields=["failure_reason", "send_attempts", "retry_at"])
    log.warning("refund %s not sent (attempt %s, again in %ss): %s", refund_id, attempts, delay, reason)


def _broadcast(url: str, refund: Refund) -> str | None:
    """Send the stored transaction (again; :func:`relayer.broadcast`: the same signed bytes, safe
    to repeat; a refusal for lack of gas money flags the wallet as a lane that cannot pay). The
    node's refusal (None when it took it or already has it) is recorded on the refund for
    finance (shown in the admin), counted, and logged as a warning."""
    error = relayers.broadcast(url, refund.tx)
    if error is not None:
        Refund.objects.filter(pk=refund.pk).update(broadcast_error=error[:2000])
        REFUND_BROADCAST_ERRORS.inc()
        log.warning("the node refused refund %s from %s: %s", refund.pk, refund.sender, error)
        return error
    Refund.objects.filter(pk=refund.pk).exclude(broadcast_error="").update(broadcast_error="")
    return None


def _earlier_gas(refund: Refund, url: str) -> tuple[int, int]:
    """(gas used, wei paid) by the refund's earlier, failed attempts: each FAILED event records
    what its attempt's transaction spent on chain (a reverted transfer pays its gas; one whose
    nonce was used otherwise paid none). The refund's ``gas_used``/``gas_cost_wei`` are these
    plus the current attempt's, so a refund approved again never loses gas already spent. A
    revert recorded before the events carried gas (issue 25) is read from its receipt."""
    used = cost = 0
    for detail in refund.events.filter(to_status=R.FAILED).values_list("detail", flat=True):
        if "gas_used" not in detail and detail.get("tx"):
            gas, paid = gas_of(rpc(url, "eth_getTransactionReceipt", [detail["tx"]]) or {})
            detail = {"gas_used": gas, "gas_cost_wei": paid}
        used += int(detail.get("gas_used") or 0)
        cost += int(detail.get("gas_cost_wei") or 0)
    return used, cost


def hashes(refund: Refund) -> list[str]:
    """Every transaction signed for the refund's current attempt, the current one first: its
    outbox row's (a re-signed refund keeps its earlier ones watched: any of them, one nonce, may
    be the one mined). A failed attempt's row is forgotten when the refund is approved again:
    its transaction is final, and taking its receipt for the new attempt's would fail a refund
    whose new transfer still pays."""
    return refund.tx.hashes if refund.tx is not None else []


def track(refund_id: int) -> Refund:
    """Follow one sent refund: confirmed once its transfer has the option's confirmations,
    failed once its revert has them, in review if it was mined without its Transfer; while no
    block has any of its transactions: failed (dropped) once the wallet's nonce at the
    network's depth is past it (another transaction used the nonce), re-signed with a higher
    fee (same nonce) once stuck, else rebroadcast (the relayer's rules for every outgoing
    transaction)."""
    refund = Refund.objects.select_related("tx").get(pk=refund_id)
    if refund.status != R.SENT:
        return refund
    conf = for_payment(refund.network, refund.asset)
    depth = conf.option.confirmations
    tx = refund.tx
    watched = tx.hashes
    found, latest = read_receipts(conf.rpc_url, watched)
    raise_refused(found, watched)
    mined_as = note_mined(tx, found)
    earlier_gas, earlier_cost = _earlier_gas(refund, conf.rpc_url)
    if mined_as is None:
        if refund.block_number is not None:  # a reorg dropped its block, and with it this attempt's gas
            Refund.objects.filter(pk=refund.pk).update(
                block_number=None,
                confirmations=0,
                gas_used=earlier_gas or None,
                gas_cost_wei=earlier_cost or None,
            )
        # At the depth below the head the receipts were read at: a block our transaction was in
        # would have shown its receipt.
        used = relayers.nonce_spent_elsewhere(conf.rpc_url, tx, latest, depth)
        if used is not None:
            return _dropped(refund, watched, used, (earlier_gas, earlier_cost))
        step = relayers.resend(
            conf.rpc_url, tx.tx_hash, stuck=relayers.is_stuck(tx), send=lambda: _broadcast(conf.rpc_url, refund)
        )
        if step == relayers.Resend.RESIGN:
            return _resign(conf.rpc_url, refund)
        return refund
    tx_hash, receipt = mined_as
    if tx_hash != refund.tx_hash:  # an earlier signing was mined: it is the refund's transaction
        Refund.objects.filter(pk=refund.pk).update(tx_hash=tx_hash)
        refund.tx_hash = tx_hash
    block = int(receipt["blockNumber"], 16)
    confirmations = max(0, latest - block + 1)
    gas_used, gas_cost = gas_of(receipt)
    # The refund's gas is every attempt's: the earlier failed ones' and this one's.
    mined = {
        "block_number": block,
        "confirmations": confirmations,
        "gas_used": earlier_gas + gas_used,
        "gas_cost_wei": earlier_cost + gas_cost,
    }
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund_id)
        if refund.status != R.SENT:
            return refund
        evidence = {"tx": refund.tx_hash, "block": block, "receipt_status": receipt["status"]}
        if int(receipt["status"], 16) != 1:
            # A revert is final only at the network's depth: a reorg may drop its block and the
            # same nonce may then pay (re-approving before that would pay twice).
            if confirmations >= depth:
                refund.advance(
                    R.FAILED,
                    detail={**evidence, "gas_used": gas_used, "gas_cost_wei": gas_cost},
                    failure_reason="the refund transfer reverted",
                    **mined,
                )
            else:
                Refund.objects.filter(pk=refund.pk).update(**mined)
        elif not has_transfer(receipt, refund.asset, refund.sender, refund.recipient, int(refund.amount)):
            # Mined and successful, yet not the Transfer we signed: money may have moved. Not
            # FAILED (that invites a second payment): a human must look.
            refund.advance(
                R.REVIEW,
                detail=evidence,
                failure_reason="mined without the expected Transfer to the payer: check on chain before acting",
                **mined,
            )
        elif confirmations >= depth:
            refund.advance(R.CONFIRMED, detail=evidence, **mined)
        else:
            Refund.objects.filter(pk=refund.pk).update(**mined)
    return refund


def _dropped(refund: Refund, watched: list[str], used: int, earlier: tuple[int, int]) -> Refund:
    """No transaction of the refund was mined and the wallet's nonce is past it at depth: another
    transaction (someone used the wallet by hand) took the nonce, so this refund can never be
    paid by what we signed: failed (finance may approve it again)."""
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund.pk)
        if refund.status == R.SENT:
            earlier_gas, earlier_cost = earlier  # of the earlier attempts (_earlier_gas)
            refund.advance(
                R.FAILED,
                # Nothing of this attempt was mined: it spent no gas.
                detail={"dropped": watched, "wallet_nonce_at_depth": used, "gas_used": 0, "gas_cost_wei": 0},
                gas_used=earlier_gas or None,
                gas_cost_wei=earlier_cost or None,
                failure_reason=f"nonce {refund.nonce} was used by another transaction of the wallet: nothing was paid",
            )
    return refund


def _resign(url: str, refund: Refund) -> Refund:
    """A stuck refund signed again with the same nonce and a higher fee (:func:`relayer.replace`),
    the new transaction stored before it is broadcast; the earlier ones stay watched."""
    block = rpc(url, "eth_getBlockByNumber", ["latest", False])
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund.pk)
        account = wallet()
        if refund.status != R.SENT:
            return refund
        refund.tx = tx = SettlementTx.objects.select_for_update().get(pk=refund.tx_id)
        if account.address != tx.relayer:  # the wallet's key changed: never sign anew
            _broadcast(url, refund)
            return refund
        replaced = relayers.replace(tx, account, block)
        if replaced is None:  # at X402_MAX_FEE_PER_GAS: the last one is rebroadcast
            _broadcast(url, refund)
            return refund
        old, max_fee = replaced
        refund.advance(
            R.SENT,
            detail={"nonce": tx.nonce, "tx": tx.tx_hash, "replaces": old, "max_fee_per_gas": max_fee},
            tx_hash=tx.tx_hash,
        )
    _broadcast(url, refund)
    return refund


def _due() -> list[int]:
    """Approved refunds still owed whose send should be tried (again): their retry time came, or
    they were never tried (the send task was lost) SEND_GRACE_SECONDS after approval, or they
    waited for a wallet flagged as unable to pay that a balance check has since cleared."""
    now = timezone.now()
    flagged = RelayerNonce.objects.filter(unfunded_since__isnull=False, address=_wallet_address())
    refilled = Q(failure_reason__startswith=WALLET_CANNOT_PAY) & ~Q(network__in=flagged.values("network"))
    return list(
        Refund.objects.filter(status=R.OWED, approved_at__isnull=False)
        .filter(
            Q(retry_at__lte=now)
            | Q(retry_at=None, approved_at__lte=now - timedelta(seconds=SEND_GRACE_SECONDS))
            | refilled
        )
        .values_list("pk", flat=True)
    )


def _wallet_address() -> str:
    """The refund wallet's address ("" without ``X402_REFUND_KEY``)."""
    try:
        return wallet().address
    except ImproperlyConfigured:
        return ""


def reconcile() -> int:
    """The reconciler's pass: send approved refunds that are due (:func:`_due`), follow every
    sent one; how many were looked at."""
    due = _due()
    for pk in due:
        try:
            send(pk)
        except Exception:  # noqa: BLE001 - one refund's trouble must not stop the others
            log.exception("refund %s: sending failed", pk)
    ids = list(Refund.objects.filter(status=R.SENT).values_list("pk", flat=True))
    for pk in ids:
        try:
            track(pk)
        except Exception:  # noqa: BLE001 - one refund's trouble must not stop the others
            log.exception("refund %s: tracking failed", pk)
    return len(due) + len(ids)
