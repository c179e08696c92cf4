"""Re-derive payment states from the chain: finish open settlements, recheck confirmed ones."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from payments.chain import evidence, tracking
from payments.chain.node import rpc_batch
from payments.models import Payment, PaymentStatus
from payments.options import for_payment
from payments.tasks import reconcile

S = PaymentStatus


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--since", help="only payments created since this date (YYYY-MM-DD or ISO 8601)")

    def handle(self, *args: Any, **opts: Any) -> None:
        since = None
        if opts["since"]:
            try:
                since = datetime.fromisoformat(opts["since"])
            except ValueError as exc:
                raise CommandError(f"--since: {exc}") from None
            if timezone.is_naive(since):
                since = timezone.make_aware(since, UTC)
        if since is None:
            stats = reconcile()
        else:
            open_ids = list(
                Payment.objects.filter(status__in=[S.SETTLING, S.SETTLED], created_at__gte=since).values_list(
                    "pk", flat=True
                )
            )
            stats = tracking.reconcile_batch(open_ids)
        self.stdout.write(f"open settlements: {stats}")
        confirmed = Payment.objects.filter(status=S.CONFIRMED)
        if since is not None:
            confirmed = confirmed.filter(created_at__gte=since)
        missing = self._recheck(list(confirmed))
        for p in missing:
            self.stdout.write(
                self.style.ERROR(
                    f"{p.pk}: confirmed in the ledger, but {p.settle_tx_hash} "
                    "has no matching receipt on chain"
                )
            )
        self.stdout.write(f"confirmed payments rechecked: {confirmed.count()}, mismatches: {len(missing)}")
        if missing:
            raise CommandError("the ledger and the chain disagree")

    @staticmethod
    def _recheck(payments: list[Payment]) -> list[Payment]:
        """Confirmed payments whose receipt is gone or carries no matching Transfer."""
        bad = []
        by_option: dict[tuple[str, str], list[Payment]] = {}
        for p in payments:
            by_option.setdefault((p.network, p.asset), []).append(p)
        for (network, asset), group in by_option.items():
            url = for_payment(network, asset).rpc_url
            for i in range(0, len(group), tracking.RECONCILE_BATCH):
                chunk = group[i : i + tracking.RECONCILE_BATCH]
                receipts = rpc_batch(url, [("eth_getTransactionReceipt", [p.settle_tx_hash]) for p in chunk])
                bad += [
                    p
                    for p, r in zip(chunk, receipts, strict=True)
                    if not r or not evidence.transfer_matches(r, p)
                ]
        return bad
