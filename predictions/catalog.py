"""Publishing a model to the catalogue outside the admin: the demo seed and the operator's
``manage.py add_model`` (docs/deploy.md) both go through :func:`publish`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import transaction

from payments.models import HardwareTier

from .models import Model, ModelVersion
from .runners import cog, python


def version_id(runs: str, input_schema: dict[str, Any], output_schema: dict[str, Any]) -> str:
    """A version's id: what runs it (a predictor's dotted path or a Cog URL) and its schemas."""
    blob = json.dumps([runs, input_schema, output_schema], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """A model and its latest version. Exactly one of ``predictor`` (an in-process Python
    predictor, by dotted path; schemas given) and ``cog_url`` (a Cog server; its schemas are read
    from its ``/openapi.json`` when not given)."""

    owner: str
    name: str
    price: Decimal
    predictor: str = ""
    cog_url: str = ""
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    description: str = ""
    hardware: str = "cpu"
    #: Further Model fields (pricing_mode, expected_seconds, settlement_policy, upto_order...).
    options: dict[str, Any] = field(default_factory=dict)


def publish(spec: ModelSpec, *, validate: bool = True) -> Model:
    """Create or update the model and add its version (idempotent). Raises ValueError, or
    Django's ValidationError for a field the model refuses (``validate``: the operator's input;
    the demo seed's own specs skip it, so a test database flushed of its hardware tiers still
    gets its demo models), or cog.SchemaError."""
    if bool(spec.predictor) == bool(spec.cog_url):
        raise ValueError("give exactly one of a predictor and a Cog server URL")
    input_schema, output_schema = spec.input_schema, spec.output_schema
    if spec.cog_url and input_schema is None:
        input_schema, output_schema = cog.read_schemas(spec.cog_url)
    if input_schema is None:
        raise ValueError("a Python predictor needs its input schema")
    output_schema = output_schema or {}
    hardware = HardwareTier.objects.filter(slug=spec.hardware).first()  # None: no tier (flat price)
    with transaction.atomic():
        model = Model.objects.filter(owner=spec.owner, name=spec.name).first() or Model(
            owner=spec.owner, name=spec.name
        )
        model.description, model.price, model.hardware = spec.description, spec.price, hardware
        for name, value in spec.options.items():
            setattr(model, name, value)
        if validate:
            model.full_clean()
        model.save()
        runs = spec.predictor or spec.cog_url
        version = ModelVersion(
            id=version_id(runs, input_schema, output_schema),
            model=model,
            runner=cog.CogRunner.kind if spec.cog_url else python.PythonRunner.kind,
            predictor=spec.predictor,
            cog_url=spec.cog_url,
            input_schema=input_schema,
            output_schema=output_schema,
        )
        if not ModelVersion.objects.filter(id=version.id).exists():
            if validate:
                version.full_clean()
            version.save()
    return model
