"""Seed the demo models (demo/echo-text) with their prices. Safe to run again."""

from typing import Any

from django.core.management.base import BaseCommand

from predictions.demo import seed


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args: Any, **opts: Any) -> None:
        for model in seed():
            self.stdout.write(f"seeded {model} at {model.price} USDC per run")
