"""x402 wire types, v1 and v2, and their JSON shapes. What differs per scheme (the ``extra`` of
a requirement, the shape of a payload) is the scheme's :class:`~.mechanisms.WireScheme`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import mechanisms
from .codec import DecodeError
from .eip712 import Authorization
from .networks import caip2, v1_name
from .permit2 import UptoPermit

#: The built-in schemes' names (defined once here: the pure side and the Django side both name
#: them; their behaviour is in ``exact.py``/``upto.py`` and ``payments/schemes``).
SCHEME_EXACT = "exact"
SCHEME_UPTO = "upto"
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
    #: ``extra`` of a scheme whose terms are not the option's (``batch-settlement``: the
    #: channel's receiverAuthorizer, withdrawDelay, minDeposit; a corrective 402's channel state).
    terms: tuple[tuple[str, Any], ...] = ()

    @property
    def max_timeout_seconds(self) -> int:
        return max(self.option.max_timeout_seconds, self.hold_seconds + HOLD_SLACK_SECONDS)

    def extra(self) -> dict[str, Any]:
        extra = {"name": self.option.asset_name, "version": self.option.asset_version, **dict(self.terms)}
        scheme = mechanisms.get(self.scheme)
        return extra | scheme.extra(self) if scheme is not None else extra

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
            "scheme": self.scheme,
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
        # v1 clients see only the schemes v1 carries (not ``upto``: the fixed-price options).
        "accepts": [r.v1(resource, output_schema) for r in requirements if mechanisms.get(r.scheme, 1) is not None],
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


def str_field(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise DecodeError(f"{key} must be a string")
    return value


def address_field(obj: dict[str, Any], key: str) -> bytes:
    value = str_field(obj, key)
    if not _ADDRESS.fullmatch(value):
        raise DecodeError(f"{key} must be a 0x-prefixed 20-byte hex address")
    return bytes.fromhex(value[2:])


def uint_field(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    # Integers are decimal strings on the wire; plain JSON integers are tolerated, floats,
    # booleans, exponents and signs are not.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DecodeError(f"{key} must be a decimal string")
    text = str(value)
    if not _UINT.fullmatch(text) or int(text) > UINT256_MAX:
        raise DecodeError(f"{key} must be a uint256 decimal string")
    return int(text)


def resource_path(obj: dict[str, Any]) -> str | None:
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
    """Type-check a decoded payment header of either generation, in its scheme's shape."""
    version = obj.get("x402Version")
    if isinstance(version, bool) or version not in (1, 2):
        raise DecodeError("x402Version must be 1 or 2")
    accepted: dict[str, Any] | None = None
    if version == 2:
        accepted = obj.get("accepted")
        if not isinstance(accepted, dict):
            raise DecodeError("accepted must be an object")
    where = named_in(obj)
    name, _network = str_field(where, "scheme"), str_field(where, "network")  # both checked first
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise DecodeError("payload must be an object")
    scheme = mechanisms.get(name, version)
    # A scheme we do not speak is read in the EIP-3009 shape, x402's first: verification then
    # refuses it as unsupported.
    return scheme.parse(obj, payload, accepted) if scheme is not None else parse_authorization(obj, payload, accepted)


def named_in(obj: dict[str, Any]) -> dict[str, Any]:
    """Where a decoded header names its scheme and network: v2's ``accepted``, v1's top level."""
    accepted = obj.get("accepted")
    return accepted if obj.get("x402Version") == 2 and isinstance(accepted, dict) else obj


def parse_authorization(obj: dict[str, Any], payload: dict[str, Any], accepted: dict[str, Any] | None) -> PaymentPayload:
    """A payload holding an EIP-3009 ``{authorization: {from, to, value, validAfter,
    validBefore, nonce}, signature}``."""
    version = obj["x402Version"]
    auth = payload.get("authorization")
    if not isinstance(auth, dict):
        raise DecodeError("payload.authorization must be an object")
    signature = signature_field(payload)
    nonce = str_field(auth, "nonce")
    if not _NONCE.fullmatch(nonce):
        raise DecodeError("authorization.nonce must be 0x-prefixed 32-byte hex")
    return PaymentPayload(
        resource_path=resource_path(obj) if version == 2 else None,
        x402_version=version,
        scheme=str_field(named_in(obj), "scheme"),
        network=str_field(named_in(obj), "network"),
        signature=signature,
        authorization=Authorization(
            from_=address_field(auth, "from"),
            to=address_field(auth, "to"),
            value=uint_field(auth, "value"),
            valid_after=uint_field(auth, "validAfter"),
            valid_before=uint_field(auth, "validBefore"),
            nonce=bytes.fromhex(nonce[2:]),
        ),
        accepted=accepted,
        raw=obj,
    )


def signature_field(payload: dict[str, Any]) -> bytes:
    signature = str_field(payload, "signature")
    if not _HEX.fullmatch(signature) or len(signature) > 2 + 2 * 4096:
        raise DecodeError("payload.signature must be 0x-prefixed hex")
    return bytes.fromhex(signature[2:])


def object_field(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise DecodeError(f"{key} must be an object")
    return value
