"""Seed the demo models (demo/echo-text, demo/count-seconds) with their prices. Safe to run again."""

from typing import Any

from django.core.management.base import BaseCommand

from predictions.demo import seed


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **opts: Any) -> None:
        for model in seed():
            per_second = " (or pay per second: upto)" if model.offers_upto else ""
            self.stdout.write(f"seeded {model} at {model.price_per_run.normalize():f} USDC per run{per_second}")
