"""Replicate's API surface: model versions, every field of Replicate's model, version and
prediction objects (against a fixture written from Replicate's published OpenAPI document),
and Replicate's error shapes for unknown models and versions."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from django.test import Client

from predictions.models import ModelVersion
from tests.payers import v2_header_for

pytestmark = [pytest.mark.django_db(transaction=True)]
FIELDS = json.loads((Path(__file__).parent / "fixtures" / "replicate_fields.json").read_text())
URL = "/v1/models/demo/echo-text/predictions"


def paid(chain, payer: int, body: dict, path: str = URL, **headers: str):
    def post(**extra: str):
        return Client().post(path, data=json.dumps(body), content_type="application/json", headers=extra)

    challenge = post(**headers)
    assert challenge.status_code == 402, challenge.content
    key = chain.payers[payer]["private_key"]
    return post(**{"PAYMENT-SIGNATURE": v2_header_for(key, challenge["PAYMENT-REQUIRED"]), **headers})


def add_versions(model, count: int) -> list[str]:
    """``count`` more versions of ``model``, each a minute newer than the last."""
    from datetime import timedelta

    latest = model.latest_version
    ids = []
    for i in range(count):
        version = ModelVersion.objects.create(
            id=f"{i:064x}",
            model=model,
            predictor=latest.predictor,
            input_schema=latest.input_schema,
            output_schema=latest.output_schema,
            created_at=latest.created_at + timedelta(minutes=i + 1),
        )
        ids.append(version.id)
    return ids


def assert_fields(body: dict, spec: dict, *, absent: tuple[str, ...] = ()) -> None:
    """Every property of Replicate's schema is in ``body`` (but the ones we document as not
    served); every required one is there."""
    expected = set(spec["properties"]) - set(absent)
    missing = expected - set(body)
    assert not missing, f"missing {sorted(missing)} of {spec['schema']}"
    assert set(spec.get("required", [])) - set(absent) <= set(body)


def test_versions_list_pages_newest_first_and_get(chain_settings, demo_model) -> None:
    original = demo_model.latest_version.id
    added = add_versions(demo_model, 55)
    seen: list[str] = []
    url = "/v1/models/demo/echo-text/versions"
    pages = 0
    while url:
        page = Client().get(url).json()
        assert set(page) == set(FIELDS["page"]["properties"])
        seen += [v["id"] for v in page["results"]]
        url = page["next"] and page["next"].replace("http://testserver", "")
        pages += 1
    assert pages == 2 and seen == [*added[::-1], original]  # 50 + 6, newest first, no duplicates

    version = Client().get(f"/v1/models/demo/echo-text/versions/{original}").json()
    assert set(version) == set(FIELDS["version"]["properties"])
    assert isinstance(version["cog_version"], str)  # the official client requires a string
    document = version["openapi_schema"]
    assert document["openapi"].startswith("3.")
    schemas = document["components"]["schemas"]
    assert set(FIELDS["version"]["openapi_schema_components"]) <= set(schemas)
    assert schemas["Input"]["required"] == ["text"] and schemas["Input"]["title"] == "Input"
    assert schemas["Output"]["type"] == "string"
    # The Input schema is the one inputs are validated against (JSON Schema 2020-12, as OpenAPI 3.1).
    jsonschema.Draft202012Validator(schemas["Input"]).validate({"text": "hi"})
    ref = document["paths"]["/predictions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/PredictionRequest"}


def test_unknown_model_and_version_answer_as_replicate_does(chain_settings, demo_model) -> None:
    for path in (
        "/v1/models/nobody/nothing/versions",
        "/v1/models/nobody/nothing/versions/abc",
        "/v1/models/demo/echo-text/versions/" + "f" * 64,
        "/v1/models/nobody/nothing",
    ):
        response = Client().get(path)
        assert response.status_code == 404, path
        assert response["Content-Type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 404 and problem["detail"].startswith("The requested resource could not")
    # A create with an unknown version: 422 "Invalid version or not permitted", before any challenge.
    for version in ("f" * 64, f"demo/other:{demo_model.latest_version.id}"):
        response = Client().post(
            "/v1/predictions",
            data=json.dumps({"version": version, "input": {"text": "x"}}),
            content_type="application/json",
        )
        assert response.status_code == 422, response.content
        problem = response.json()
        assert problem["title"] == "Invalid version or not permitted" and problem["status"] == 422
        assert "does not exist" in problem["detail"] and "PAYMENT-REQUIRED" not in response
    # The owner/name:version form naming the right model is accepted (asks for payment).
    named = Client().post(
        "/v1/predictions",
        data=json.dumps({"version": f"demo/echo-text:{demo_model.latest_version.id}", "input": {"text": "x"}}),
        content_type="application/json",
    )
    assert named.status_code == 402


def test_model_json_has_every_field_of_replicates_model(chain_settings, demo_model) -> None:
    demo_model.github_url = "https://github.com/example/echo"
    demo_model.save()
    spec = FIELDS["model"]
    body = Client().get("/v1/models/demo/echo-text").json()
    assert_fields(body, spec)
    assert body["visibility"] in spec["visibility_enum"]
    assert isinstance(body["run_count"], int) and body["is_official"] is False
    assert body["github_url"] == "https://github.com/example/echo" and body["paper_url"] is None
    assert set(body["latest_version"]) == set(FIELDS["version"]["properties"])
    assert body["latest_version"]["id"] == demo_model.latest_version.id
    listed = Client().get("/v1/models").json()["results"]
    for model in listed:
        assert_fields(model, spec)


def test_prediction_json_has_every_field_of_replicates_prediction(
    chain_settings, demo_model, eager_celery
) -> None:
    spec = FIELDS["prediction"]
    not_served = tuple(name for name in spec["not_served"] if "." not in name)
    created = paid(chain_settings, 0, {"input": {"text": "fields"}}, **{"Cancel-After": "5m"})
    assert created.status_code == 201, created.content
    body = Client().get(f"/v1/predictions/{created.json()['id']}").json()
    assert_fields(body, spec, absent=not_served)
    assert body["status"] == "succeeded" and body["status"] in spec["status_enum"]
    assert body["source"] in spec["source_enum"] and body["data_removed"] is False
    assert body["deadline"] > body["created_at"]
    url_absent = {name.split(".", 1)[1] for name in spec["not_served"] if name.startswith("urls.")}
    assert set(spec["urls"]["required"]) - url_absent <= set(body["urls"])
    assert set(spec["metrics"]["properties"]) <= set(body["metrics"])
    assert 0 < body["metrics"]["predict_time"] <= body["metrics"]["total_time"]
    # By version, and without Cancel-After: no deadline (Replicate's is not nullable).
    by_version = paid(
        chain_settings, 0, {"version": demo_model.latest_version.id, "input": {"text": "v"}}, path="/v1/predictions"
    ).json()
    assert_fields(by_version, spec, absent=(*not_served, "deadline"))
    assert "deadline" not in by_version


def test_bazaar_extension_carries_the_models_input_schema(chain_settings, demo_model) -> None:
    """The discovery extension's schema holds the model's real input schema where the SDK's
    ``declare_discovery_extension`` puts its ``input_schema`` (``input.properties.body``); the
    SDK's own validators accept it, and an example that breaks the model's schema fails."""
    from x402.extensions.bazaar.facilitator import (
        validate_discovery_extension,
        validate_discovery_extension_spec,
    )
    from x402.extensions.bazaar.resource_service import declare_discovery_extension

    from payments.x402.codec import decode_header

    version = demo_model.latest_version
    challenge = Client().post(URL, data=json.dumps({"input": {"text": "x"}}), content_type="application/json")
    extension = decode_header(challenge["PAYMENT-REQUIRED"])["extensions"]["bazaar"]
    body = extension["schema"]["properties"]["input"]["properties"]["body"]
    assert body["properties"]["input"] == version.input_schema and body["required"] == ["input"]
    sdk = declare_discovery_extension(input={"input": {"text": "hello"}}, input_schema=body, body_type="json")
    assert sdk["bazaar"]["schema"]["properties"]["input"]["properties"]["body"] == body  # the same place
    assert validate_discovery_extension(extension).valid
    assert validate_discovery_extension_spec(extension).valid
    broken = json.loads(json.dumps(extension))
    broken["info"]["input"]["body"] = {"input": {"text": 42}}
    assert not validate_discovery_extension(broken).valid
    # The discovery listing carries the same extension.
    [item] = [i for i in Client().get("/discovery/resources").json()["items"] if i["resource"].endswith(URL)]
    assert item["extensions"]["bazaar"]["schema"] == extension["schema"]


def test_hardware_account_and_collections(chain_settings, demo_model, settings) -> None:
    from payments.models import HardwareTier
    from tests.siwx import siwx_header

    HardwareTier.objects.get_or_create(slug="cpu", defaults={"name": "CPU", "price_per_second": "0.0001"})
    HardwareTier.objects.create(slug="gpu-retired", name="Retired", price_per_second="0.0002", active=False)
    hardware = Client().get("/v1/hardware").json()
    active = HardwareTier.objects.filter(active=True)  # the seeded tiers, when the migration's rows remain
    assert hardware == [{"name": t.name, "sku": t.slug} for t in active]
    assert {"name": "CPU", "sku": "cpu"} in hardware and "gpu-retired" not in {h["sku"] for h in hardware}
    assert set(hardware[0]) == set(FIELDS["hardware"]["item_properties"])

    unproven = Client().get("/v1/account")
    assert unproven.status_code == 401 and "sign-in-with-x" in unproven.json()["extensions"]
    key = chain_settings.payers[0]["private_key"]
    proven = Client().get("/v1/account", headers={"SIGN-IN-WITH-X": siwx_header(key, "http://127.0.0.1:8000")})
    assert proven.json() == {
        "type": "user",
        "username": chain_settings.payers[0]["address"],
        "name": chain_settings.payers[0]["address"],
        "github_url": None,
    }
    settings.X402_OPERATOR_TOKENS = ["op-token"]
    operator = Client().get("/v1/account", headers={"Authorization": "Bearer op-token"}).json()
    assert operator["type"] == "organization" and operator["username"] == "operator"

    for path in ("/v1/collections", "/v1/collections/super-resolution"):
        response = Client().get(path)
        assert response.status_code == 404 and response["Content-Type"] == "application/problem+json"
        assert "GET /v1/models" in response.json()["detail"]


def test_a_run_past_its_cancel_after_deadline_is_canceled(chain_settings, demo_model) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from predictions import lifecycle
    from predictions.models import Prediction
    from predictions.tasks import enforce_cancel_after, sweep

    version = demo_model.latest_version
    soon = timezone.now() + timedelta(minutes=5)
    running = [
        Prediction.objects.create(model=demo_model, version=version, input={"text": str(i)}, cancel_after_at=soon)
        for i in range(2)
    ]
    for prediction in running:
        assert lifecycle.claim(prediction.id) is not None
    assert enforce_cancel_after(running[0].id) is False  # not yet
    Prediction.objects.filter(pk__in=[p.id for p in running]).update(cancel_after_at=timezone.now())
    assert enforce_cancel_after(running[0].id) is True  # the task scheduled at the deadline
    assert sweep()["canceled"] == 1  # the sweep catches a run whose task was lost
    for prediction in running:
        body = Client().get(f"/v1/predictions/{prediction.id}").json()
        assert body["status"] == "canceled" and body["error"] == lifecycle.DEADLINE_ERROR
        assert body["metrics"]["total_time"] >= 0


def test_data_is_removed_after_the_retention_period(chain_settings, demo_model, settings) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from predictions.models import Prediction
    from predictions.tasks import remove_expired_data

    settings.X402_DATA_RETENTION_DAYS = 2
    version = demo_model.latest_version
    now = timezone.now()

    def made(status: str, completed_days_ago: float | None) -> Prediction:
        completed = now - timedelta(days=completed_days_ago) if completed_days_ago is not None else None
        return Prediction.objects.create(
            model=demo_model,
            version=version,
            input={"text": "secret"},
            output="secret",
            logs="secret logs",
            status=status,
            completed_at=completed,
        )

    old, recent, unfinished = made("succeeded", 3), made("failed", 1), made("processing", None)
    assert remove_expired_data() == 1
    assert remove_expired_data() == 0  # once
    body = Client().get(f"/v1/predictions/{old.id}").json()
    assert body["data_removed"] is True and body["status"] == "succeeded"
    assert body["input"] == {} and body["output"] is None and body["logs"] == ""
    for kept in (recent, unfinished):
        body = Client().get(f"/v1/predictions/{kept.id}").json()
        assert body["data_removed"] is False and body["input"] == {"text": "secret"}
    settings.X402_DATA_RETENTION_DAYS = 0  # keep for ever
    Prediction.objects.filter(pk=recent.pk).update(completed_at=now - timedelta(days=365))
    assert remove_expired_data() == 0


def test_a_deadline_passed_after_payment_runs_rather_than_charging_for_nothing(
    chain_settings, demo_model, eager_celery, monkeypatch
) -> None:
    """Aborted means not charged (Replicate's meaning). A before_run prediction whose payment
    was already settled when its Cancel-After deadline passed cannot be un-charged: it runs."""
    import time

    from predictions import lifecycle
    from predictions.models import Prediction
    from predictions.tasks import run_prediction, sweep

    monkeypatch.setattr("predictions.scheduling.enqueue_run", lambda prediction: None)  # settle, do not run yet
    created = paid(chain_settings, 1, {"input": {"text": "late but paid"}}, **{"Cancel-After": "500ms"})
    assert created.status_code == 201, created.content
    prediction = Prediction.objects.get(pk=created.json()["id"])
    assert prediction.payment.status == "confirmed" and prediction.status == "starting"
    time.sleep(0.6)
    assert sweep()["aborted"] == 0  # the sweep does not abort a charged prediction
    run_prediction(prediction.id)
    body = Client().get(f"/v1/predictions/{prediction.id}").json()
    assert body["status"] == "succeeded" and body["output"] == "late but paid" and "deadline" not in body
    started = prediction.events.get(to_status="processing")
    assert started.detail == {"cancel_after": lifecycle.DEADLINE_WAIVED}
