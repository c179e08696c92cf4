"""The domain side of a paid create, shared by the API, MCP, the admin, commands and tests:
the input checked against the model's schema, the runner's readiness, the charge (price rule,
honoured prices, the resource the 402 describes), creating the prediction with its payment,
and waiting for it (MCP)."""

from __future__ import annotations

import contextlib
import time
from decimal import Decimal
from typing import Any

import jsonschema
from django.db import IntegrityError, transaction
from rest_framework.exceptions import APIException, ParseError

from payments import idempotency, ledger
from payments.chain import prerun
from payments.chain.node import ChainUnavailable
from payments.channels import gate as channel_gate
from payments.channels.gate import ChannelPayment
from payments.channels.models import Channel
from payments.exceptions import Challenge, ServiceUnavailable
from payments.idempotency import IdempotencyConflict
from payments.ledger import request_fingerprint
from payments.models import Payment, UptoOrder
from payments.permissions import Charge, honour_window_seconds
from payments.pricing import PriceRule, PricingError, pricing_state, usage_price
from payments.schemes import scheme_of
from payments.verification import Verification
from payments.x402 import bazaar
from payments.x402.types import Resource
from payments.x402.verify import NONCE_ALREADY_USED, SETTLEMENT_WOULD_REVERT
from x402site.exceptions import InvalidInput

from . import lifecycle, scheduling
from .models import ModelVersion, Prediction, SettlementPolicy, new_prediction_id
from .runners import READY


def create_prediction(
    version: ModelVersion,
    inputs: dict[str, Any],
    *,
    paid: Verification | None,
    charge: Charge | None,
    challenge: Challenge | None,
    options: dict[str, Any] | None = None,
    channel: ChannelPayment | None = None,
) -> tuple[Prediction, bool]:
    """Record the payment (if any) and create its prediction in one transaction.

    Paid with a voucher (``channel``), the prediction holds its channel (one request in flight
    per channel; PaymentRequired when another holds it or was charged since the gate's check)
    and runs at once; it is charged when it ends (``charges.bill_channel``).

    Returns ``(prediction, created)``. An authorization already in the ledger buys nothing
    more: only an idempotent retry (the same ``payment-identifier`` and payload, for the same
    request) that lost the race with its first attempt gets that prediction back; anything
    else is refused with ``invalid_exact_evm_nonce_already_used`` and learns nothing of it.
    """
    policy = version.model.settlement_policy  # read once: the prediction keeps it for good
    usage = None
    if paid is not None and scheme_of(paid.payment.payload.scheme).usage_priced:
        # Pay per second (upto): the charge is known only once the run is measured, so it is
        # run first and settled after, whatever the model's policy for fixed quotes.
        assert charge is not None and charge.usage is not None
        policy, usage = SettlementPolicy.AFTER_SUCCESS, charge.usage
    if paid is not None and policy == SettlementPolicy.AFTER_SUCCESS:
        _refuse_unless_settleable(paid, challenge)
    try:
        with transaction.atomic():
            payment = None
            if paid is not None:
                assert charge is not None
                payment = ledger.record(
                    paid,
                    resource=charge.resource,
                    fingerprint=charge.fingerprint,
                    settle_now=policy == SettlementPolicy.BEFORE_RUN,
                    usage=usage,
                )
            channel_pk, prediction_id = None, None
            if channel is not None:
                assert challenge is not None and charge is not None
                per_second = charge.channel_usage
                held_usage = {**per_second.snapshot(), "decimals": str(channel.decimals)} if per_second else None
                prediction_id = new_prediction_id()
                channel_pk = channel_gate.hold(channel, prediction_id, challenge, held_usage)
            prediction = lifecycle.create(
                version,
                inputs,
                payment=payment,
                settlement_policy=policy,
                options=options,
                channel_id=channel_pk,
                prediction_id=prediction_id,
            )
            transaction.on_commit(lambda: scheduling.start_prediction(prediction))
            return prediction, True
    except IntegrityError as exc:
        if paid is None or not ledger.is_duplicate(exc):
            raise
    assert charge is not None and challenge is not None
    first = idempotency.lookup(paid.payment.payload)
    if first is not None:
        return replayed(first, charge), False
    raise challenge.reject(NONCE_ALREADY_USED, "this authorization was already presented")


def channel_answer(prediction: Prediction, paid: ChannelPayment | None) -> dict[str, Any]:
    """The ``PAYMENT-RESPONSE`` of a prediction paid with a voucher (``paid``: this request's
    payment, whose deposit transaction it names)."""
    channel = Channel.objects.get(pk=prediction.channel_id)
    return channel_gate.answer(channel, str(prediction.pk), transaction_hash=paid.deposit_tx if paid else "")


def _refuse_unless_settleable(paid: Verification, challenge: Challenge | None) -> None:
    """A payment held until after its run is settled only then: its settlement is simulated now
    (as it will be sent, at the most it can settle), and refused (402, no run) if it would
    revert, so a run is never given for an authorization the chain will not honour."""
    assert challenge is not None
    try:
        why = prerun.refusal_before_run(paid.payment, paid.conf)
    except ChainUnavailable:
        raise ServiceUnavailable() from None
    if why is not None:
        raise challenge.reject(
            SETTLEMENT_WOULD_REVERT, f"this payment could not be settled after the run: {why}"
        )


def replayed(payment: Payment, charge: Charge) -> Prediction:
    """The prediction an idempotent retry's first attempt bought (409 if it bought another request)."""
    prediction = Prediction.objects.select_related("payment", "model").filter(payment=payment).first()
    if prediction is None or payment.request_fingerprint != charge.fingerprint:
        raise IdempotencyConflict("This payment-identifier was already used for another request.")
    return prediction


def _field_of(error: jsonschema.ValidationError) -> str:
    path = [str(p) for p in error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        path += missing[:1]
    return ".".join(path) or "input"


def validate_input(version: ModelVersion, data: Any) -> dict[str, Any]:
    """The request's ``input`` object, checked against the version's schema (422 naming fields)."""
    if not isinstance(data, dict):
        raise ParseError("The request body must be a JSON object.")
    inputs = data.get("input")
    if not isinstance(inputs, dict):
        raise InvalidInput("`input` must be an object.", {"input": "required object"})
    validator = jsonschema.Draft202012Validator(version.input_schema or {"type": "object"})
    errors = sorted(validator.iter_errors(inputs), key=lambda e: list(e.absolute_path))
    if errors:
        fields = {_field_of(e): e.message for e in errors}
        raise InvalidInput("Input does not match the model's schema: " + "; ".join(fields), fields)
    return inputs


class ModelUnavailable(APIException):
    status_code = 503
    default_detail = "The model cannot take a prediction right now; retry shortly."


def check_runner(version: ModelVersion) -> None:
    """The model's runner must be ready (a Cog server set up, a slot free) before we ask for money."""
    state = version.runner_impl.health(version)
    if state != READY:
        raise ModelUnavailable(f"The model is {state.lower()}; retry shortly.")


def example_input(version: ModelVersion | None) -> dict[str, Any]:
    """An input that fits the version's schema, from its defaults and examples."""
    props = (version.input_schema or {}).get("properties", {}) if version else {}
    example: dict[str, Any] = {}
    for name, spec in props.items():
        if "default" in spec or "examples" in spec:
            example[name] = spec.get("default", (spec.get("examples") or [None])[0])
        elif spec.get("type") == "string":
            example[name] = "hello"
        elif spec.get("type") in ("number", "integer"):
            example[name] = spec.get("minimum", 1)
    return example


def body_schema(version: ModelVersion) -> dict[str, Any]:
    """The JSON Schema of a create's body: ``input``, by the version's input schema."""
    return {
        "type": "object",
        "properties": {"input": version.input_schema or {"type": "object"}},
        "required": ["input"],
    }


def discovery_extension(version: ModelVersion) -> dict[str, Any]:
    return bazaar.post_json({"input": example_input(version)}, body_schema(version))


def v1_output_schema(version: ModelVersion) -> dict[str, Any]:
    return {
        "input": {"type": "http", "method": "POST", "bodyType": "json", "body": body_schema(version)},
        "output": version.output_schema or {},
    }


def _honoured_prices(rules: tuple[PriceRule, ...], inputs: dict[str, Any], price: Decimal) -> tuple[Decimal, ...]:
    prices = set()
    for rule in rules:
        with contextlib.suppress(PricingError):  # an old rule that cannot price this input honours nothing
            prices.add(rule.quote(inputs))
    return tuple(prices - {price})


def charge_for(version: ModelVersion, inputs: dict[str, Any], url: str, path: str) -> Charge:
    """What running ``version`` on ``inputs`` costs (the gate and the admin preview share it).

    The input is priced as the run will get it (schema defaults filled in). A payment settled
    only after the run (``after_success``) must stay settleable for the run's time limit.
    """
    model = version.model
    settled_after_run = model.settlement_policy == SettlementPolicy.AFTER_SUCCESS
    hold = model.time_limit_seconds if settled_after_run and not model.is_free else 0
    state = pricing_state(model, honour_window_seconds(hold))
    priced = {**version.defaults(), **inputs}  # as the run gets it (the create path fills them in)
    try:
        price = state.current.quote(priced)
        # Pay per second (upto) as well, when the model offers it: at the same (cached) rule.
        per_second = usage_price(state.current, model.time_limit_seconds, priced, model.upto_failure_charge)
    except PricingError as exc:
        raise InvalidInput(str(exc), {state.current.unit_field or "input": str(exc)}) from None
    free = state.current.is_free
    return Charge(
        usage=per_second if model.offers_upto else None,
        channel_usage=per_second,
        usage_hold_seconds=model.time_limit_seconds,
        upto_first=model.upto_order == UptoOrder.UPTO_FIRST,
        channels=model.offers_channels,
        extensions=discovery_extension(version),
        example_input=example_input(version),
        output_schema=v1_output_schema(version),
        price=price,
        free=free,
        hold_seconds=0 if free else hold,
        honoured=_honoured_prices(state.honoured, priced, price),
        resource=Resource(url=url, description=f"One prediction of {model}", mime_type="application/json"),
        fingerprint=request_fingerprint(path, {"version": version.id, "input": inputs}),
    )


def wait_until_done(prediction: Prediction, seconds: float) -> Prediction:
    """The prediction once it has ended, or as it stands after ``seconds`` (holding the thread:
    for callers that are sync anyway, the MCP tools)."""
    deadline = time.monotonic() + seconds
    delay = 0.05
    while not prediction.is_terminal and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
        prediction = Prediction.objects.select_related("payment", "model").get(pk=prediction.pk)
    return prediction
