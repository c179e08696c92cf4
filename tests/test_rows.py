"""x402site.rows.insert: several new rows in one statement, all or none, as save() would write them."""

from __future__ import annotations

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
