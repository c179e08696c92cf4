"""The Cog runner: a Cog model server's HTTP API.

``PUT /predictions/{our id}`` with ``Prefer: respond-async`` starts a run idempotently; Cog
reports progress only through the callback we give it (it offers no polling). ``GET
/health-check`` is asked before a payment is taken, ``POST /predictions/{id}/cancel`` stops a
run, and ``GET /openapi.json`` gives the model's input and output schemas (admin registration).

A run is started once: when the PUT's answer is lost (a read timeout, a dropped connection, a
gateway error) Cog may have started it, so it is not sent again; the outcome is accepted
whenever Cog's callback brings it. Only a refusal that proves nothing started (connection
refused, 409 busy, 503 not ready) is retried. The run clock starts when Cog accepts the PUT
(2xx) or, after a lost or 5xx answer, when its first report arrives; a run Cog never confirms
is ended on our side at ``X402_RUN_START_TIMEOUT`` (``lifecycle.fail_unstarted``). Each report
is a sign of life; at the time limit the watchdog also asks Cog's health (BUSY: alive).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import jsonschema
import requests
import urllib3
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils.crypto import salted_hmac

from x402site.conf import x402

from . import Outcome, RunnerBusy, RunnerRefused, register

if TYPE_CHECKING:
    from ..models import ModelVersion, Prediction

log = logging.getLogger("predictions.runners.cog")

CONNECT_TIMEOUT = 3.0
#: Health answers are reused this long (the check sits on the paid-request path).
HEALTH_TTL = 2.0
_health: dict[str, tuple[float, str]] = {}
#: Cog's words for a finished run.
COG_SUCCEEDED = "succeeded"
COG_TERMINAL = (COG_SUCCEEDED, "failed", "canceled")


class SchemaError(ValueError):
    """A Cog server's /openapi.json could not be read or holds no usable Input schema."""


def health(base_url: str) -> str:
    """Cog's status: READY, BUSY, STARTING, SETUP_FAILED, DEFUNCT, UNHEALTHY or UNREACHABLE."""
    cached = _health.get(base_url)
    if cached and time.monotonic() - cached[0] < HEALTH_TTL:
        return cached[1]
    try:
        status = requests.get(f"{base_url}/health-check", timeout=3).json().get("status", "UNHEALTHY")
    except (requests.RequestException, ValueError):
        status = "UNREACHABLE"
    _health[base_url] = (time.monotonic(), status)
    return status


def callback_token(prediction_id: str) -> str:
    """The secret part of a run's callback URL: a keyed derivation of SECRET_KEY for this one
    purpose, so it reveals nothing of the key or of any other secret derived from it."""
    return salted_hmac("predictions.runners.cog.callback", prediction_id, algorithm="sha256").hexdigest()


def callback_url(prediction_id: str) -> str:
    path = reverse("cog-webhook", args=[prediction_id, callback_token(prediction_id)])
    return x402.http.public_url + path


def _inline_refs(node: Any, components: dict[str, Any], depth: int = 0) -> Any:
    """Replace ``{"$ref": "#/components/schemas/X"}`` by X (Cog puts enums there), so the
    schema stands alone."""
    if depth > 20:
        raise SchemaError("the schema's references nest too deeply")
    if isinstance(node, list):
        return [_inline_refs(item, components, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.removeprefix("#/components/schemas/")
        if name == ref or name not in components:
            raise SchemaError(f"unresolvable reference {ref!r}")
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return {**_inline_refs(components[name], components, depth + 1), **rest}
    return {key: _inline_refs(value, components, depth + 1) for key, value in node.items()}


def read_schemas(base_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (input, output) JSON Schemas a Cog server declares in its ``/openapi.json``
    (``components.schemas.Input`` and ``.Output``), references inlined."""
    try:
        response = requests.get(f"{base_url.rstrip('/')}/openapi.json", timeout=(CONNECT_TIMEOUT, 10))
    except requests.RequestException as exc:
        raise SchemaError(f"cannot reach {base_url}: {exc.__class__.__name__}") from None
    if response.status_code != 200:
        raise SchemaError(
            f"{base_url}/openapi.json answered HTTP {response.status_code}: {response.text[:200]}"
        )
    try:
        document = response.json()
        components = document["components"]["schemas"]
        raw_input, raw_output = components["Input"], components.get("Output", {})
    except (ValueError, KeyError, TypeError):
        raise SchemaError(f"{base_url}/openapi.json has no components.schemas.Input") from None
    if (
        not isinstance(components, dict)
        or not isinstance(raw_input, dict)
        or not isinstance(raw_output, dict)
    ):
        raise SchemaError("components.schemas.Input and Output must be objects")
    input_schema = _inline_refs(raw_input, components)
    output_schema = _inline_refs(raw_output, components)
    for name, schema in (("Input", input_schema), ("Output", output_schema)):
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise SchemaError(f"{name} is not a valid JSON Schema: {exc.message}") from None
    if input_schema.get("type") != "object":
        raise SchemaError("Input must be an object schema")
    return input_schema, output_schema


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request provably never reached the server (no connection was made)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _streams(prediction_id: str) -> bool:
    """The run's model declares an iterator output (Cog's ``x-cog-array-type: iterator``): only
    then is a progress report's output a list of pieces so far (Cog also reports a plain
    output as a one-item list before it ends)."""
    from ..models import ModelVersion

    schema = ModelVersion.objects.filter(predictions__pk=prediction_id).values_list("output_schema", flat=True).first()
    return isinstance(schema, dict) and schema.get("type") == "array" and schema.get("x-cog-array-type") == "iterator"


class CogRunner:
    kind = "cog"
    label = "Cog model server (HTTP)"

    def validate(self, version: ModelVersion) -> None:
        if not version.cog_url:
            raise ValidationError({"cog_url": "A cog runner needs the base URL of its Cog server."})
        try:
            read_schemas(version.cog_url)
        except SchemaError as exc:
            raise ValidationError({"cog_url": str(exc)}) from None

    def health(self, version: ModelVersion) -> str:
        return health(version.cog_url)

    def task_options(self, prediction: Prediction) -> dict[str, Any]:
        return {}  # the task only sends the PUT; the watchdog enforces the run's time limit

    def start(self, prediction: Prediction) -> None:
        base_url = prediction.version.cog_url
        try:
            response = requests.put(
                f"{base_url}/predictions/{prediction.id}",
                json={
                    "input": prediction.input,
                    "webhook": callback_url(prediction.id),
                    "webhook_events_filter": ["start", "output", "logs", "completed"],
                },
                headers={"Prefer": "respond-async"},
                timeout=(CONNECT_TIMEOUT, x402.runs.cog_timeout_seconds),
            )
        except requests.RequestException as exc:
            if _never_sent(exc):
                raise RunnerBusy(f"Cog server unreachable: {exc.__class__.__name__}") from None
            log.warning("PUT of %s to Cog: no answer (%s); waiting for its callback", prediction.id, exc)
            return None
        status = response.status_code
        if status in (409, 503):
            raise RunnerBusy("every Cog slot is busy" if status == 409 else "the Cog server is not ready")
        if 400 <= status < 500:
            raise RunnerRefused(f"Cog refused the input (HTTP {status}): {response.text[:500]}")
        if status >= 500:
            log.warning("PUT of %s to Cog: HTTP %s; waiting for its callback", prediction.id, status)
            return None
        self._started(prediction.id)
        return None

    def _started(self, prediction_id: str) -> None:
        """Cog has the run: its clock starts; a run that ended meanwhile is canceled on Cog."""
        from .. import lifecycle
        from ..models import Prediction

        if lifecycle.run_started(prediction_id) is None:
            ended = Prediction.objects.select_related("version").filter(pk=prediction_id).first()
            if ended is not None:
                self.cancel(ended)

    def ready(self, version: ModelVersion) -> bool:
        return False  # the Cog server takes the run over HTTP and confirms it there

    def alive(self, prediction: Prediction) -> bool:
        """Cog runs one prediction at a time per slot: BUSY while ours goes on."""
        _health.pop(prediction.version.cog_url, None)
        return health(prediction.version.cog_url) == "BUSY"

    def cancel(self, prediction: Prediction) -> None:
        # If this fails the run ends on its own; our prediction has already ended.
        with contextlib.suppress(requests.RequestException):
            requests.post(
                f"{prediction.version.cog_url}/predictions/{prediction.id}/cancel",
                timeout=(CONNECT_TIMEOUT, x402.runs.cog_timeout_seconds),
            )

    def handle_callback(self, prediction_id: str, body: dict[str, Any]) -> None:
        from .. import lifecycle

        state = body.get("status")
        logs = body.get("logs") if isinstance(body.get("logs"), str) else None
        if state in COG_TERMINAL:
            metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
            predict_time = metrics.get("predict_time")
            succeeded = state == COG_SUCCEEDED
            outcome = Outcome(
                succeeded=succeeded,
                output=body.get("output") if succeeded else None,
                error="" if succeeded else str(body.get("error") or f"Cog reported {state}"),
                logs=logs,
                predict_time=float(predict_time) if isinstance(predict_time, (int, float)) else None,
            )
            lifecycle.finish(prediction_id, outcome, cause=lifecycle.Cause.CALLBACK)
        else:  # progress (a sign of life): the logs so far, a streaming model's output pieces so far
            self._started(prediction_id)  # the PUT's answer may have been lost: Cog has the run
            lifecycle.record_alive(prediction_id)
            if logs is not None:
                lifecycle.record_logs(prediction_id, logs, cause=lifecycle.Cause.CALLBACK)
            if isinstance(body.get("output"), list) and _streams(prediction_id):
                lifecycle.record_output(prediction_id, body["output"], cause=lifecycle.Cause.CALLBACK)


register(CogRunner())
