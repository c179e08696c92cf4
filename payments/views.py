"""Our own x402 facilitator API (``/facilitator/verify``, ``/settle``, ``/supported``).

It serves other services from the same verifier and relayer the payment gate uses. Settling
spends our relayer's gas, so the API is off unless ``X402_FACILITATOR_TOKENS`` lists bearer
tokens, and only assets configured in our payment options are served (any pay-to address).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.http import Http404
from drf_spectacular.utils import extend_schema, inline_serializer
from eth_utils import is_address, to_checksum_address
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from payments import ledger, verification
from payments.chain import settlement
from payments.chain.node import ChainUnavailable
from payments.chain.relayer import relayer_account, relayer_keys
from payments.models import Payment, PaymentStatus, VerificationMethod
from payments.options import configured
from payments.schemes import SCHEMES
from payments.verification import Verification, VerificationUnavailable
from payments.x402.codec import DecodeError
from payments.x402.types import PaymentPayload, Requirement, Resource, parse_payload
from payments.x402.verify import NONCE_ALREADY_USED, PaymentRejected
from x402site.authentication import FacilitatorToken, has_role
from x402site.conf import x402

log = logging.getLogger("payments.facilitator_api")
S = PaymentStatus


class FacilitatorClient(BasePermission):
    """The facilitator API answers its clients only (``FacilitatorToken``); 404 while it is off."""

    def has_permission(self, request, view) -> bool:  # type: ignore[no-untyped-def]
        if not x402.tokens.facilitator:
            raise Http404("The facilitator API is not enabled on this server.")
        if not has_role(request, FacilitatorToken):
            raise PermissionDenied("A facilitator token is required.")
        return True


class _Invalid(Exception):
    def __init__(self, reason: str, message: str, payer: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.payer = reason, message, payer


_AMOUNT = re.compile(r"[0-9]{1,78}")
#: The longest authorization window a facilitator client may ask us to accept.
MAX_TIMEOUT_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class FacilitatorRequest:
    """A /verify or /settle body, type-checked: the payload and the requirement it answers."""

    payload: PaymentPayload
    requirement: Requirement
    resource: Resource
    network: str

    @property
    def payer(self) -> str:
        return to_checksum_address(self.payload.authorization.from_)


def _parse(body: Any) -> FacilitatorRequest:
    """Type-check a facilitator request body; it is verified by the one verification service."""
    if not isinstance(body, dict):
        raise _Invalid("invalid_payload", "body must be a JSON object")
    raw_payload, raw_req = body.get("paymentPayload"), body.get("paymentRequirements")
    if not isinstance(raw_payload, dict) or not isinstance(raw_req, dict):
        raise _Invalid("invalid_payload", "paymentPayload and paymentRequirements must be objects")
    try:
        payload = parse_payload(raw_payload)
    except DecodeError as exc:
        raise _Invalid("invalid_payload", str(exc)) from None
    payer = to_checksum_address(payload.authorization.from_)
    version = payload.x402_version
    network, asset, pay_to = raw_req.get("network"), raw_req.get("asset"), raw_req.get("payTo")
    amount = raw_req.get("amount") if version >= 2 else raw_req.get("maxAmountRequired")
    if not (isinstance(asset, str) and is_address(asset) and isinstance(pay_to, str) and is_address(pay_to)):
        raise _Invalid("invalid_payment_requirements", "asset and payTo must be addresses", payer)
    if not isinstance(amount, str) or not _AMOUNT.fullmatch(amount) or int(amount) == 0:
        raise _Invalid("invalid_payment_requirements", "amount must be a positive decimal string", payer)
    conf = next(
        (
            c
            for c in configured()
            if c.option.matches_network(str(network), version) and c.option.asset.lower() == asset.lower()
        ),
        None,
    )
    if conf is None:
        raise _Invalid("network_mismatch", f"{str(network)[:80]} {asset} is not supported here", payer)
    timeout = raw_req.get("maxTimeoutSeconds")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= MAX_TIMEOUT_SECONDS:
        timeout = conf.option.max_timeout_seconds
    option = dataclasses.replace(conf.option, pay_to=to_checksum_address(pay_to), max_timeout_seconds=timeout)
    resource = raw_payload.get("resource")
    url = resource.get("url") if isinstance(resource, dict) else raw_req.get("resource")
    return FacilitatorRequest(
        payload=payload,
        requirement=Requirement(option, int(amount)),
        resource=Resource(url=str(url or "")[:512]),
        network=conf.option.network if version >= 2 else conf.option.v1_network,
    )


def _verify(request: FacilitatorRequest) -> Verification:
    try:
        return verification.verify(request.payload, [request.requirement], request.resource)
    except PaymentRejected as exc:
        raise _Invalid(exc.reason, exc.message, request.payer) from None


FACILITATOR_BODY = inline_serializer(
    name="FacilitatorRequest",
    fields={
        "x402Version": serializers.IntegerField(),
        "paymentPayload": serializers.DictField(),
        "paymentRequirements": serializers.DictField(),
    },
)
facilitator_schema = extend_schema(
    tags=["facilitator"],
    request=FACILITATOR_BODY,
    responses={
        200: {"type": "object"},
        403: {"type": "object"},
        404: {"type": "object"},
        503: {"type": "object"},
    },
)


def _unavailable() -> Response:
    return Response({"detail": "chain node or facilitator unavailable"}, status=503, headers={"Retry-After": "5"})


class FacilitatorVerify(APIView):
    """POST /facilitator/verify: the same verification the payment gate runs, nothing less."""

    authentication_classes = [FacilitatorToken]
    permission_classes = [FacilitatorClient]

    @facilitator_schema
    def post(self, request: Request) -> Response:
        try:
            verified = _verify(_parse(request.data))
        except _Invalid as exc:
            return Response(
                {"isValid": False, "invalidReason": exc.reason, "invalidMessage": exc.message, "payer": exc.payer}
            )
        except VerificationUnavailable:
            return _unavailable()
        return Response({"isValid": True, "payer": to_checksum_address(verified.payment.payer)})


def _settle_failure(reason: str, message: str, network: str, payer: str | None) -> dict[str, Any]:
    answer = {
        "success": False,
        "errorReason": reason,
        "errorMessage": message,
        "transaction": "",
        "network": network,
    }
    if payer:
        answer["payer"] = payer
    return answer


class FacilitatorSettle(APIView):
    """POST /facilitator/settle: verify (as /verify), record, settle with our relayer.

    A proof already used on chain is refused like any other (the old hash is not an answer to
    a new request); a retry of a proof we are still settling gets that settlement's state.
    """

    authentication_classes = [FacilitatorToken]
    permission_classes = [FacilitatorClient]

    @facilitator_schema
    def post(self, request: Request) -> Response:
        data = request.data if isinstance(request.data, dict) else {}
        requirements = data.get("paymentRequirements")
        network = str(requirements.get("network", ""))[:80] if isinstance(requirements, dict) else ""
        try:
            parsed = _parse(request.data)
            network = parsed.network
            payment = self._record(_verify(parsed), parsed)
        except _Invalid as exc:
            return Response(_settle_failure(exc.reason, exc.message, network, exc.payer))
        except VerificationUnavailable:
            return _unavailable()
        try:
            payment = settlement.settle(payment.pk, wait_seconds=x402.facilitator.settle_wait_seconds)
        except ChainUnavailable:
            payment.refresh_from_db()
        return Response(self._answer(payment, network))

    @staticmethod
    def _record(verified: Verification, parsed: FacilitatorRequest) -> Payment:
        blob = json.dumps(parsed.payload.raw, sort_keys=True, separators=(",", ":")).encode()
        try:
            with transaction.atomic():
                return ledger.record(
                    verified,
                    resource=parsed.resource,
                    fingerprint=hashlib.sha256(blob).hexdigest(),
                    method=VerificationMethod.FACILITATOR_API,
                )
        except IntegrityError as exc:
            if not ledger.is_duplicate(exc):
                raise
            # The nonce is unused on chain (we just checked) and already in our ledger: only
            # the very same proof is answered with its settlement (tried again if an earlier
            # attempt failed and it now verifies).
            same = ledger.same_proof(verified.payment, recorded_by=VerificationMethod.FACILITATOR_API)
            if same is None:
                raise _Invalid(
                    NONCE_ALREADY_USED, "this authorization is already being settled", parsed.payer
                ) from None
            return ledger.retry(same) if same.status == S.LAPSING else same

    @staticmethod
    def _answer(p: Payment, network: str) -> dict[str, Any]:
        base = {
            "transaction": p.settle_tx_hash or "",
            "network": network,
            "payer": p.payer,
            "amount": str(p.amount),
        }
        if p.is_paid:
            return {"success": True, **base}
        if not p.is_terminal:  # VERIFIED, SETTLING, LAPSING: the chain has not had its last word
            return {"success": False, "errorReason": "settlement_pending", **base}
        return {
            "success": False,
            "errorReason": "transaction_failed",
            "errorMessage": p.failure_reason,
            **base,
        }


class FacilitatorSupported(APIView):
    authentication_classes = [FacilitatorToken]
    permission_classes = [FacilitatorClient]

    @extend_schema(tags=["facilitator"], responses={200: {"type": "object"}, 403: {"type": "object"}})
    def get(self, request: Request) -> Response:
        kinds = []
        schemes = [s for s in SCHEMES.values() if s.facilitator_api]
        for c in configured():
            for s in schemes:
                for version in sorted(s.wire.versions, reverse=True):
                    network = c.option.network if version >= 2 else c.option.v1_network
                    kinds.append({"x402Version": version, "scheme": s.name, "network": network})
        signers = [relayer_account(key).address for key in relayer_keys()]  # every lane may submit
        return Response({"kinds": kinds, "extensions": [], "signers": {"eip155:*": signers}})
