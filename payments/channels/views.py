"""``GET /v1/channels/refund``: a payer's cooperative refund of its ``batch-settlement`` channel.

The x402 SDK client's ``refund(url)`` first asks the URL for its 402 (the channel requirements:
pay-to, our receiverAuthorizer, the withdraw delay, from which it rebuilds its channel), then
sends its ``refund`` payload there in ``PAYMENT-SIGNATURE``; the answer's ``PAYMENT-RESPONSE``
names the refund transaction.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from payments import ratelimit
from payments.channels import gate
from payments.exceptions import Challenge, PaymentRequired, ServiceUnavailable
from payments.options import configured
from payments.permissions import V2_HEADER
from payments.x402.codec import DecodeError, decode_header, encode_header
from payments.x402.types import Resource


class ChannelRefund(APIView):
    """Return the unused balance of the payer's channel (``type: refund``, x402 v2)."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []

    @extend_schema(exclude=True)
    def get(self, request: Request) -> Response:
        if not gate.enabled() or not configured():
            raise ServiceUnavailable("Payment channels are not offered on this server.")
        challenge = Challenge(
            requirements=gate.offers([(c, 0) for c in configured()]),
            resource=Resource(
                url=request.build_absolute_uri(request.path),
                description="Cooperative refund of a batch-settlement channel's unused balance",
                mime_type="application/json",
            ),
        )
        header = request.headers.get(V2_HEADER)
        if not header:
            ratelimit.hit(request, "challenge")
            raise challenge.reject(f"{V2_HEADER} header is required")
        try:
            obj = decode_header(header)
        except DecodeError as exc:
            ratelimit.hit(request, "failed")
            raise challenge.reject(DecodeError.reason, str(exc)) from None
        try:
            answer = gate.refund(obj, challenge)
        except PaymentRequired:
            ratelimit.hit(request, "failed")
            raise
        return Response(answer, headers={"PAYMENT-RESPONSE": encode_header(answer), "Cache-Control": "no-store"})
