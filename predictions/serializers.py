"""Replicate-compatible JSON shapes, plus the ``payment`` object this server adds."""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from rest_framework.request import Request

from payments.models import Payment
from payments.schemes import priced_by

from .models import Model, ModelVersion, Prediction, PredictionStatus

#: How a prediction was created (Replicate's ``source``): every one of ours through the API.
SOURCE_API = "api"
#: Every model served here is public (anyone who pays may run it).
VISIBILITY_PUBLIC = "public"
#: The OpenAPI version of a version's ``openapi_schema``: 3.1, whose Schema Objects are JSON
#: Schema 2020-12, the dialect our input schemas are validated with.
OPENAPI_VERSION = "3.1.0"


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def payment_json(payment: Payment | None) -> dict[str, Any] | None:
    if payment is None:
        return None
    body = {
        "id": str(payment.id),
        "scheme": payment.scheme,
        "status": payment.status,
        "amount": str(payment.amount_decimal),
        "amount_atomic": str(payment.amount),
        "charged": str(payment.charged_decimal),
        "charged_atomic": str(payment.charged_atomic),
        "network": payment.network,
        "asset": payment.asset,
        "payer": payment.payer,
        "pay_to": payment.pay_to,
        "transaction": payment.settle_tx_hash,
        "confirmations": payment.confirmations,
    }
    if payment.maximum is not None:
        # Pay per second (upto): ``amount`` is the maximum until the run is measured, then the charge.
        body.update(
            maximum=str(payment.maximum_decimal),
            maximum_atomic=str(payment.maximum),
            run_seconds=None if payment.run_seconds is None else str(payment.run_seconds),
        )
    return body


def base_url(request: Request) -> str:
    return request.build_absolute_uri("/").rstrip("/")


def metrics_json(prediction: Prediction) -> dict[str, float]:
    """``predict_time`` (the run) and ``total_time`` (creation to completion), once known."""
    metrics: dict[str, float] = {}
    if prediction.predict_time is not None:
        metrics["predict_time"] = prediction.predict_time
    if prediction.completed_at is not None:
        metrics["total_time"] = (prediction.completed_at - prediction.created_at).total_seconds()
    return metrics


def prediction_json(prediction: Prediction, base: str) -> dict[str, Any]:
    """The prediction object; ``base`` is the site's URL, for the absolute ``urls``.

    Replicate's fields, less ``urls.web`` (there is no web page of a prediction here) and
    ``deployment`` (no deployments); ``deadline`` only when ``Cancel-After`` set one.
    """
    get_url = base + reverse("prediction-detail", args=[prediction.id])
    cancel_url = base + reverse("prediction-cancel", args=[prediction.id])
    body = {
        "id": prediction.id,
        "model": str(prediction.model),
        "version": prediction.version_id,
        "input": prediction.input,
        # A paid output is released only once its payment is confirmed (after_success policy).
        "output": prediction.output if prediction.output_released else None,
        # Held payment (after_success, upto): the logs are kept back with the output.
        "logs": prediction.logs if prediction.logs_released else "",
        "error": prediction.error or None,
        "status": prediction.status,
        "created_at": _iso(prediction.created_at),
        "started_at": _iso(prediction.started_at),
        "completed_at": _iso(prediction.completed_at),
        # Every prediction can be streamed (a model whose output is not a list sends it as one
        # event at the end), so `stream: true` needs nothing stored.
        "urls": {
            "get": get_url,
            "cancel": cancel_url,
            "stream": base + reverse("prediction-stream", args=[prediction.id]),
        },
        "metrics": metrics_json(prediction),
        "data_removed": prediction.data_removed,
        "source": SOURCE_API,
        "payment": payment_json(prediction.payment),
    }
    if prediction.cancel_after_at is not None:
        body["deadline"] = _iso(prediction.cancel_after_at)
    return body


def openapi_document(version: ModelVersion) -> dict[str, Any]:
    """The version's ``openapi_schema``: an OpenAPI document as Cog serves it, whose
    ``components.schemas.Input`` and ``Output`` are the version's input and output schemas
    (what Replicate's clients read, e.g. to tell an iterator output)."""
    model = version.model
    output = {"title": "Output", **(version.output_schema or {})}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": str(model), "version": version.id, "description": model.description},
        "paths": {
            "/predictions": {
                "post": {
                    "summary": "Predict",
                    "operationId": "predict_predictions_post",
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}
                        }
                    },
                    "responses": {
                        "200": {
                            "description": "Successful Response",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/PredictionResponse"}
                                }
                            },
                        }
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "Input": {"title": "Input", **(version.input_schema or {"type": "object"})},
                "Output": output,
                "PredictionRequest": {
                    "title": "PredictionRequest",
                    "type": "object",
                    "properties": {"input": {"$ref": "#/components/schemas/Input"}},
                    "required": ["input"],
                },
                "PredictionResponse": {
                    "title": "PredictionResponse",
                    "type": "object",
                    "properties": {
                        "input": {"$ref": "#/components/schemas/Input"},
                        "output": {"$ref": "#/components/schemas/Output"},
                        "status": {"type": "string", "enum": list(PredictionStatus.values)},
                        "error": {"type": ["string", "null"]},
                        "logs": {"type": "string"},
                    },
                },
            }
        },
    }


def version_json(version: ModelVersion) -> dict[str, Any]:
    """Replicate's version object. ``cog_version`` is a string, as the official client requires
    (empty for a model not built with Cog)."""
    return {
        "id": version.id,
        "created_at": _iso(version.created_at),
        "cog_version": version.cog_version,
        "openapi_schema": openapi_document(version),
    }


def _per_second(model: Model, version: Any) -> dict[str, Any] | None:
    """Pay per second (x402 ``upto``), when the model offers it: the price per second, the most a
    run can cost (its time limit's price, the permit's maximum) and what a failed run costs."""
    from payments.pricing import PricingError, usage_price

    if not model.offers_upto:
        return None
    try:
        usage = usage_price(
            model.pricing_rule(), model.time_limit_seconds, version.defaults() if version else {}, model.upto_failure_charge
        )
    except PricingError:
        return None
    if usage is None:
        return None
    return {
        "scheme": priced_by(usage=True).name,
        "order": model.upto_order,
        "price_per_second": f"{usage.per_second.normalize():f}",
        "time_limit_seconds": model.time_limit_seconds,
        "maximum": f"{usage.maximum.normalize():f}",
        "minimum": f"{usage.minimum.normalize():f}",
        "failed_run_charge": model.upto_failure_charge,
    }


def model_json(model: Model, request: Request) -> dict[str, Any]:
    """Replicate's model object plus ``pricing``: what one run costs through each option."""
    from payments.options import configured
    from payments.pricing import atomic_amount

    version = model.latest_version
    rule = model.pricing_rule()
    price = model.price_per_run
    return {
        "url": request.build_absolute_uri(f"/v1/models/{model.owner}/{model.name}"),
        # "Try it": opened in a browser, the paid endpoint is a page to pay with a wallet and run.
        "try_url": request.build_absolute_uri(f"/v1/models/{model.owner}/{model.name}/predictions"),
        "owner": model.owner,
        "name": model.name,
        "description": model.description or None,
        "visibility": VISIBILITY_PUBLIC,
        "is_official": False,
        "github_url": model.github_url or None,
        "paper_url": model.paper_url or None,
        "license_url": model.license_url or None,
        "cover_image_url": model.cover_image_url or None,
        # Replicate shows one prediction of the model; ours are each their buyer's (the id is
        # the capability to read it), so there is none to show.
        "default_example": None,
        "run_count": model.predictions.count(),
        "latest_version": version_json(version) if version else None,
        "hardware": model.hardware.slug if model.hardware else None,
        "pricing": {
            "free": rule.is_free,
            "price_per_run": f"{price.normalize():f}",
            "currency": "USDC",
            "mode": rule.mode,
            "unit_field": rule.unit_field or None,
            "unit_price": f"{rule.unit_price.normalize():f}" if rule.unit_field else None,
            "per_second": _per_second(model, version),
            "accepts": []
            if price <= 0
            else [
                {
                    "scheme": priced_by(usage=False).name,
                    "network": c.option.network,
                    "asset": c.option.asset,
                    "amount": str(atomic_amount(price, c.option.decimals)),
                    "payTo": c.option.pay_to,
                }
                for c in configured()
            ],
        },
    }
