"""Add a model to the catalogue (or update it) with its price and latest version.

    manage.py add_model acme/echo --predictor mypkg.predict.Predictor \\
        --input-schema '{"type": "object", "properties": {"text": {"type": "string"}}}' \\
        --output-schema '{"type": "string"}' --price 0.01
    manage.py add_model acme/sdxl --cog-url http://gpu-1:5000 --hardware gpu-a100-80gb --price 0.05

A Python predictor (loaded by dotted path in the prediction workers) needs its input and output
JSON Schemas (inline JSON or @file); a Cog server's are read from its /openapi.json. Prices and
everything else can be changed later in the admin (Operators group).
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from payments.models import HardwareTier
from predictions.catalog import ModelSpec, publish
from predictions.models import SettlementPolicy
from predictions.runners import cog


def _json(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise CommandError("a JSON Schema is an object")
    return parsed


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("model", help="owner/name")
        runs = parser.add_mutually_exclusive_group(required=True)
        runs.add_argument("--predictor", default="", help="dotted path of a Python predictor class")
        runs.add_argument("--cog-url", default="", help="base URL of a Cog server")
        parser.add_argument("--input-schema", help="JSON Schema of the input (JSON, or @file)")
        parser.add_argument("--output-schema", help="JSON Schema of the output (JSON, or @file)")
        parser.add_argument("--price", required=True, help="USDC per run, e.g. 0.01")
        parser.add_argument("--description", default="")
        parser.add_argument("--hardware", default="cpu", help="hardware tier slug (default cpu)")
        parser.add_argument(
            "--settlement-policy",
            choices=SettlementPolicy.values,
            help="before_run (default) or after_success",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        owner, _, name = opts["model"].partition("/")
        if not owner or not name:
            raise CommandError("name the model as owner/name")
        try:
            price = Decimal(opts["price"])
        except InvalidOperation:
            raise CommandError(f"not a price: {opts['price']!r}") from None
        if not HardwareTier.objects.filter(slug=opts["hardware"]).exists():
            raise CommandError(f"no hardware tier {opts['hardware']!r}")
        options = {"settlement_policy": opts["settlement_policy"]} if opts["settlement_policy"] else {}
        spec = ModelSpec(
            owner=owner,
            name=name,
            price=price,
            predictor=opts["predictor"],
            cog_url=opts["cog_url"].rstrip("/"),
            input_schema=_json(opts["input_schema"]),
            output_schema=_json(opts["output_schema"]),
            description=opts["description"],
            hardware=opts["hardware"],
            options=options,
        )
        try:
            model = publish(spec)
        except (ValueError, ValidationError, cog.SchemaError) as exc:
            raise CommandError(str(exc)) from None
        version = model.versions.order_by("-created_at").first()
        self.stdout.write(
            self.style.SUCCESS(
                f"{model} at {model.price_per_run.normalize():f} USDC per run, version {version.id}"
            )
        )
