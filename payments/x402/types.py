"""x402 wire types for the ``exact`` (EIP-3009) and ``upto`` (Permit2) EVM schemes, v1 and v2,
and their JSON shapes. ``upto`` exists in v2 only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .codec import DecodeError
from .eip712 import Authorization
from .networks import caip2, v1_name
from .permit2 import UptoPermit

SCHEME_EXACT = "exact"
SCHEME_UPTO = "upto"
#: ``extra.assetTransferMethod`` of an ``upto`` requirement (the SDK's spelling).
PERMIT2_TRANSFER_METHOD = "permit2"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX = re.compile(r"0x(?:[0-9a-fA-F]{2})+")
_UINT = re.compile(r"[0-9]{1,78}")
UINT256_MAX = 2**256 - 1
#: Room a held payment's ``maxTimeoutSeconds`` leaves beyond the hold (queueing, settlement).
HOLD_SLACK_SECONDS = 120


@dataclass(frozen=True, slots=True)
class PaymentOption:
    """One way we accept money: an EIP-3009 token on one chain, paid to one address."""

    chain_id: int
    asset: str
    asset_name: str
    asset_version: str
    pay_to: str
    decimals: int = 6
    symbol: str = "USDC"
    max_timeout_seconds: int = 300
    confirmations: int = 1

    @property
    def network(self) -> str:
        return caip2(self.chain_id)

    @property
    def v1_network(self) -> str:
        return v1_name(self.chain_id)

    def matches_network(self, network: str, x402_version: int) -> bool:
        return network == (self.network if x402_version >= 2 else self.v1_network)


@dataclass(frozen=True, slots=True)
class Resource:
    url: str
    description: str = ""
    mime_type: str = "application/json"

    def v2(self) -> dict[str, Any]:
        return {"url": self.url, "description": self.description, "mimeType": self.mime_type}


@dataclass(frozen=True, slots=True)
class Requirement:
    """What one request costs through one payment option.

    ``hold_seconds``: how long after acceptance the authorization must still be settleable
    beyond the settle margin (a run that is settled only after it finishes); the challenge's
    ``maxTimeoutSeconds`` grows to leave the payer room for it.

    ``scheme`` ``upto``: ``amount`` is the maximum the payer permits; the charge, settled after
    the run, is at most that. ``facilitators`` are the addresses that may settle it (our relayer
    lanes: the upto proxy lets only the witness's ``facilitator`` call it); the challenge names
    the first, a payment naming any of them is accepted.
    """

    option: PaymentOption
    amount: int
    hold_seconds: int = 0
    scheme: str = SCHEME_EXACT
    facilitators: tuple[str, ...] = ()

    @property
    def max_timeout_seconds(self) -> int:
        return max(self.option.max_timeout_seconds, self.hold_seconds + HOLD_SLACK_SECONDS)

    def extra(self) -> dict[str, str]:
        extra = {"name": self.option.asset_name, "version": self.option.asset_version}
        if self.scheme == SCHEME_UPTO:
            extra["assetTransferMethod"] = PERMIT2_TRANSFER_METHOD
            extra["facilitatorAddress"] = self.facilitators[0]
        return extra

    def v2(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "network": self.option.network,
            "amount": str(self.amount),
            "asset": self.option.asset,
            "payTo": self.option.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": self.extra(),
        }

    def v1(self, resource: Resource, output_schema: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "scheme": SCHEME_EXACT,
            "network": self.option.v1_network,
            "maxAmountRequired": str(self.amount),
            "resource": resource.url,
            "description": resource.description,
            "mimeType": resource.mime_type,
            "payTo": self.option.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "asset": self.option.asset,
            "extra": self.extra(),
        }
        if output_schema is not None:
            body["outputSchema"] = output_schema
        return body


def wire_requirement(req: Requirement, version: int, resource: Resource) -> dict[str, Any]:
    """The requirement in the shape of the payload's protocol version."""
    return req.v2() if version >= 2 else req.v1(resource)


def payment_required_v2(
    requirements: list[Requirement],
    resource: Resource,
    error: str,
    extensions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "x402Version": 2,
        "error": error,
        "resource": resource.v2(),
        "accepts": [r.v2() for r in requirements],
    }
    if extensions:
        body["extensions"] = extensions
    return body


def payment_required_v1(
    requirements: list[Requirement],
    resource: Resource,
    error: str,
    output_schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "x402Version": 1,
        "error": error,
        # v1 has no ``upto``: its clients see the fixed-price options only.
        "accepts": [r.v1(resource, output_schema) for r in requirements if r.scheme == SCHEME_EXACT],
    }


def settle_response(
    *,
    success: bool,
    transaction: str,
    network: str,
    payer: str | None,
    amount: int | None = None,
    error_reason: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"success": success, "transaction": transaction, "network": network}
    if payer:
        body["payer"] = payer
    if amount is not None:
        body["amount"] = str(amount)
    if error_reason:
        body["errorReason"] = error_reason
    return body


@dataclass(frozen=True, slots=True)
class PaymentPayload:
    """A decoded ``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1) header, fields type-checked."""

    x402_version: int
    scheme: str
    network: str
    signature: bytes
    authorization: Authorization
    accepted: dict[str, Any] | None = None
    #: v2: the path of the resource the payer says it paid for (None when it names none).
    resource_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    #: ``upto``: the signed Permit2 message. ``authorization`` then holds its common fields
    #: (owner, witness ``to``, maximum, ``validAfter``, deadline as ``validBefore``, the nonce as
    #: 32 bytes) so that the ledger records both schemes alike.
    permit: UptoPermit | None = None


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise DecodeError(f"{key} must be a string")
    return value


def _address(obj: dict[str, Any], key: str) -> bytes:
    value = _str(obj, key)
    if not _ADDRESS.fullmatch(value):
        raise DecodeError(f"{key} must be a 0x-prefixed 20-byte hex address")
    return bytes.fromhex(value[2:])


def _uint(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    # Integers are decimal strings on the wire; plain JSON integers are tolerated, floats,
    # booleans, exponents and signs are not.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DecodeError(f"{key} must be a decimal string")
    text = str(value)
    if not _UINT.fullmatch(text) or int(text) > UINT256_MAX:
        raise DecodeError(f"{key} must be a uint256 decimal string")
    return int(text)


def _resource_path(obj: dict[str, Any]) -> str | None:
    resource = obj.get("resource")
    if resource is None:
        return None
    if not isinstance(resource, dict):
        raise DecodeError("resource must be an object")
    url = resource.get("url")
    if url is None:
        return None
    if not isinstance(url, str) or len(url) > 2048:
        raise DecodeError("resource.url must be a URL")
    try:
        return urlsplit(url).path
    except ValueError:
        raise DecodeError("resource.url is not a URL") from None


def parse_payload(obj: dict[str, Any]) -> PaymentPayload:
    """Type-check a decoded payment header of either generation."""
    version = obj.get("x402Version")
    if isinstance(version, bool) or version not in (1, 2):
        raise DecodeError("x402Version must be 1 or 2")
    accepted: dict[str, Any] | None = None
    if version == 2:
        accepted = obj.get("accepted")
        if not isinstance(accepted, dict):
            raise DecodeError("accepted must be an object")
        scheme, network = _str(accepted, "scheme"), _str(accepted, "network")
    else:
        scheme, network = _str(obj, "scheme"), _str(obj, "network")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise DecodeError("payload must be an object")
    if version == 2 and scheme == SCHEME_UPTO:
        return _parse_upto(obj, payload, accepted or {}, network)
    auth = payload.get("authorization")
    if not isinstance(auth, dict):
        raise DecodeError("payload.authorization must be an object")
    signature = _signature(payload)
    nonce = _str(auth, "nonce")
    if not _NONCE.fullmatch(nonce):
        raise DecodeError("authorization.nonce must be 0x-prefixed 32-byte hex")
    return PaymentPayload(
        resource_path=_resource_path(obj) if version == 2 else None,
        x402_version=version,
        scheme=scheme,
        network=network,
        signature=signature,
        authorization=Authorization(
            from_=_address(auth, "from"),
            to=_address(auth, "to"),
            value=_uint(auth, "value"),
            valid_after=_uint(auth, "validAfter"),
            valid_before=_uint(auth, "validBefore"),
            nonce=bytes.fromhex(nonce[2:]),
        ),
        accepted=accepted,
        raw=obj,
    )


def _signature(payload: dict[str, Any]) -> bytes:
    signature = _str(payload, "signature")
    if not _HEX.fullmatch(signature) or len(signature) > 2 + 2 * 4096:
        raise DecodeError("payload.signature must be 0x-prefixed hex")
    return bytes.fromhex(signature[2:])


def _object(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise DecodeError(f"{key} must be an object")
    return value


def _parse_upto(obj: dict[str, Any], payload: dict[str, Any], accepted: dict[str, Any], network: str) -> PaymentPayload:
    """An ``upto`` payload: ``{permit2Authorization: {from, permitted: {token, amount}, spender,
    nonce (a decimal uint256), deadline, witness: {to, facilitator, validAfter}}, signature}``."""
    auth = _object(payload, "permit2Authorization")
    permitted, witness = _object(auth, "permitted"), _object(auth, "witness")
    permit = UptoPermit(
        owner=_address(auth, "from"),
        token=_address(permitted, "token"),
        maximum=_uint(permitted, "amount"),
        spender=_address(auth, "spender"),
        nonce=_uint(auth, "nonce"),
        deadline=_uint(auth, "deadline"),
        to=_address(witness, "to"),
        facilitator=_address(witness, "facilitator"),
        valid_after=_uint(witness, "validAfter"),
    )
    return PaymentPayload(
        resource_path=_resource_path(obj),
        x402_version=2,
        scheme=SCHEME_UPTO,
        network=network,
        signature=_signature(payload),
        authorization=Authorization(
            from_=permit.owner,
            to=permit.to,
            value=permit.maximum,
            valid_after=permit.valid_after,
            valid_before=permit.deadline,
            nonce=permit.nonce.to_bytes(32, "big"),
        ),
        accepted=accepted,
        raw=obj,
        permit=permit,
    )
