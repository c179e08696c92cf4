"""The x402 ``bazaar`` extension: how to call a paid resource, for discovery services."""

from __future__ import annotations

from typing import Any


def _schema(body_schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of the extension's ``info``: the request body's own schema sits at
    ``properties.input.properties.body``, where the SDK's ``declare_discovery_extension``
    puts its ``input_schema``, so catalogues and agents see what to send."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "input": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "const": "http"},
                    "method": {"type": "string", "enum": ["POST", "PUT", "PATCH"]},
                    "bodyType": {"type": "string", "enum": ["json", "form-data", "text"]},
                    "body": body_schema,
                    "queryParams": {"type": "object", "additionalProperties": {"type": "string"}},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                "required": ["type", "method", "bodyType", "body"],
                "additionalProperties": False,
            },
            "output": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "example": {}},
                "required": ["type"],
            },
        },
        "required": ["input"],
    }


def post_json(
    body_example: dict[str, Any], body_schema: dict[str, Any], output_example: Any = None
) -> dict[str, Any]:
    """The extension for a JSON POST endpoint, keyed ``bazaar``: an example body and the body's
    JSON Schema (the example must be valid against it)."""
    info: dict[str, Any] = {
        "input": {"type": "http", "method": "POST", "bodyType": "json", "body": body_example},
        "output": {"type": "json"},
    }
    if output_example is not None:
        info["output"]["example"] = output_example
    return {"bazaar": {"info": info, "schema": _schema(body_schema)}}
