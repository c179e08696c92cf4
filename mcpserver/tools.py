"""The MCP tools: one per model, paid per call with x402, and free tools to read the catalogue
and a prediction.

A paid call follows the x402 MCP convention (``x402.mcp``): the payment payload travels in the
call's ``_meta["x402/payment"]``; without it, or when it is refused, the result is an error whose
``structuredContent`` is the x402 v2 PaymentRequired object, and a paid result carries the
settlement in its ``_meta["x402/payment-response"]``. The payment goes through the same gate as
the REST API (``payments.permissions.admit``, hence
``payments.verification.verify``), the same write path (``predictions.services.create_prediction``),
ledger and settlement: a tool call is one more way to reach them, not another copy.

Everything here is synchronous Django code; ``mcpserver.server`` calls it from the MCP SDK's
handlers in the request's thread.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from django import db
from django.db.models import Q
from django.http import HttpRequest
from mcp import types
from rest_framework.exceptions import APIException, NotFound

from payments.channels.gate import ChannelPayment
from payments.exceptions import PaymentRequired, count_refusal
from payments.ledger import settlement_answer
from payments.permissions import admit
from predictions.models import Model, ModelVersion, Prediction, PredictionStatus
from predictions.serializers import base_url, model_json, prediction_json
from predictions.services import (
    channel_answer,
    charge_for,
    check_runner,
    create_prediction,
    replayed,
    validate_input,
    wait_until_done,
)
from x402site.conf import x402
from x402site.exceptions import DatabaseUnavailable, api_exception_handler

log = logging.getLogger("mcpserver")

#: The x402 MCP convention's ``_meta`` keys (as ``x402.mcp.constants`` names them; the x402 SDK
#: itself is a development dependency, never imported by the service).
MCP_PAYMENT_META_KEY = "x402/payment"
MCP_PAYMENT_RESPONSE_META_KEY = "x402/payment-response"
LIST_MODELS = "list_models"
GET_PREDICTION = "get_prediction"
#: Between owner and name in a model's tool name (MCP tool names allow no "/").
SEPARATOR = "__"
#: What an unpaid call is told (it ends like the REST challenge's, so it counts as a challenge).
PAYMENT_MISSING = f"_meta {MCP_PAYMENT_META_KEY} is required"


def tool_name(model: Model) -> str:
    return f"{model.owner}{SEPARATOR}{model.name}"


def resource_url(name: str) -> str:
    """The x402 resource a tool's payment is for (the SDK's convention for MCP tools)."""
    return f"mcp://tool/{name}"


def model_of(name: str) -> Model | None:
    """The model a tool name stands for (owner and name may themselves contain the separator)."""
    splits = Q(pk__in=[])
    at = name.find(SEPARATOR)
    while at > 0:
        splits |= Q(owner=name[:at], name=name[at + len(SEPARATOR) :])
        at = name.find(SEPARATOR, at + 1)
    return Model.objects.select_related("hardware").filter(splits).first()


def _price_text(model: Model) -> str:
    rule = model.pricing_rule()
    if rule.is_free:
        return "Free: no payment needed."
    text = f"Price: {model.price_per_run.normalize():f} USDC per run"
    if rule.unit_field:
        text += f" with the default input (+{rule.unit_price.normalize():f} USDC per unit of `{rule.unit_field}`)"
    return (
        text + ", paid with x402: an EIP-3009 USDC authorization in the call's "
        f"_meta['{MCP_PAYMENT_META_KEY}']; a call without it returns the payment requirements."
    )


def _input_schema(version: ModelVersion) -> dict[str, Any]:
    schema = dict(version.input_schema or {})
    schema.setdefault("type", "object")
    return schema


def catalogue() -> list[types.Tool]:
    """Every tool: the free ones, then one per model with a version."""
    tools = [
        types.Tool(
            name=LIST_MODELS,
            description="The models on this server, with their tool names, input schemas and prices. Free.",
            inputSchema={"type": "object", "properties": {}},
            annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=False),
        ),
        types.Tool(
            name=GET_PREDICTION,
            description="A prediction by its id (status, output, payment). Free.",
            inputSchema={
                "type": "object",
                "properties": {"id": {"type": "string", "description": "the prediction's id"}},
                "required": ["id"],
            },
            annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=False),
        ),
    ]
    for model in Model.objects.select_related("hardware"):
        version = model.latest_version
        if version is None:
            continue
        summary = f"Run {model}" + (f": {model.description}" if model.description else ".")
        tools.append(
            types.Tool(
                name=tool_name(model),
                title=str(model),
                description=f"{summary}\n{_price_text(model)}",
                inputSchema=_input_schema(version),
                annotations=types.ToolAnnotations(readOnlyHint=False, idempotentHint=False),
            )
        )
    return tools


def call(name: str, arguments: dict[str, Any], payment: Any, request: HttpRequest) -> types.CallToolResult:
    """Run one tool call; never raises for a caller's mistake (it becomes an error result)."""
    try:
        if name == LIST_MODELS:
            return _structured(_list_models(request))
        if name == GET_PREDICTION:
            return _structured(_get_prediction(arguments, request))
        model = model_of(name)
        if model is None:
            raise NotFound(f"No tool named {name!r}: call {LIST_MODELS} to see the models.")
        return _run_model(model, arguments, payment, request)
    except PaymentRequired as exc:
        return payment_required_result(exc)
    except APIException as exc:
        return error_result(exc)
    except (db.OperationalError, db.InterfaceError) as exc:
        log.error("database unavailable during MCP tool %s: %s", name, exc)
        return error_result(DatabaseUnavailable())
    except Exception:
        # The SDK would put the exception's text in the result: log it here, tell the caller nothing.
        log.exception("MCP tool %s failed", name)
        return error_result(APIException())


def _list_models(request: HttpRequest) -> dict[str, Any]:
    models = []
    for model in Model.objects.select_related("hardware"):
        if model.latest_version is not None:
            models.append({"tool": tool_name(model), **model_json(model, request)})
    return {"models": models}


def _get_prediction(arguments: dict[str, Any], request: HttpRequest) -> dict[str, Any]:
    prediction_id = arguments.get("id")
    prediction = (
        Prediction.objects.select_related("payment", "model").filter(pk=prediction_id).first()
        if isinstance(prediction_id, str)
        else None
    )
    if prediction is None:
        raise NotFound("No prediction with this id.")
    return prediction_json(prediction, base_url(request))


def _run_model(model: Model, arguments: dict[str, Any], payment: Any, request: HttpRequest) -> types.CallToolResult:
    """The REST create (``PaidPredictionCreate``) as a tool call: validate, price, take the
    payment through the gate, create, then wait (bounded) for the output."""
    version = model.latest_version
    if version is None:
        raise NotFound(f"Model {model} has no version.")
    inputs = validate_input(version, {"input": arguments})
    check_runner(version)
    url = resource_url(tool_name(model))
    charge = charge_for(version, inputs, url, url)
    # As over REST: free models, and operators (a bearer token from X402_OPERATOR_TOKENS), run unpaid.
    header = None if payment is None else _as_header(payment)
    admission = admit(charge, header, request, path=urlsplit(url).path, missing=PAYMENT_MISSING)
    if admission.replay_of is not None:
        return prediction_result(replayed(admission.replay_of, charge), request)
    prediction, _ = create_prediction(
        version,
        inputs,
        paid=admission.verification,
        charge=charge,
        challenge=admission.challenge,
        channel=admission.channel,
    )
    log.info("mcp tool %s created prediction %s", tool_name(model), prediction.id)
    done = wait_until_done(prediction, min(x402.http.mcp_wait_seconds, model.time_limit_seconds))
    return prediction_result(done, request, admission.channel)


def _as_header(payment: Any) -> str:
    """The ``_meta`` payment (a JSON object, or its text) as the gate takes it: base64 JSON,
    so it meets the same size, depth and type checks as a ``PAYMENT-SIGNATURE`` header."""
    try:
        text = payment if isinstance(payment, str) else json.dumps(payment, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        text = "null"  # not a JSON object: the gate refuses it as an invalid payload
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def prediction_result(
    prediction: Prediction, request: HttpRequest, channel: ChannelPayment | None = None
) -> types.CallToolResult:
    """The prediction's output as the tool's result, its Replicate object as structured content,
    and the settlement in ``_meta`` as x402 clients read it (for a voucher, ``channel``: the
    charge and the channel after it)."""
    body = prediction_json(prediction, base_url(request))
    if prediction.status == PredictionStatus.SUCCEEDED:
        output = body["output"]
        text = output if isinstance(output, str) else json.dumps(output)
    elif prediction.is_terminal:
        text = f"Prediction {prediction.id} {prediction.status}: {prediction.error or 'no output'}"
    else:
        text = (
            f"Prediction {prediction.id} is {prediction.status}; read it later with "
            f"{GET_PREDICTION}(id={prediction.id!r})."
        )
    meta = None
    if prediction.payment is not None:
        meta = {MCP_PAYMENT_RESPONSE_META_KEY: settlement_answer(prediction.payment)}
    elif prediction.channel_id is not None:
        meta = {MCP_PAYMENT_RESPONSE_META_KEY: channel_answer(prediction, channel)}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structuredContent=body,
        isError=prediction.status in (PredictionStatus.FAILED, PredictionStatus.CANCELED),
        _meta=meta,
    )


def payment_required_result(exc: PaymentRequired) -> types.CallToolResult:
    """The x402 MCP payment-required result: the same PaymentRequired object as the REST 402's
    ``PAYMENT-REQUIRED`` header, as structured content and as text."""
    count_refusal(exc)
    body = exc.challenge.payment_required(exc.error)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(body))],
        structuredContent=body,
        isError=True,
    )


def error_result(exc: APIException) -> types.CallToolResult:
    """Any other refusal, in the API's problem-details shape (``invalid_fields`` for bad input)."""
    response = api_exception_handler(exc, {})
    body = response.data if response is not None else {"title": "Error", "detail": str(exc)}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(body))],
        structuredContent=body,
        isError=True,
    )


def _structured(body: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(body))], structuredContent=body
    )
