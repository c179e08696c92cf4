"""Build signed payment headers in tests, with eth-account's own EIP-712 encoder.

Signing with an implementation other than ours makes every accepted payment a cross-check of
payments.x402.eip712.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from eth_account import Account

from payments.x402.codec import encode_header
from payments.x402.types import Requirement


def sign_authorization(
    key: str,
    req: Requirement,
    *,
    value: int | None = None,
    to: str | None = None,
    valid_after: int = 0,
    valid_before: int | None = None,
    nonce: str | None = None,
    domain: dict[str, Any] | None = None,
    from_: str | None = None,
) -> dict[str, Any]:
    """The ``payload`` object ({signature, authorization}) for ``req``, overridable per field.

    ``from_`` names another payer than the signer (a contract wallet whose owner signs).
    """
    account = Account.from_key(key)
    opt = req.option
    message = {
        "from": from_ or account.address,
        "to": to or opt.pay_to,
        "value": req.amount if value is None else value,
        "validAfter": valid_after,
        "validBefore": valid_before if valid_before is not None else int(time.time()) + 120,
        "nonce": bytes.fromhex((nonce or "0x" + secrets.token_hex(32))[2:]),
    }
    domain_data = {
        "name": opt.asset_name,
        "version": opt.asset_version,
        "chainId": opt.chain_id,
        "verifyingContract": opt.asset,
        **(domain or {}),
    }
    types = {
        "TransferWithAuthorization": [
            {"name": "from", "type": "address"},
            {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"},
            {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"},
            {"name": "nonce", "type": "bytes32"},
        ]
    }
    signed = Account.sign_typed_data(key, domain_data, types, message)
    return {
        "signature": "0x" + bytes(signed.signature).hex(),
        "authorization": {
            "from": message["from"],
            "to": message["to"],
            "value": str(message["value"]),
            "validAfter": str(message["validAfter"]),
            "validBefore": str(message["validBefore"]),
            "nonce": "0x" + message["nonce"].hex(),
        },
    }


def v2_payload(req: Requirement, payload: dict[str, Any], resource_url: str | None = None) -> dict:
    body: dict[str, Any] = {"x402Version": 2, "accepted": req.v2(), "payload": payload}
    if resource_url is not None:
        body["resource"] = {"url": resource_url, "description": "", "mimeType": "application/json"}
    return body


def v1_payload(req: Requirement, payload: dict[str, Any]) -> dict:
    return {"x402Version": 1, "scheme": "exact", "network": req.option.v1_network, "payload": payload}


def v2_header(key: str, req: Requirement, **kw: Any) -> str:
    return encode_header(v2_payload(req, sign_authorization(key, req, **kw)))


def v1_header(key: str, req: Requirement, **kw: Any) -> str:
    return encode_header(v1_payload(req, sign_authorization(key, req, **kw)))


def record(key: str, req: Requirement, fingerprint: str = "test", **sign: Any):  # type: ignore[no-untyped-def]
    """Sign, verify (pure and on chain, as the gate does) and record a payment in the ledger."""
    from django.db import transaction

    from payments import ledger, verification
    from payments.x402.types import Resource, parse_payload

    payload = parse_payload(v2_payload(req, sign_authorization(key, req, **sign)))
    resource = Resource("http://test/")
    verified = verification.verify(payload, [req], resource)
    with transaction.atomic():
        return ledger.record(verified, resource=resource, fingerprint=fingerprint)


def v2_header_for(key: str, payment_required: str, **sign: Any) -> str:
    """Pay the first requirement of a ``PAYMENT-REQUIRED`` header as the official v2 clients do:
    echo it as ``accepted`` and sign ``validBefore = now + maxTimeoutSeconds``."""
    from payments.x402.codec import decode_header
    from payments.x402.networks import chain_id_of
    from payments.x402.types import PaymentOption

    accepted = decode_header(payment_required)["accepts"][0]
    option = PaymentOption(
        chain_id=chain_id_of(accepted["network"]),
        asset=accepted["asset"],
        asset_name=accepted["extra"]["name"],
        asset_version=accepted["extra"]["version"],
        pay_to=accepted["payTo"],
    )
    req = Requirement(option, int(accepted["amount"]))
    sign.setdefault("valid_before", int(time.time()) + accepted["maxTimeoutSeconds"])
    body = {"x402Version": 2, "accepted": accepted, "payload": sign_authorization(key, req, **sign)}
    return encode_header(body)
