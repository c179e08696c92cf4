"""Celery tasks: settle one payment, and the periodic reconciliation that finishes the rest.

Tasks are idempotent (the ledger state decides what is left to do) and acknowledged late, so a
redelivered or retried task never moves money twice.
"""

from __future__ import annotations

import logging

from celery import shared_task

from payments import ledger, refunds
from payments.chain import settlement
from payments.chain.node import ChainUnavailable
from payments.locks import advisory_lock

log = logging.getLogger("payments.tasks")

@shared_task(
    acks_late=True,
    autoretry_for=(ChainUnavailable,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
)
def settle_payment(payment_id: str) -> str:
    payment = settlement.settle(payment_id)
    log.info("payment %s is %s (tx %s)", payment.pk, payment.status, payment.settle_tx_hash)
    return payment.status


@shared_task(
    acks_late=True,
    autoretry_for=(ChainUnavailable,),
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=None,
)
def settle_batches(network: str, asset: str, force: bool = False) -> int:
    """Form, store and broadcast the due batches of one option (payments.chain.batching), then follow
    them for a moment; a transaction not confirmed by then is handed to ``track_settlements``."""
    from payments.chain import batching
    from payments.options import for_payment

    conf = for_payment(network, asset)
    if force:
        batching.started(conf)
    sent = batching.run(conf, force=force)
    open_ids = batching.follow([tx.pk for tx in sent], wait_seconds=FOLLOW_SECONDS)
    if open_ids:
        track_settlements.apply_async(args=[open_ids], countdown=TRACK_EVERY_SECONDS)
    return sum(tx.items for tx in sent)


#: How long a batcher follows its own transactions before it hands them to track_settlements.
FOLLOW_SECONDS = 2.0
#: track_settlements polls this often, this many times; the reconciler finishes the rest.
TRACK_EVERY_SECONDS = 2
TRACK_TRIES = 150


@shared_task(bind=True, acks_late=True, max_retries=TRACK_TRIES)
def track_settlements(self, tx_ids: list[int]) -> int:  # type: ignore[no-untyped-def]
    """Follow our transactions until their payments are confirmed (one receipt read per
    transaction), without holding a worker slot while blocks are mined."""
    from payments.chain import batching

    open_ids = batching.follow(tx_ids, wait_seconds=0)
    if open_ids and self.request.retries < TRACK_TRIES:
        raise self.retry(args=[open_ids], countdown=TRACK_EVERY_SECONDS)
    return len(open_ids)


@shared_task(acks_late=True)
def reconcile() -> dict[str, int]:
    """One reconciliation pass (the balance check of lanes that could not pay, then
    settlement.reconcile_open, then ledger.resend_lost for tasks the broker lost and payments that
    waited for a lane); passes never overlap across workers:
    a pass over many rows can outlast the beat interval, and the next one then skips."""
    with advisory_lock("payments.reconcile") as mine:
        if not mine:
            log.info("reconcile: a pass is already running; skipped")
            return {"skipped": 1}
        refilled = settlement.recheck_lanes()  # lanes flagged as unable to pay: their balance check
        stats = settlement.reconcile_open()
        stats["swept"] += ledger.resend_lost(refilled)
        stats["refunds_tracked"] = refunds.reconcile()
        return dict(stats)


@shared_task(acks_late=True)
def run_export(job_id: int) -> int:
    """Write one queued ledger export (payments.finance.export_jobs); its row count."""
    from payments.finance import export_jobs

    return export_jobs.run(job_id).rows


@shared_task
def expire_exports() -> int:
    """Delete the files of exports past their expiry."""
    from payments.finance import export_jobs

    return export_jobs.expire()


@shared_task(acks_late=True, autoretry_for=(ChainUnavailable,), retry_backoff=True, retry_backoff_max=60, max_retries=None)
def send_refund(refund_id: int) -> str:
    """Sign, store and broadcast one approved refund (payments.refunds); the reconciler confirms it."""
    return refunds.send(refund_id).status


@shared_task(acks_late=True)
def sweep_channels() -> dict[str, int]:
    """One pass over the batch-settlement channels of every option our relayer settles
    (payments.channels.sweep: follow, watch withdrawals, claim what is due, settle to pay-to);
    passes never overlap."""
    from payments.channels import sweep
    from payments.options import SettlementMode, configured

    with advisory_lock("payments.channels.sweep") as mine:
        if not mine:
            return {"skipped": 1}
        totals: dict[str, int] = {}
        for conf in configured():
            if conf.mode != SettlementMode.FACILITATOR:
                for key, n in sweep.sweep(conf).items():
                    totals[key] = totals.get(key, 0) + n
        return totals


@shared_task(bind=True, acks_late=True, max_retries=TRACK_TRIES)
def track_channel_txs(self, tx_ids: list[int]) -> int:  # type: ignore[no-untyped-def]
    """Follow channel transactions (payments.channels.outbox.track) until they are final; the
    sweep finishes any left."""
    from payments.channels import outbox
    from payments.channels.models import ChannelTxStatus

    open_ids = [pk for pk in tx_ids if outbox.track(pk) == ChannelTxStatus.SENT]
    if open_ids and self.request.retries < TRACK_TRIES:
        raise self.retry(args=[open_ids], countdown=TRACK_EVERY_SECONDS)
    return len(open_ids)


@shared_task(acks_late=True, autoretry_for=(ChainUnavailable,), retry_backoff=True, retry_backoff_max=60, max_retries=None)
def refund_channel(network: str, channel_id: str, amount: int | None = None) -> int:
    """Return a channel's unused balance to its payer (payments.channels.outbox.refund: a
    cooperative refund, or our admin's); the stored transaction's id."""
    from payments.channels import outbox

    return outbox.refund(outbox.option_on(network), channel_id, amount).pk
