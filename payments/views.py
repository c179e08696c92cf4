"""Our own x402 facilitator API (``/facilitator/verify``, ``/settle``, ``/supported``).

It serves other services from the same verifier and relayer the payment gate uses. Settling
spends our relayer's gas, so the API is off unless ``X402_FACILITATOR_TOKENS`` lists bearer
tokens, and only assets configured in our payment options are served (any pay-to address).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import time
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import Http404
from drf_spectacular.utils import extend_schema, inline_serializer
from eth_utils import is_address, to_checksum_address
from rest_framework import serializers
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import ledger, settlement
from .chain import ChainUnavailable
from .models import Payment, PaymentStatus
from .options import ConfiguredOption, configured
from .settlement import relayer_account
from .verification import verify_on_chain
from .x402.codec import DecodeError
from .x402.types import Requirement, Resource, parse_payload
from .x402.verify import PaymentRejected, VerifiedPayment, verify_exact

log = logging.getLogger("payments.facilitator_api")
S = PaymentStatus


class FacilitatorToken(BasePermission):
    def has_permission(self, request, view) -> bool:  # type: ignore[no-untyped-def]
        tokens = settings.X402_FACILITATOR_TOKENS
        if not tokens:
            raise Http404("The facilitator API is not enabled on this server.")
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return any(hmac.compare_digest(given, t) for t in tokens)


class _Invalid(Exception):
    def __init__(self, reason: str, message: str, payer: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.payer = reason, message, payer


def _parse(body: Any) -> tuple[VerifiedPayment, ConfiguredOption, dict[str, Any]]:
    """Verify a facilitator request body in pure code; the chain checks come after."""
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
    if not isinstance(amount, str) or not amount.isdigit():
        raise _Invalid("invalid_payment_requirements", "amount must be a decimal string", payer)
    conf = next(
        (
            c
            for c in configured()
            if c.option.matches_network(str(network), version) and c.option.asset.lower() == asset.lower()
        ),
        None,
    )
    if conf is None:
        raise _Invalid("network_mismatch", f"{network} {asset} is not supported here", payer)
    timeout = raw_req.get("maxTimeoutSeconds", conf.option.max_timeout_seconds)
    option = dataclasses.replace(
        conf.option,
        pay_to=to_checksum_address(pay_to),
        max_timeout_seconds=int(timeout) if isinstance(timeout, int) else conf.option.max_timeout_seconds,
    )
    try:
        verified = verify_exact(
            payload,
            [Requirement(option, int(amount))],
            int(time.time()),
            settle_margin=settings.X402_SETTLE_MARGIN_SECONDS,
            clock_skew=settings.X402_CLOCK_SKEW_SECONDS,
            contract_signers=True,  # EIP-1271 wallets are checked on chain (verification.py)
        )
    except PaymentRejected as exc:
        raise _Invalid(exc.reason, exc.message, payer) from None
    return verified, conf, raw_req


def _resource(payload: dict[str, Any], raw_req: dict[str, Any]) -> Resource:
    res = payload.get("resource")
    url = res.get("url") if isinstance(res, dict) else raw_req.get("resource")
    return Resource(url=str(url or "")[:512])


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


class FacilitatorVerify(APIView):
    permission_classes = [FacilitatorToken]

    @facilitator_schema
    def post(self, request: Request) -> Response:
        try:
            verified, conf, _ = _parse(request.data)
            if ledger.find(verified) is None:
                verify_on_chain(conf, verified)
        except _Invalid as exc:
            return Response(
                {
                    "isValid": False,
                    "invalidReason": exc.reason,
                    "invalidMessage": exc.message,
                    "payer": exc.payer,
                }
            )
        except PaymentRejected as exc:
            return Response({"isValid": False, "invalidReason": exc.reason, "invalidMessage": exc.message})
        except ChainUnavailable:
            return Response({"detail": "chain node unavailable"}, status=503, headers={"Retry-After": "5"})
        return Response({"isValid": True, "payer": to_checksum_address(verified.payer)})


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
    permission_classes = [FacilitatorToken]

    @facilitator_schema
    def post(self, request: Request) -> Response:
        network = (
            str(request.data.get("paymentRequirements", {}).get("network", ""))
            if isinstance(request.data, dict)
            else ""
        )
        try:
            verified, conf, raw_req = _parse(request.data)
            payment = ledger.find(verified)
            if payment is None:
                verify_on_chain(conf, verified)
                payment = self._record(verified, request.data["paymentPayload"], raw_req)
        except _Invalid as exc:
            return Response(_settle_failure(exc.reason, exc.message, network, exc.payer))
        except PaymentRejected as exc:
            return Response(_settle_failure(exc.reason, exc.message, network, None))
        except ChainUnavailable:
            return Response({"detail": "chain node unavailable"}, status=503, headers={"Retry-After": "5"})
        if payment.signature != "0x" + verified.payload.signature.hex():
            return Response(
                _settle_failure(
                    "invalid_exact_evm_nonce_already_used",
                    "this authorization was recorded with another signature",
                    network,
                    payment.payer,
                )
            )
        try:
            payment = settlement.settle(payment.pk, wait_seconds=settings.X402_FACILITATOR_SETTLE_WAIT)
        except ChainUnavailable:
            payment.refresh_from_db()
        return Response(self._answer(payment, network))

    @staticmethod
    def _record(verified: VerifiedPayment, raw_payload: dict[str, Any], raw_req: dict[str, Any]) -> Payment:
        blob = json.dumps(raw_payload, sort_keys=True, separators=(",", ":")).encode()
        try:
            with transaction.atomic():
                return ledger.record(
                    verified,
                    resource=_resource(raw_payload, raw_req),
                    fingerprint=hashlib.sha256(blob).hexdigest(),
                    verification="facilitator-api",
                )
        except IntegrityError:
            return ledger.find(verified)  # type: ignore[return-value]

    @staticmethod
    def _answer(p: Payment, network: str) -> dict[str, Any]:
        base = {
            "transaction": p.settle_tx_hash or "",
            "network": network,
            "payer": p.payer,
            "amount": str(p.amount),
        }
        if p.status in (S.SETTLED, S.CONFIRMED):
            return {"success": True, **base}
        if p.status in (S.VERIFIED, S.SETTLING):
            return {"success": False, "errorReason": "settlement_pending", **base}
        return {
            "success": False,
            "errorReason": "transaction_failed",
            "errorMessage": p.failure_reason,
            **base,
        }


class FacilitatorSupported(APIView):
    permission_classes = [FacilitatorToken]

    @extend_schema(tags=["facilitator"], responses={200: {"type": "object"}, 403: {"type": "object"}})
    def get(self, request: Request) -> Response:
        kinds = []
        for c in configured():
            kinds.append({"x402Version": 2, "scheme": "exact", "network": c.option.network})
            kinds.append({"x402Version": 1, "scheme": "exact", "network": c.option.v1_network})
        signers = [relayer_account(settings.X402_RELAYER_KEY).address] if settings.X402_RELAYER_KEY else []
        return Response({"kinds": kinds, "extensions": [], "signers": {"eip155:*": signers}})
