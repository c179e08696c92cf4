"""Sign ``upto`` (Permit2) payments in tests with the official x402 SDK's client."""

from __future__ import annotations

from typing import Any

from eth_account import Account

from payments.x402.types import Requirement


def sdk_upto_payload(key: str, req: Requirement, **overrides: Any) -> dict[str, Any]:
    """The SDK upto client's ``payload`` for ``req`` (``overrides`` replace fields of the
    requirement it is given, e.g. another ``pay_to`` or ``asset``)."""
    from x402.mechanisms.evm.upto import UptoEvmClientScheme
    from x402.schemas import PaymentRequirements

    wire = req.v2()
    fields = {
        "scheme": wire["scheme"],
        "network": wire["network"],
        "asset": wire["asset"],
        "amount": wire["amount"],
        "pay_to": wire["payTo"],
        "max_timeout_seconds": wire["maxTimeoutSeconds"],
        "extra": wire["extra"],
        **overrides,
    }
    return UptoEvmClientScheme(Account.from_key(key)).create_payment_payload(PaymentRequirements(**fields))


def upto_body(req: Requirement, payload: dict[str, Any], resource_url: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"x402Version": 2, "accepted": req.v2(), "payload": payload}
    if resource_url is not None:
        body["resource"] = {"url": resource_url, "description": "", "mimeType": "application/json"}
    return body


def settle_args(payload: dict[str, Any], amount: int) -> list[Any]:
    """``settle(permit, amount, owner, witness, signature)`` arguments from an SDK payload."""
    from eth_utils import to_checksum_address

    auth = payload["permit2Authorization"]
    witness = auth["witness"]
    return [
        (
            (to_checksum_address(auth["permitted"]["token"]), int(auth["permitted"]["amount"])),
            int(auth["nonce"]),
            int(auth["deadline"]),
        ),
        amount,
        to_checksum_address(auth["from"]),
        (to_checksum_address(witness["to"]), to_checksum_address(witness["facilitator"]), int(witness["validAfter"])),
        bytes.fromhex(payload["signature"][2:]),
    ]


def sign_upto(key: str, req: Requirement, *, now: int | None = None, **fields: Any) -> dict[str, Any]:
    """An upto ``payload`` for ``req`` signed with eth-account's EIP-712 encoder and the SDK's
    type definitions, any field overridable (``token``, ``amount``, ``spender``, ``nonce``,
    ``deadline``, ``to``, ``facilitator``, ``valid_after``, ``from_``, ``chain_id``)."""
    import secrets
    import time

    from x402.mechanisms.evm.constants import UPTO_PERMIT2_WITNESS_TYPES

    from payments.x402.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

    account = Account.from_key(key)
    now = int(time.time()) if now is None else now
    v = {
        "token": req.option.asset,
        "amount": req.amount,
        "spender": UPTO_PROXY_ADDRESS,
        "nonce": secrets.randbits(256),
        "deadline": now + req.max_timeout_seconds,
        "to": req.option.pay_to,
        "facilitator": req.facilitators[0],
        "valid_after": 0,
        "from_": account.address,
        "chain_id": req.option.chain_id,
        **fields,
    }
    message = {
        "permitted": {"token": v["token"], "amount": v["amount"]},
        "spender": v["spender"],
        "nonce": v["nonce"],
        "deadline": v["deadline"],
        "witness": {"to": v["to"], "facilitator": v["facilitator"], "validAfter": v["valid_after"]},
    }
    domain = {"name": "Permit2", "chainId": v["chain_id"], "verifyingContract": PERMIT2_ADDRESS}
    signed = Account.sign_typed_data(key, domain, UPTO_PERMIT2_WITNESS_TYPES, message)
    return {
        "permit2Authorization": {
            "from": v["from_"],
            "permitted": {"token": v["token"], "amount": str(v["amount"])},
            "spender": v["spender"],
            "nonce": str(v["nonce"]),
            "deadline": str(v["deadline"]),
            "witness": {"to": v["to"], "facilitator": v["facilitator"], "validAfter": str(v["valid_after"])},
        },
        "signature": "0x" + bytes(signed.signature).hex(),
    }
