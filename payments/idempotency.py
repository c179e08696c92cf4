"""The x402 ``payment-identifier`` extension: an agent's idempotency key for a paid request.

New id: processed. Same id and same payload: the same answer (the prediction it bought). Same
id, another payload: 409. An id of the wrong shape: 400. Keys are database rows that expire.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Any

from django.utils import timezone
from eth_utils import to_checksum_address
from rest_framework import exceptions

from payments.models import Payment, PaymentIdentifier
from payments.x402.types import PaymentPayload

EXTENSION = "payment-identifier"
_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
#: How long a key is remembered.
TTL = timedelta(days=1)

ADVERTISED = {
    EXTENSION: {
        "info": {"required": False},
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "required": {"type": "boolean"},
                "id": {"type": "string", "minLength": 16, "maxLength": 128},
            },
            "required": ["required"],
        },
    }
}


class IdempotencyConflict(exceptions.APIException):
    status_code = 409
    default_detail = "This payment-identifier was already used with a different payment payload."


def identifier_of(payload: PaymentPayload) -> str | None:
    """The payload's payment-identifier id, if it carries one (400 if malformed)."""
    extensions = payload.raw.get("extensions")
    if not isinstance(extensions, dict) or EXTENSION not in extensions:
        return None
    info = extensions[EXTENSION].get("info") if isinstance(extensions[EXTENSION], dict) else None
    value = info.get("id") if isinstance(info, dict) else None
    if value is None:
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise exceptions.ValidationError(
            {"payment-identifier": "id must be 16-128 characters of letters, digits, '-' and '_'"}
        )
    return value


def redact_payload(raw: Any) -> Any:
    """A stored payload fit to show staff: the payment-identifier id (a replay key) removed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("extensions"), dict):
        return raw
    extension = raw["extensions"].get(EXTENSION)
    if not isinstance(extension, dict) or not isinstance(extension.get("info"), dict):
        return raw
    info = {**extension["info"], "id": "[redacted]"} if "id" in extension["info"] else extension["info"]
    return {**raw, "extensions": {**raw["extensions"], EXTENSION: {**extension, "info": info}}}


def payload_digest(payload: PaymentPayload) -> str:
    return hashlib.sha256(json.dumps(payload.raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lookup(payload: PaymentPayload) -> Payment | None:
    """The payment an earlier request with this id bought; 409 if that request differed."""
    identifier = identifier_of(payload)
    if identifier is None:
        return None
    row = (
        PaymentIdentifier.objects.select_related("payment")
        .filter(
            payer=to_checksum_address(payload.authorization.from_),
            identifier=identifier,
            expires_at__gt=timezone.now(),
        )
        .first()
    )
    if row is None:
        return None
    if row.payload_sha256 != payload_digest(payload):
        raise IdempotencyConflict()
    return row.payment


def remember(payment: Payment, payload: PaymentPayload) -> None:
    """Store the key with its payment (inside the recording transaction)."""
    identifier = identifier_of(payload)
    if identifier is None:
        return
    PaymentIdentifier.objects.filter(
        payer=payment.payer, identifier=identifier, expires_at__lte=timezone.now()
    ).delete()
    PaymentIdentifier.objects.create(
        payer=payment.payer,
        identifier=identifier,
        payload_sha256=payload_digest(payload),
        payment=payment,
        expires_at=timezone.now() + TTL,
    )
