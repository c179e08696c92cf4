"""The Replicate-compatible predictions API, gated by x402."""

from __future__ import annotations

import hmac
import logging
import re
from datetime import timedelta
from typing import Any

from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import MethodNotAllowed, NotFound, ParseError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from payments import ratelimit
from payments.exceptions import payment_required_response, paywall_response, wants_html
from payments.ledger import settlement_answer
from payments.models import HardwareTier
from payments.permissions import Admission, Charge, X402Payment, challenge_for
from payments.x402.codec import encode_header
from x402site.authentication import OperatorToken, is_operator
from x402site.exceptions import InvalidInput
from x402site.inputs import ascii_uint

from . import lifecycle, schema
from .auth import AuthenticationRequired, SignInWithX, payer_of
from .models import Model, ModelVersion, Prediction, PredictionStatus
from .pagination import CursorPagination
from .runners import cog
from .serializers import base_url, model_json, prediction_json, version_json
from .services import (
    channel_answer,
    charge_for,
    check_runner,
    create_prediction,
    example_input,
    replayed,
    validate_input,
)
from .streams import WaitThenRespond
from .webhooks import EVENTS, UnsafeWebhook, check_url
from .webhooks import secret as webhook_secret

PAYMENT_RESPONSE_HEADERS = {1: "X-PAYMENT-RESPONSE", 2: "PAYMENT-RESPONSE"}
#: Replicate's account types, and the username an operator token reads as.
ACCOUNT_USER, ACCOUNT_ORGANIZATION, OPERATOR = "user", "organization", "operator"
log = logging.getLogger("predictions.api")


_DURATION = re.compile(r"(?:([0-9]{1,9})h)?(?:([0-9]{1,9})m(?!s))?(?:([0-9]{1,9})s)?(?:([0-9]{1,9})ms)?")
#: The longest Cancel-After accepted (a longer deadline is no deadline).
MAX_CANCEL_AFTER = timedelta(days=7)


def parse_duration(text: str) -> timedelta:
    """Replicate's durations: ``90``, ``30s``, ``5m``, ``1h30m``, ``500ms`` (ASCII digits, at
    most ``MAX_CANCEL_AFTER``)."""
    text = text.strip()
    seconds = ascii_uint(text, 9)
    match = _DURATION.fullmatch(text)
    if seconds is not None:
        duration = timedelta(seconds=seconds)
    elif text and match is not None:
        h, m, sec, ms = (int(g) if g else 0 for g in match.groups())
        duration = timedelta(hours=h, minutes=m, seconds=sec, milliseconds=ms)
    else:
        raise ParseError(f"Cancel-After: cannot read the duration {text[:40]!r} (try 30s, 5m, 1h30m)")
    if duration > MAX_CANCEL_AFTER:
        raise ParseError(f"Cancel-After: at most {MAX_CANCEL_AFTER.days} days")
    return duration


def creation_options(request: Request) -> dict[str, Any]:
    """Webhook, event filter and Cancel-After of a create request (validated before payment)."""
    data = request.data if isinstance(request.data, dict) else {}
    webhook = data.get("webhook") or ""
    events = data.get("webhook_events_filter") or []
    if not isinstance(webhook, str) or len(webhook) > 2000:
        raise InvalidInput("`webhook` must be a URL.", {"webhook": "must be a URL"})
    if webhook:
        ratelimit.hit(request, "webhook")  # each check resolves a name: counted first
        try:
            check_url(webhook)
        except UnsafeWebhook as exc:
            raise InvalidInput(f"webhook refused: {exc}", {"webhook": str(exc)}) from None
    if not isinstance(events, list) or not all(isinstance(e, str) and e in EVENTS for e in events):
        raise InvalidInput(
            f"`webhook_events_filter` must be a subset of {list(EVENTS)}",
            {"webhook_events_filter": "unknown event"},
        )
    if not isinstance(data.get("stream", False), bool):
        raise InvalidInput("`stream` must be true or false.", {"stream": "must be a boolean"})
    options: dict[str, Any] = {"webhook": webhook, "webhook_events_filter": events}
    if "Cancel-After" in request.headers:
        options["cancel_after_at"] = timezone.now() + parse_duration(request.headers["Cancel-After"])
    return options


#: RFC 7240 ``wait`` or ``wait=N`` among the preferences (a malformed value is no preference).
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait(?:=([0-9]+))?(?=$|[,;\s])", re.ASCII | re.IGNORECASE)
MAX_WAIT = 60


#: ``Prefer: wait=N`` answers this much before N seconds: the official client gives up reading
#: at N + 0.5 s, and a paid answer it never reads is money for nothing.
WAIT_MARGIN = 1.0


def wait_seconds(request: Request) -> float:
    """``Prefer: wait`` (60 s) or ``wait=N`` (N <= 60): how long to hold the answer until the
    prediction ends, ``WAIT_MARGIN`` less (0: answer at once). The wait itself is asynchronous
    (predictions.streams.waits_asynchronously)."""
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    if match is None:
        return 0
    seconds = ascii_uint(match.group(1) or "", 2)
    wait = min(MAX_WAIT if seconds is None else seconds, MAX_WAIT)
    return max(0.0, wait - WAIT_MARGIN)


def waited_json(request: Request, prediction: Prediction) -> dict[str, Any]:
    """The create's answer, after any ``Prefer: wait`` (waited before, asynchronously). A wait
    that ran out before the prediction ended shows it ``starting``, as Replicate's sync mode
    does: the official client's ``run`` takes any other status after a wait for the end and
    would return no output for a paid prediction (the prediction's own URL shows its true status)."""
    body = prediction_json(prediction, base_url(request))
    if _PREFER_WAIT.search(request.headers.get("Prefer", "")) and not prediction.is_terminal:
        body["status"] = PredictionStatus.STARTING
    return body


def model_or_404(owner: str, name: str) -> Model:
    model = Model.objects.select_related("hardware").filter(owner=owner, name=name).first()
    if model is None:
        raise NotFound(f"The requested resource could not be found: there is no model {owner}/{name}.")
    return model


class PaidPredictionCreate(APIView):
    """Shared create logic: resolve the version, price it, take the payment, create."""

    permission_classes = [X402Payment]

    def resolve_version(self, request: Request) -> ModelVersion:
        raise NotImplementedError

    def get_charge(self, request: Request) -> Charge | None:
        version = self.resolve_version(request)
        self.version = version
        # The run gets, and the price covers, the input with the schema's defaults filled in.
        self.inputs = {**version.defaults(), **validate_input(version, request.data)}
        self.options = creation_options(request)  # a bad webhook or Cancel-After: refused before payment
        check_runner(version)
        return charge_for(version, self.inputs, request.build_absolute_uri(request.path), request.path)

    @schema.create_schema
    def post(self, request: Request, **kwargs: Any) -> Response:
        admission: Admission = request.x402
        if admission.replay_of is not None:
            prediction, created = replayed(admission.replay_of, admission.charge), False
        else:
            prediction, created = self._create(request)
        seconds = wait_seconds(request)
        if seconds and not prediction.is_terminal:

            def respond() -> Response:
                waited = Prediction.objects.select_related("payment", "model").get(pk=prediction.pk)
                return self.finalize_response(request, self._respond(request, waited, created))

            return WaitThenRespond(prediction.pk, seconds, respond)
        return self._respond(request, prediction, created)

    def _create(self, request: Request) -> tuple[Prediction, bool]:
        return create_prediction(
            self.version,
            self.inputs,
            options=self.options,
            paid=request.x402.verification,
            charge=request.x402.charge,
            challenge=request.x402.challenge,
            channel=request.x402.channel,
        )

    def _respond(self, request: Request, prediction: Prediction, created: bool) -> Response:
        headers = {"Location": request.build_absolute_uri(f"/v1/predictions/{prediction.id}")}
        body = waited_json(request, prediction)
        payment = prediction.payment
        if payment is not None:
            # As this request recorded it (settlement_pending: settled by a worker, later), or as
            # read after a wait (the hash once settled): no second read of a row just written.
            headers[PAYMENT_RESPONSE_HEADERS[payment.x402_version]] = encode_header(settlement_answer(payment))
        elif prediction.channel_id is not None:
            headers[PAYMENT_RESPONSE_HEADERS[2]] = encode_header(channel_answer(prediction, request.x402.channel))
        return Response(
            body,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
            headers=headers,
        )


class ModelPredictionCreate(PaidPredictionCreate):
    """POST /v1/models/{owner}/{name}/predictions: run the model's latest version."""

    def resolve_version(self, request: Request) -> ModelVersion:
        owner, name = self.kwargs["owner"], self.kwargs["name"]
        version = ModelVersion.objects.latest_of(owner, name)  # one query on the hot path
        if version is None:
            raise NotFound(f"Model {model_or_404(owner, name)} has no version.")
        return version

    @extend_schema(exclude=True)
    def get(self, request: Request, **kwargs: Any) -> Any:
        """A browser opening the endpoint gets the paywall page (the 402 an agent would get)."""
        if not wants_html(request):
            raise MethodNotAllowed("GET")
        version = self.resolve_version(request)
        charge = charge_for(
            version, example_input(version), request.build_absolute_uri(request.path), request.path
        )
        if charge.free:
            raise MethodNotAllowed("GET", detail="This model is free: POST to run it.")
        exc = challenge_for(charge).reject("PAYMENT-SIGNATURE header is required")
        return paywall_response(exc, payment_required_response(exc))


class InvalidVersion(InvalidInput):
    """An unknown version in a create: Replicate answers 422 with this title and detail."""

    title = "Invalid version or not permitted"

    def __init__(self) -> None:
        super().__init__(
            "The specified version does not exist (or perhaps you don't have permission to use it?)",
            {"version": "no such version"},
        )


class PredictionCreate(PaidPredictionCreate):  # noqa: D101 (see PredictionList for GET)
    """POST /v1/predictions with {"version": ..., "input": ...}."""

    def resolve_version(self, request: Request) -> ModelVersion:
        data = request.data
        version_id = data.get("version") if isinstance(data, dict) else None
        if not isinstance(version_id, str) or not version_id:
            raise InvalidInput("`version` is required.", {"version": "required string"})
        # Replicate also accepts "owner/name:version" (the name must then be the version's model).
        named, _, version_id = version_id.rpartition(":")
        version = ModelVersion.objects.select_related("model__hardware").filter(pk=version_id).first()
        if version is None or (named and named != str(version.model)):
            raise InvalidVersion()
        return version


class PredictionDetail(APIView):
    """GET /v1/predictions/{id}: no payment needed; the unguessable id is the capability."""

    @schema.prediction_schema
    def get(self, request: Request, prediction_id: str) -> Response:
        prediction = get_object_or_404(
            Prediction.objects.select_related("payment", "model"), pk=prediction_id
        )
        return Response(prediction_json(prediction, base_url(request)))


class ModelList(APIView):
    """GET /v1/models: the catalogue with prices, so an agent can budget before it calls."""

    @schema.models_list_schema
    def get(self, request: Request) -> Response:
        paginator = CursorPagination()
        paginator.ordering = ("owner", "name")
        paginator.page_size = 50
        page = paginator.paginate_queryset(Model.objects.select_related("hardware"), request, view=self)
        return paginator.get_paginated_response([model_json(m, request) for m in page])


class ModelDetail(APIView):
    """GET /v1/models/{owner}/{name}."""

    @schema.object_schema
    def get(self, request: Request, owner: str, name: str) -> Response:
        return Response(model_json(model_or_404(owner, name), request))


class ModelVersionList(APIView):
    """GET /v1/models/{owner}/{name}/versions: the model's versions, newest first, by cursor."""

    @schema.versions_list_schema
    def get(self, request: Request, owner: str, name: str) -> Response:
        model = model_or_404(owner, name)
        paginator = CursorPagination()
        paginator.ordering = "-created_at"
        paginator.page_size = 50
        page = paginator.paginate_queryset(model.versions.select_related("model"), request, view=self)
        return paginator.get_paginated_response([version_json(v) for v in page])


class ModelVersionDetail(APIView):
    """GET /v1/models/{owner}/{name}/versions/{id} (what replicate.run reads after a create)."""

    @schema.version_schema
    def get(self, request: Request, owner: str, name: str, version_id: str) -> Response:
        model = model_or_404(owner, name)
        version = model.versions.select_related("model").filter(pk=version_id).first()
        if version is None:
            raise NotFound(
                f"The requested resource could not be found: model {model} has no version {version_id[:64]}."
            )
        return Response(version_json(version))


class PredictionList(PredictionCreate):
    """GET /v1/predictions: the predictions this caller may list, newest first, by cursor.

    An operator token lists everything. An agent proves it is a payer with a ``SIGN-IN-WITH-X``
    proof (x402 sign-in-with-x, bound to this deployment, used once; ``predictions.auth``): it
    sees the predictions its payments bought.
    """

    authentication_classes = [OperatorToken, SignInWithX]

    @schema.list_schema
    def get(self, request: Request) -> Response:
        queryset = Prediction.objects.select_related("payment", "model")
        if not is_operator(request):
            queryset = queryset.filter(payment__payer=payer_of(request))
        paginator = CursorPagination()
        paginator.ordering = "-created_at"
        paginator.page_size = 50
        page = paginator.paginate_queryset(queryset, request, view=self)
        base = base_url(request)
        return paginator.get_paginated_response([prediction_json(p, base) for p in page])


class PredictionCancel(APIView):
    """POST /v1/predictions/{id}/cancel: the id is the capability, as for reading."""

    @schema.cancel_schema
    def post(self, request: Request, prediction_id: str) -> Response:
        prediction = lifecycle.cancel(get_object_or_404(Prediction, pk=prediction_id).pk)
        prediction = Prediction.objects.select_related("payment", "model").get(pk=prediction.pk)
        return Response(prediction_json(prediction, base_url(request)))


class HardwareList(APIView):
    """GET /v1/hardware: the hardware tiers models run on, as Replicate lists them ({name, sku})."""

    @schema.hardware_schema
    def get(self, request: Request) -> Response:
        tiers = HardwareTier.objects.filter(active=True)
        return Response([{"name": tier.name, "sku": tier.slug} for tier in tiers])


class AccountDetail(APIView):
    """GET /v1/account: who is asking. There are no accounts here: an operator token is the
    operator (an organization); an agent proves its payer address with a sign-in-with-x proof
    (401 with the declaration without one), and that address is its username."""

    authentication_classes = [OperatorToken, SignInWithX]

    @schema.account_schema
    def get(self, request: Request) -> Response:
        if is_operator(request):
            return Response(
                {"type": ACCOUNT_ORGANIZATION, "username": OPERATOR, "name": OPERATOR, "github_url": None}
            )
        payer = payer_of(request, "Reading the account")
        return Response({"type": ACCOUNT_USER, "username": payer, "name": payer, "github_url": None})


NO_COLLECTIONS = "Collections are not offered by this server; list its models with GET /v1/models."


class CollectionList(APIView):
    """GET /v1/collections: Replicate's curated collections are not offered here (404)."""

    @schema.collections_schema("collections_list")
    def get(self, request: Request) -> Response:
        raise NotFound(NO_COLLECTIONS)


class CollectionDetail(APIView):
    """GET /v1/collections/{slug}: 404, as the list."""

    @schema.collections_schema("collections_get")
    def get(self, request: Request, slug: str) -> Response:
        raise NotFound(NO_COLLECTIONS)


class WebhookSecret(APIView):
    """GET /v1/webhooks/default/secret: the signing secret, for operators (as Replicate does)."""

    @schema.object_schema
    def get(self, request: Request) -> Response:
        if not is_operator(request):
            raise AuthenticationRequired("An operator token is required.")
        return Response({"key": webhook_secret()})


class CogWebhook(APIView):
    """POST /internal/cog/{id}/{token}: a Cog server reporting on a run we started.

    The token is an HMAC of the prediction id, so only the server we gave the URL to can
    report. The prediction's runner reads the report (progress: logs; a terminal status: the
    outcome, accepted once whenever it arrives).
    """

    @extend_schema(exclude=True)
    def post(self, request: Request, prediction_id: str, token: str) -> Response:
        if not hmac.compare_digest(token.encode(), cog.callback_token(prediction_id).encode()):
            raise NotFound()
        body = request.data if isinstance(request.data, dict) else {}
        log.info("cog webhook for %s: %s", prediction_id, body.get("status"))
        version = get_object_or_404(ModelVersion, predictions__pk=prediction_id)
        version.runner_impl.handle_callback(prediction_id, body)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DiscoveryResources(APIView):
    """GET /discovery/resources: every paid resource, its price per option, and how to call it,
    in the shape x402 discovery services list (items with ``accepts`` and the ``bazaar`` info)."""

    @schema.object_schema
    def get(self, request: Request) -> Response:
        base = base_url(request)
        items = []
        for model in Model.objects.select_related("hardware").prefetch_related("versions"):
            version = model.latest_version
            if version is None:
                continue
            url = f"{base}/v1/models/{model.owner}/{model.name}/predictions"
            try:
                charge = charge_for(version, example_input(version), url, f"/v1/models/{model}/predictions")
            except InvalidInput:
                continue
            if charge.free:
                continue
            items.append(
                {
                    "resource": url,
                    "type": "http",
                    "x402Version": 2,
                    "accepts": [r.v2() for r in challenge_for(charge).requirements],
                    "lastUpdated": (
                        model.price_changes.values_list("changed_at", flat=True).first() or model.created_at
                    ).isoformat(),
                    "metadata": {
                        "name": str(model),
                        "description": model.description,
                        "price_per_run": f"{charge.price.normalize():f}",
                        "currency": "USDC",
                        "inputSchema": version.input_schema,
                        "outputSchema": version.output_schema,
                    },
                    "extensions": charge.extensions,
                }
            )
        return Response(
            {
                "x402Version": 2,
                "items": items,
                "pagination": {"limit": len(items), "offset": 0, "total": len(items)},
            }
        )
