"""Settle every verified payment whose settlement was asked for (or all of them with --all)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from payments.chain import settlement
from payments.chain.node import ChainUnavailable
from payments.models import Payment, PaymentStatus


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--all", action="store_true", help="also payments not yet asked to settle")
        parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for each receipt")

    def handle(self, *args: Any, **opts: Any) -> None:
        pending = Payment.objects.filter(status=PaymentStatus.VERIFIED).order_by("created_at")
        if not opts["all"]:
            pending = pending.exclude(settle_requested_at=None)
        counts: dict[str, int] = {}
        for pk in pending.values_list("pk", flat=True):
            try:
                payment = settlement.settle(pk, wait_seconds=opts["wait"])
            except ChainUnavailable as exc:
                self.stderr.write(f"{pk}: RPC unavailable ({exc}); stopping")
                break
            counts[payment.status] = counts.get(payment.status, 0) + 1
            self.stdout.write(f"{pk}: {payment.status} {payment.settle_tx_hash or ''}")
        self.stdout.write(f"settled: {counts or 'nothing pending'}")
