"""x402site.rows.insert: several new rows in one statement, all or none, as save() would write them."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from predictions.lifecycle import create
from predictions.models import Prediction, PredictionEvent, PredictionStatus, SettlementPolicy
from x402site import rows

BEFORE_RUN = SettlementPolicy.BEFORE_RUN


@pytest.mark.django_db
def test_a_prediction_and_its_event_are_one_statement_read_back_as_saved(demo_model) -> None:
    version = demo_model.versions.get()
    with CaptureQueriesContext(connection) as queries:
        prediction = create(version, {"text": "hi"}, payment=None, settlement_policy=BEFORE_RUN)
    assert len(queries.captured_queries) == 1, [q["sql"] for q in queries.captured_queries]
    stored = Prediction.objects.get(pk=prediction.pk)
    # Defaults and the save() override's pseudonym, as a save() would have written them.
    assert stored.ref and stored.ref == prediction.ref
    assert stored.status == PredictionStatus.STARTING and stored.input == {"text": "hi"}
    assert stored.time_limit_seconds == demo_model.time_limit_seconds
    assert list(PredictionEvent.objects.filter(prediction=stored).values_list("to_status", flat=True)) == [
        PredictionStatus.STARTING
    ]
    assert not prediction._state.adding  # a later save() updates it, never inserts it again


@pytest.mark.django_db
def test_a_row_refused_by_the_database_leaves_none_of_its_statement(demo_model) -> None:
    version = demo_model.versions.get()
    first = create(version, {"text": "a"}, payment=None, settlement_policy=BEFORE_RUN)
    again = Prediction(id="x" * 32, model=demo_model, version=version, input={}, settlement_policy=BEFORE_RUN)
    again.assign_ref()
    duplicate = Prediction(id=first.pk, model=demo_model, version=version, input={}, settlement_policy=BEFORE_RUN)
    duplicate.assign_ref()
    with pytest.raises(IntegrityError), transaction.atomic():
        rows.insert(again, PredictionEvent(prediction=again, to_status=PredictionStatus.STARTING), duplicate)
    assert not Prediction.objects.filter(pk=again.pk).exists()
    assert Prediction.objects.count() == 1


@pytest.mark.django_db
def test_the_latest_version_is_read_once_built_and_rebuilt_on_any_change(demo_model) -> None:
    """ModelVersion.objects.latest_of: one small query when nothing changed; any change to the
    version, its model or its tier (even earlier in the same transaction) is seen at once."""
    from payments.models import HardwareTier
    from predictions.catalog import ModelSpec, publish
    from predictions.models import ModelVersion

    latest = ModelVersion.objects.latest_of
    first = latest("demo", "echo-text")
    assert first is not None and first.model == demo_model
    with CaptureQueriesContext(connection) as queries:
        again = latest("demo", "echo-text")
    assert len(queries.captured_queries) == 1 and again == first
    # Each caller gets its own objects: a change to one is not the next caller's.
    again.model.description = "changed by a caller"
    assert latest("demo", "echo-text").model.description != "changed by a caller"

    demo_model.price += 1  # a price change in the same transaction: a new row version
    demo_model.save()
    assert latest("demo", "echo-text").model.price == demo_model.price
    tier = HardwareTier.objects.create(slug="zz-gpu", name="GPU", price_per_second=Decimal("0.5"))
    demo_model.hardware = tier
    demo_model.save()
    assert latest("demo", "echo-text").model.hardware.price_per_second == tier.price_per_second
    HardwareTier.objects.filter(pk=tier.pk).update(price_per_second=Decimal("0.75"))
    assert latest("demo", "echo-text").model.hardware.price_per_second == Decimal("0.75")

    version = first
    newer = publish(
        ModelSpec(
            owner="demo",
            name="echo-text",
            price=demo_model.price,
            predictor=version.predictor,
            input_schema={**version.input_schema, "description": "v2"},
            output_schema=version.output_schema,
        ),
        validate=False,
    ).versions.order_by("-created_at").first()
    assert newer.pk != version.pk and latest("demo", "echo-text").pk == newer.pk
    assert latest("demo", "nothing") is None
