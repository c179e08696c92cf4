"""OpenAPI descriptions of the API (drf-spectacular), including the 402 challenge."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers

from payments.models import PaymentStatus
from payments.schemes import SCHEMES

from .models import PredictionStatus

PAYMENT = {
    "type": "object",
    "nullable": True,
    "description": "The x402 payment that bought this prediction (added by this server).",
    "properties": {
        "id": {"type": "string"},
        "scheme": {"type": "string", "enum": list(SCHEMES)},
        "status": {
            "type": "string",
            "enum": PaymentStatus.values,
        },
        "amount": {
            "type": "string",
            "description": "USDC, decimal (upto: the maximum until the run is measured, then the charge)",
        },
        "amount_atomic": {"type": "string"},
        "charged": {
            "type": "string",
            "description": "USDC, decimal: what moved or is moving on chain (settling, settled, confirmed); "
            "0 when nothing was charged (released, failed, expired) or not yet",
        },
        "charged_atomic": {"type": "string"},
        "network": {"type": "string", "example": "eip155:8453"},
        "asset": {"type": "string"},
        "payer": {"type": "string"},
        "pay_to": {"type": "string"},
        "transaction": {"type": "string", "nullable": True},
        "confirmations": {"type": "integer"},
        "maximum": {"type": "string", "description": "upto: the signed maximum, USDC"},
        "maximum_atomic": {"type": "string"},
        "run_seconds": {"type": "string", "nullable": True, "description": "upto: the seconds charged for"},
    },
}
PREDICTION = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "model": {"type": "string"},
        "version": {"type": "string"},
        "status": {"type": "string", "enum": PredictionStatus.values},
        "input": {"type": "object"},
        "output": {"nullable": True},
        "error": {"type": "string", "nullable": True},
        "logs": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": "string", "format": "date-time", "nullable": True},
        "completed_at": {"type": "string", "format": "date-time", "nullable": True},
        "urls": {"type": "object", "properties": {"get": {"type": "string"}, "cancel": {"type": "string"}}},
        "metrics": {
            "type": "object",
            "properties": {"predict_time": {"type": "number"}, "total_time": {"type": "number"}},
        },
        "data_removed": {"type": "boolean", "description": "Input, output and logs removed after retention."},
        "source": {"type": "string", "enum": ["api"]},
        "deadline": {"type": "string", "format": "date-time", "description": "Set by Cancel-After."},
        "payment": PAYMENT,
    },
    "required": ["id", "status", "input", "urls"],
}
PROBLEM = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "detail": {"type": "string"},
        "status": {"type": "integer"},
        "invalid_fields": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CHALLENGE_V1 = {
    "type": "object",
    "description": "An x402 v1 challenge; the v2 challenge is in the PAYMENT-REQUIRED header.",
    "properties": {
        "x402Version": {"type": "integer", "enum": [1]},
        "error": {"type": "string"},
        "accepts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "scheme": {"type": "string", "enum": [s.name for s in SCHEMES.values() if 1 in s.wire.versions]},
                    "network": {"type": "string"},
                    "maxAmountRequired": {"type": "string"},
                    "resource": {"type": "string"},
                    "description": {"type": "string"},
                    "mimeType": {"type": "string"},
                    "payTo": {"type": "string"},
                    "maxTimeoutSeconds": {"type": "integer"},
                    "asset": {"type": "string"},
                    "extra": {"type": "object"},
                    "outputSchema": {"type": "object"},
                },
            },
        },
    },
}
CREATE_BODY = inline_serializer(
    name="PredictionRequest",
    fields={
        "input": serializers.DictField(help_text="Validated against the model's input schema (422)."),
        "version": serializers.CharField(required=False, help_text="POST /v1/predictions only"),
        "webhook": serializers.URLField(required=False),
        "webhook_events_filter": serializers.ListField(
            child=serializers.ChoiceField(choices=["start", "output", "logs", "completed"]), required=False
        ),
    },
)
PAID_HEADERS = [
    OpenApiParameter(
        "PAYMENT-SIGNATURE",
        str,
        OpenApiParameter.HEADER,
        description="x402 v2: base64 of the PaymentPayload answering the 402's PAYMENT-REQUIRED.",
    ),
    OpenApiParameter("X-PAYMENT", str, OpenApiParameter.HEADER, description="x402 v1 payment header."),
    OpenApiParameter("Prefer", str, OpenApiParameter.HEADER, description="`wait` or `wait=N` (N <= 60)."),
    OpenApiParameter("Cancel-After", str, OpenApiParameter.HEADER, description="A duration: 30s, 5m, 1h30m."),
    OpenApiParameter(
        "Authorization", str, OpenApiParameter.HEADER, description="`Bearer <operator token>`: run without payment."
    ),
]
PAYMENT_REQUIRED = OpenApiResponse(
    response=CHALLENGE_V1,
    description=(
        "Payment required. Headers: `PAYMENT-REQUIRED` (base64 JSON x402 v2 PaymentRequired: "
        "x402Version, error, resource, accepts[{scheme, network, amount, asset, payTo, "
        "maxTimeoutSeconds, extra{name, version}}], extensions{payment-identifier, bazaar}). A "
        "refused payment carries its reason code in `error`. Browsers get an HTML paywall page."
    ),
    examples=[
        OpenApiExample(
            "challenge",
            value={"x402Version": 1, "error": "PAYMENT-SIGNATURE header is required", "accepts": []},
        )
    ],
)
PAID_RESPONSE = OpenApiResponse(
    response=PREDICTION,
    description="The prediction. Header `PAYMENT-RESPONSE` (v2) or `X-PAYMENT-RESPONSE` (v1): base64 JSON "
    "{success, transaction, network, payer, amount}.",
)

create_schema = extend_schema(
    request=CREATE_BODY,
    parameters=PAID_HEADERS,
    responses={
        201: PAID_RESPONSE,
        200: PAID_RESPONSE,
        400: PROBLEM,
        402: PAYMENT_REQUIRED,
        404: PROBLEM,
        409: PROBLEM,
        422: PROBLEM,
        503: PROBLEM,
    },
)
prediction_schema = extend_schema(responses={200: PREDICTION, 404: PROBLEM})
cancel_schema = extend_schema(request=None, responses={200: PREDICTION, 404: PROBLEM})
list_schema = extend_schema(
    operation_id="predictions_list",
    parameters=[
        OpenApiParameter("cursor", str),
        OpenApiParameter(
            "SIGN-IN-WITH-X",
            str,
            OpenApiParameter.HEADER,
            description="x402 sign-in-with-x proof (base64 JSON, EIP-4361 message signed with EIP-191) "
            "answering the declaration in a 401's `extensions`: lists the predictions this payer bought.",
        ),
        OpenApiParameter(
            "Authorization", str, OpenApiParameter.HEADER, description="`Bearer <operator token>`: lists all."
        ),
    ],
    responses={
        200: {
            "type": "object",
            "properties": {
                "next": {"type": "string", "nullable": True},
                "previous": {"type": "string", "nullable": True},
                "results": {"type": "array", "items": PREDICTION},
            },
        },
        401: PROBLEM,
        403: PROBLEM,
    },
)
object_schema = extend_schema(responses={200: {"type": "object"}, 401: PROBLEM, 404: PROBLEM})
models_list_schema = extend_schema(operation_id="models_list", responses={200: {"type": "object"}})

VERSION = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "cog_version": {"type": "string", "description": "Empty for a model not built with Cog."},
        "openapi_schema": {
            "type": "object",
            "description": "An OpenAPI 3.1 document; `components.schemas.Input` and `Output` are the "
            "version's input and output JSON Schemas.",
        },
    },
}
version_schema = extend_schema(responses={200: VERSION, 404: PROBLEM})
versions_list_schema = extend_schema(
    operation_id="models_versions_list",
    parameters=[OpenApiParameter("cursor", str)],
    responses={
        200: {
            "type": "object",
            "properties": {
                "next": {"type": "string", "nullable": True},
                "previous": {"type": "string", "nullable": True},
                "results": {"type": "array", "items": VERSION},
            },
        },
        404: PROBLEM,
    },
)
hardware_schema = extend_schema(
    operation_id="hardware_list",
    responses={
        200: {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}, "sku": {"type": "string"}}},
        }
    },
)
account_schema = extend_schema(
    parameters=[
        OpenApiParameter(
            "SIGN-IN-WITH-X",
            str,
            OpenApiParameter.HEADER,
            description="x402 sign-in-with-x proof: the account is the payer address it proves.",
        ),
        OpenApiParameter("Authorization", str, OpenApiParameter.HEADER, description="`Bearer <operator token>`."),
    ],
    responses={
        200: {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["user", "organization"]},
                "username": {"type": "string", "description": "A payer's address, or `operator`."},
                "name": {"type": "string"},
                "github_url": {"type": "string", "nullable": True},
            },
        },
        401: PROBLEM,
        403: PROBLEM,
    },
)


def collections_schema(operation_id: str) -> Any:
    """The 404-only description of a collections route (each its own operation id)."""
    return extend_schema(operation_id=operation_id, responses={404: PROBLEM})
