"""Operators register real models in the admin (from a Cog server's /openapi.json), edit their
runner, schemas and price with the exact 402 shown, change prices in bulk, and see predictions.

The last test drives the admin in headless Chromium (Debian's package, through npm
playwright-core) against the live server and the real Cog server."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import threading
from decimal import Decimal as D
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from django.test import Client

from payments.models import HardwareTier, PriceChange
from payments.x402.codec import decode_header
from predictions.models import Model, ModelVersion, Prediction, PredictionEvent
from tests.conftest import free_port

pytestmark = [pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parent.parent
ADD = "/admin/predictions/model/add-from-cog/"


class FakeCog:
    """An HTTP server answering GET /openapi.json with ``document`` (a dict, or raw text)."""

    def __init__(self, document: object) -> None:
        body = (document if isinstance(document, str) else json.dumps(document)).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200 if self.path == "/openapi.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def registration(url: str, **changes: str) -> dict:
    return {
        "cog_url": url,
        "owner": "acme",
        "name": "shout",
        "description": "",
        "hardware": "",
        "pricing_mode": "flat",
        "price": "0.02",
        "expected_seconds": "1",
        "settlement_policy": "before_run",
        **changes,
    }


def errors_in(response) -> list[str]:
    """The form errors an admin page shows."""
    found = re.findall(rb'<ul class="errorlist[^"]*"[^>]*>(.*?)</ul>', response.content, re.S)
    return [html.unescape(re.sub(rb"<[^>]+>", b" ", item).decode()).strip() for item in found]


def preview_on(page: bytes) -> dict:
    match = re.search(rb'<pre id="preview-v2"[^>]*>(.*?)</pre>', page, re.S)
    assert match, "no 402 preview on the page"
    return json.loads(html.unescape(match.group(1).decode()))


def real_402(model: Model, body: dict) -> dict:
    response = Client().post(f"/v1/models/{model}/predictions", data=body, content_type="application/json")
    assert response.status_code == 402
    return decode_header(response["PAYMENT-REQUIRED"])


def test_an_operator_registers_a_model_from_its_cog_server(chain_settings, staff, cog_server) -> None:
    operator = staff["operator"]
    assert operator.get(ADD).status_code == 200
    read = operator.post(ADD, registration(cog_server["url"], read="1"))
    assert read.status_code == 200 and b'id="input-schema"' in read.content
    assert b"Text to shout" in read.content and not Model.objects.exists()  # shown, not yet created

    created = operator.post(ADD, registration(cog_server["url"] + "/", create="1"))
    assert created.status_code == 302, created.content[:3000]
    model = Model.objects.get(owner="acme", name="shout")
    version = model.latest_version
    assert (version.runner, version.cog_url) == ("cog", cog_server["url"])
    assert version.input_schema["required"] == ["text"]
    assert version.input_schema["properties"]["seconds"]["default"] == 0.0
    assert version.output_schema == {"title": "Output", "type": "string"}
    assert created["Location"] == f"/admin/predictions/model/{model.pk}/change/"
    # It is on sale: the next request gets its 402, and its page shows that exact 402.
    page = operator.get(created["Location"])
    assert page.status_code == 200
    assert preview_on(page.content) == real_402(model, {"input": {"text": "hello"}})
    assert real_402(model, {"input": {"text": "x"}})["accepts"][0]["amount"] == "20000"


@pytest.mark.parametrize(
    "document, reason",
    [
        (None, b"cannot reach"),
        ("not json at all", b"has no components.schemas.Input"),
        ({"components": {"schemas": {}}}, b"has no components.schemas.Input"),
        ({"components": {"schemas": {"Input": {"type": "string"}}}}, b"Input must be an object schema"),
        ({"components": {"schemas": {"Input": {"type": 7}}}}, b"not a valid JSON Schema"),
        ({"components": {"schemas": {"Input": {"$ref": "#/components/schemas/Gone"}}}}, b"unresolvable"),
    ],
)
def test_an_unreachable_server_or_a_bad_schema_is_a_form_error(
    chain_settings, staff, document, reason
) -> None:
    url = f"http://127.0.0.1:{free_port()}" if document is None else FakeCog(document).url
    response = staff["operator"].post(ADD, registration(url, create="1"))
    assert response.status_code == 200 and reason in response.content, response.content[:3000]
    assert b"errorlist" in response.content and not Model.objects.exists()
    assert staff["operator"].post(ADD, registration("ftp://x", read="1")).status_code == 200


def test_enums_referenced_by_cog_are_inlined(chain_settings, staff) -> None:
    fake = FakeCog(
        {
            "components": {
                "schemas": {
                    "Input": {
                        "type": "object",
                        "properties": {
                            "size": {"allOf": [{"$ref": "#/components/schemas/size"}], "default": "s"}
                        },
                    },
                    "size": {"title": "size", "enum": ["s", "m"], "type": "string"},
                    "Output": {"type": "array", "items": {"type": "string"}},
                }
            }
        }
    )
    assert staff["operator"].post(ADD, registration(fake.url, create="1")).status_code == 302
    schema = Model.objects.get().latest_version.input_schema
    assert schema["properties"]["size"] == {
        "allOf": [{"title": "size", "enum": ["s", "m"], "type": "string"}],
        "default": "s",
    }


def _change_form(model: Model, version: ModelVersion, **changes: str) -> dict:
    data = {
        "owner": model.owner,
        "name": model.name,
        "description": model.description,
        "hardware": model.hardware_id or "",
        "settlement_policy": model.settlement_policy,
        "is_free": "",
        "pricing_mode": model.pricing_mode,
        "price": str(model.price),
        "expected_seconds": str(model.expected_seconds),
        "minimum_price": str(model.minimum_price),
        "markup_percent": str(model.markup_percent),
        "unit_field": model.unit_field,
        "unit_price": str(model.unit_price),
        "upto_order": model.upto_order,
        "upto_failure_charge": model.upto_failure_charge,
        "versions-TOTAL_FORMS": "1",
        "versions-INITIAL_FORMS": "1",
        "versions-0-id": version.id,
        "versions-0-model": str(model.pk),
        "versions-0-runner": version.runner,
        "versions-0-predictor": version.predictor,
        "versions-0-cog_url": version.cog_url,
        "versions-0-input_schema": json.dumps(version.input_schema),
        "versions-0-output_schema": json.dumps(version.output_schema),
        "price_changes-TOTAL_FORMS": "0",
        "price_changes-INITIAL_FORMS": "0",
        "_continue": "1",
    }
    data.update(changes)
    return data


def test_runner_schemas_and_policy_are_edited_with_validation(
    chain_settings, demo_model, staff, cog_server
) -> None:
    operator, version = staff["operator"], demo_model.latest_version
    url = f"/admin/predictions/model/{demo_model.pk}/change/"
    page = operator.get(url)
    for field in (
        b"versions-0-runner",
        b"versions-0-cog_url",
        b"versions-0-input_schema",
        b"settlement_policy",
    ):
        assert field in page.content
    for changes, error in [
        (
            {"versions-0-runner": "cog", "versions-0-cog_url": f"http://127.0.0.1:{free_port()}"},
            b"cannot reach",
        ),
        ({"versions-0-runner": "cog", "versions-0-cog_url": "not a url"}, b"http(s) URL"),
        ({"versions-0-predictor": "no.such.Predictor"}, b"Cannot import"),
        ({"versions-0-input_schema": '{"type": 5}'}, b"Not a valid JSON Schema"),
        ({"versions-0-input_schema": "{not json"}, b"Enter a valid JSON"),
        ({"versions-0-runner": "warp-drive"}, b"Select a valid choice"),
    ]:
        response = operator.post(url, _change_form(demo_model, version, **changes))
        assert response.status_code == 200 and error in response.content, (changes, errors_in(response))
    version.refresh_from_db()
    assert version.runner == "python"
    # A valid change: to the real Cog server, after_success.
    response = operator.post(
        url,
        _change_form(
            demo_model,
            version,
            settlement_policy="after_success",
            **{"versions-0-runner": "cog", "versions-0-cog_url": cog_server["url"]},
        ),
    )
    assert response.status_code == 302, response.content[:3000]
    version.refresh_from_db()
    demo_model.refresh_from_db()
    assert (version.runner, version.cog_url, demo_model.settlement_policy) == (
        "cog",
        cog_server["url"],
        "after_success",
    )


def test_the_change_form_shows_the_exact_402_of_the_next_request(chain_settings, demo_model, staff) -> None:
    version = demo_model.latest_version
    url = f"/admin/predictions/model/{demo_model.pk}/change/"
    saved = staff["operator"].post(url, _change_form(demo_model, version, price="0.37"))
    assert saved.status_code == 302, saved.content[:3000]
    shown = preview_on(staff["operator"].get(url).content)
    real = real_402(demo_model, {"input": {"text": "hello"}})
    assert shown == real
    assert shown["accepts"][0]["amount"] == "370000"
    assert {"bazaar", "payment-identifier"} <= set(shown["extensions"])
    page = staff["operator"].get(url).content
    v1 = json.loads(
        html.unescape(re.search(rb'<pre id="preview-v1"[^>]*>(.*?)</pre>', page, re.S).group(1).decode())
    )
    assert v1["accepts"][0]["outputSchema"]["output"] == version.output_schema


def test_bulk_price_changes_are_audited(chain_settings, demo_model, staff) -> None:
    tier = HardwareTier.objects.create(slug="gpu-bulk", name="GPU", price_per_second=D("0.001"))
    flat_b = Model.objects.create(
        owner="demo", name="b", price=D("0.10"), unit_field="n", unit_price=D("0.01")
    )
    per_second = Model.objects.create(
        owner="demo", name="c", pricing_mode="per_second", hardware=tier, expected_seconds=D(10)
    )
    changelist = "/admin/predictions/model/"
    selected = [str(m.pk) for m in (demo_model, flat_b, per_second)]

    def act(operation: str, amount: str, apply: bool = True):
        data = {
            "action": "change_prices",
            "_selected_action": selected,
            "operation": operation,
            "amount": amount,
        }
        if apply:
            data["apply"] = "1"
        return staff["operator"].post(changelist, data, follow=True)

    asked = act("set", "0", apply=False)
    assert asked.status_code == 200 and b"Change prices" in asked.content and b"demo/c" in asked.content
    assert b"less than 100%" in act("lower", "100").content

    raised = act("raise", "10")
    assert raised.status_code == 200 and b"Prices changed" in raised.content
    demo_model.refresh_from_db()
    flat_b.refresh_from_db()
    per_second.refresh_from_db()
    assert (demo_model.price, flat_b.price, flat_b.unit_price) == (D("0.011"), D("0.11"), D("0.011"))
    assert per_second.markup_percent == D("10") and per_second.price_per_run == D("0.011")
    assert PriceChange.objects.count() == 3
    assert set(PriceChange.objects.values_list("changed_by__username", flat=True)) == {"olga"}

    lowered = act("lower", "50")
    assert b"too little markup" in lowered.content  # demo/c: 10% markup cannot carry -50%
    demo_model.refresh_from_db()
    assert demo_model.price == D("0.0055")

    set_ = act("set", "0.25")
    assert b"priced per second" in set_.content
    assert real_402(demo_model, {"input": {"text": "x"}})["accepts"][0]["amount"] == "250000"
    assert PriceChange.objects.count() == 3 + 2 + 2
    assert (
        staff["finance"]
        .post(changelist, {"action": "change_prices", "_selected_action": selected})
        .status_code
        == 403
    )


def test_operators_see_predictions_and_cancel_through_the_lifecycle(
    chain_settings, demo_model, staff
) -> None:
    from predictions import lifecycle
    from predictions.runners import Outcome

    version = demo_model.latest_version
    failed = lifecycle.create(version, {"text": "boom"}, payment=None, settlement_policy="before_run")
    lifecycle.claim(failed.pk)
    lifecycle.finish(
        failed.pk, Outcome(succeeded=False, error="RuntimeError: boom"), cause=lifecycle.Cause.TASK
    )
    waiting = lifecycle.create(version, {"text": "wait"}, payment=None, settlement_policy="before_run")

    operator = staff["operator"]
    listing = operator.get("/admin/predictions/prediction/?status__exact=failed")
    assert listing.status_code == 200 and failed.pk.encode() in listing.content
    assert waiting.pk.encode() not in listing.content
    detail = operator.get(f"/admin/predictions/prediction/{failed.pk}/change/")
    assert (
        detail.status_code == 200
        and b"RuntimeError: boom" in detail.content
        and b"processing" in detail.content
    )
    assert staff["finance"].get("/admin/predictions/prediction/").status_code == 403

    canceled = operator.post(
        "/admin/predictions/prediction/",
        {"action": "cancel_predictions", "_selected_action": [waiting.pk, failed.pk]},
        follow=True,
    )
    assert b"1 canceled" in canceled.content
    assert Prediction.objects.get(pk=waiting.pk).status == "canceled"
    assert Prediction.objects.get(pk=failed.pk).status == "failed"
    event = PredictionEvent.objects.filter(prediction_id=waiting.pk).last()
    assert (event.to_status, event.cause, event.detail["user"]) == ("canceled", "admin", "olga")


@pytest.mark.e2e
def test_in_a_browser_an_operator_registers_a_cog_model_and_reprices_it(
    chain_settings, staff, cog_server, live_server, tmp_path
) -> None:
    """Headless Chromium drives the admin; then the next 402 asks the new price."""
    assert Path("/usr/bin/chromium").exists(), "Debian's chromium is missing: run `make tools`"
    shots = os.environ.get("ADMIN_SCREENSHOTS_DIR") or str(tmp_path)
    command = [
        shutil.which("node") or "node",
        str(ROOT / "tests" / "browser" / "register_model.mjs"),
        "--base-url",
        live_server.url,
        "--user",
        "olga",
        "--password",
        "pw",
        "--cog-url",
        cog_server["url"],
        "--owner",
        "acme",
        "--name",
        "shout",
        "--price",
        "0.02",
        "--new-price",
        "0.05",
        "--screenshots",
        shots,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["input_schema"]["required"] == ["text"] and report["output_schema"]["type"] == "string"
    model = Model.objects.get(owner="acme", name="shout")
    assert report["created_url"].endswith(f"/admin/predictions/model/{model.pk}/change/")
    assert (model.price, model.settlement_policy, model.latest_version.cog_url) == (
        D("0.05"),
        "after_success",
        cog_server["url"],
    )
    assert report["preview_before"]["accepts"][0]["amount"] == "20000"
    change = PriceChange.objects.get(model=model)
    assert (change.old_price, change.new_price, change.changed_by.username) == (D("0.02"), D("0.05"), "olga")
    # The next request asks the new price, in exactly the 402 the page showed.
    response = requests.post(
        f"{live_server.url}/v1/models/acme/shout/predictions", json={"input": {"text": "hello"}}, timeout=10
    )
    assert response.status_code == 402
    assert decode_header(response.headers["PAYMENT-REQUIRED"]) == report["preview_after"]
    assert report["preview_after"]["accepts"][0]["amount"] == "50000"
    assert {"admin-register-cog.png", "admin-preview.png", "admin-prices.png"} <= set(os.listdir(shots))


def test_the_plain_add_form_validates_a_new_model(chain_settings, staff) -> None:
    """A model not saved yet has no versions to price: its form is validated, not a 500."""
    data = {**_change_form(Model(owner="acme", name="plain"), ModelVersion()), "versions-TOTAL_FORMS": "0"}
    data.update({"versions-INITIAL_FORMS": "0", "price": "0"})
    refused = staff["operator"].post("/admin/predictions/model/add/", data)
    assert refused.status_code == 200 and "A paid model must cost more than 0" in " ".join(errors_in(refused))
    assert (
        staff["operator"].post("/admin/predictions/model/add/", {**data, "price": "0.03"}).status_code == 302
    )
    assert Model.objects.get(name="plain").price_per_run == D("0.03")
