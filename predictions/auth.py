"""How an agent proves which payer it is, to list its own predictions: x402's
``sign-in-with-x`` extension (CAIP-122: an EIP-4361 "Sign in with Ethereum" message, signed
with EIP-191), sent base64 JSON in the ``SIGN-IN-WITH-X`` header.

A proof is bound to this deployment and used once: its ``domain`` must be the host of
``X402_PUBLIC_URL`` and its ``uri`` on that origin, it is fresh (``issuedAt`` within five
minutes, ``expirationTime`` and ``notBefore`` honoured), and its nonce is claimed in the shared
cache, so a proof made for another deployment, or captured and sent again, is refused. A
request without a proof gets 401 with the ``sign-in-with-x`` declaration in ``extensions``
(the fields to sign, with a fresh nonce), as a 402 carries it in x402.

The message signed is EIP-4361's, from the proof's fields (README, "Listing")::

    {domain} wants you to sign in with your Ethereum account:
    {address}

    {statement}

    URI: {uri}
    Version: 1
    Chain ID: {chainId without "eip155:"}
    Nonce: {nonce}
    Issued At: {issuedAt}
    [Expiration Time: {expirationTime}]
    [Not Before: {notBefore}]
    [Request ID: {requestId}]
    [Resources:
    - {resource}...]
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from django.core.cache import cache
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_address, to_checksum_address
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import APIException, PermissionDenied
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request

from payments.options import configured
from payments.x402.codec import DecodeError, decode_header
from x402site.conf import x402

HEADER = "SIGN-IN-WITH-X"
EXTENSION = "sign-in-with-x"
WINDOW_SECONDS = 300
STATEMENT = "List the predictions my payments bought."
_NONCE = re.compile(r"[A-Za-z0-9]{8,64}")
_CHAIN = re.compile(r"eip155:([0-9]{1,18})")
_MAX_FIELD = 512
_REQUIRED = ("domain", "address", "uri", "version", "chainId", "type", "nonce", "issuedAt", "signature")
_OPTIONAL = ("statement", "expirationTime", "notBefore", "requestId")
#: The JSON Schema of a proof, as the x402 SDK declares it.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        **{name: {"type": "string"} for name in (*_REQUIRED, *_OPTIONAL)},
        "resources": {"type": "array", "items": {"type": "string", "format": "uri"}},
    },
    "required": list(_REQUIRED),
}


class AuthenticationRequired(APIException):
    """401 (DRF turns its own NotAuthenticated into 403 when no authenticator is configured)."""

    status_code = 401
    default_detail = "Authentication required."


class SignInRequired(AuthenticationRequired):
    """401 carrying the ``sign-in-with-x`` declaration the client signs."""

    def __init__(self, detail: str, extensions: dict[str, Any]) -> None:
        super().__init__(detail)
        self.extensions = extensions


class Refused(PermissionDenied):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True, slots=True)
class SignIn:
    """A ``SIGN-IN-WITH-X`` proof, fields type-checked."""

    domain: str
    address: str
    uri: str
    version: str
    chain_id: str
    nonce: str
    issued_at: str
    signature: str
    statement: str | None = None
    expiration_time: str | None = None
    not_before: str | None = None
    request_id: str | None = None
    resources: tuple[str, ...] = ()

    @classmethod
    def parse(cls, header: str) -> SignIn:
        try:
            obj = decode_header(header)
        except DecodeError as exc:
            raise Refused("invalid_siwx_payload", f"{HEADER} must be base64 JSON ({exc})") from None
        fields: dict[str, Any] = {}
        for name in (*_REQUIRED, *_OPTIONAL):
            value = obj.get(name)
            if value is None and name in _OPTIONAL:
                continue
            if not isinstance(value, str) or not 0 < len(value) <= _MAX_FIELD or "\n" in value or "\r" in value:
                raise Refused("invalid_siwx_payload", f"{name} must be one line of text")
            fields[name] = value
        resources = obj.get("resources") or []
        if not isinstance(resources, list) or not all(
            isinstance(r, str) and 0 < len(r) <= _MAX_FIELD and "\n" not in r and "\r" not in r for r in resources
        ):
            raise Refused("invalid_siwx_payload", "resources must be a list of URIs")
        if fields["type"] != "eip191" or fields["version"] != "1":
            raise Refused("invalid_siwx_payload", "only version 1 proofs signed with EIP-191 are accepted")
        if not _CHAIN.fullmatch(fields["chainId"]):
            raise Refused("invalid_siwx_chain_id", "chainId must be eip155:<number>")
        if not is_address(fields["address"]):
            raise Refused("invalid_siwx_payload", "address must be an EVM address")
        if not _NONCE.fullmatch(fields["nonce"]):
            raise Refused("invalid_siwx_nonce", "nonce must be 8 to 64 letters and digits")
        return cls(
            domain=fields["domain"],
            address=fields["address"],
            uri=fields["uri"],
            version=fields["version"],
            chain_id=fields["chainId"],
            nonce=fields["nonce"],
            issued_at=fields["issuedAt"],
            signature=fields["signature"],
            statement=fields.get("statement"),
            expiration_time=fields.get("expirationTime"),
            not_before=fields.get("notBefore"),
            request_id=fields.get("requestId"),
            resources=tuple(resources),
        )

    def message(self) -> str:
        """The EIP-4361 message this proof's signature covers."""
        lines = [f"{self.domain} wants you to sign in with your Ethereum account:", self.address, ""]
        lines += [self.statement, ""] if self.statement else [""]
        lines += [
            f"URI: {self.uri}",
            f"Version: {self.version}",
            f"Chain ID: {self.chain_id.removeprefix('eip155:')}",
            f"Nonce: {self.nonce}",
            f"Issued At: {self.issued_at}",
        ]
        for label, value in (
            ("Expiration Time", self.expiration_time),
            ("Not Before", self.not_before),
            ("Request ID", self.request_id),
        ):
            if value:
                lines.append(f"{label}: {value}")
        if self.resources:
            lines += ["Resources:", *(f"- {r}" for r in self.resources)]
        return "\n".join(lines)


def _origin() -> tuple[str, str]:
    """This deployment's origin (``https://host``) and host, from X402_PUBLIC_URL."""
    parts = urlsplit(x402.http.public_url)
    return f"{parts.scheme}://{parts.netloc}", parts.netloc


def _time(value: str, name: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Refused(f"invalid_siwx_{name}", f"{name} must be an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def declaration(request: Request) -> dict[str, Any]:
    """The ``sign-in-with-x`` extension a 401 carries: what to sign, with a fresh nonce."""
    origin, domain = _origin()
    uri = origin + request.path
    now = datetime.now(UTC)
    networks = dict.fromkeys(c.option.network for c in configured())
    return {
        EXTENSION: {
            "info": {
                "domain": domain,
                "uri": uri,
                "version": "1",
                "statement": STATEMENT,
                "nonce": secrets.token_hex(16),
                "issuedAt": _iso(now),
                "expirationTime": _iso(now + timedelta(seconds=WINDOW_SECONDS)),
                "resources": [uri],
            },
            "supportedChains": [{"chainId": n, "type": "eip191"} for n in networks],
            "schema": SCHEMA,
        }
    }


def check(proof: SignIn, now: datetime) -> None:
    """Bound to this deployment and fresh; raises Refused with the SDK's reason codes."""
    origin, domain = _origin()
    if proof.domain != domain:
        raise Refused("invalid_siwx_domain_mismatch", f"this proof is for {proof.domain[:80]!r}, not {domain!r}")
    try:
        uri = urlsplit(proof.uri)
        uri_origin = f"{uri.scheme}://{uri.netloc}"
    except ValueError:
        uri_origin = ""
    if uri_origin != origin:
        raise Refused("invalid_siwx_uri_mismatch", f"uri must be on {origin}")
    skew = timedelta(seconds=x402.verification.clock_skew_seconds)
    issued = _time(proof.issued_at, "issued_at")
    if issued > now + skew:
        raise Refused("invalid_siwx_issued_at_in_future", "issuedAt is in the future")
    if now - issued > timedelta(seconds=WINDOW_SECONDS):
        raise Refused("invalid_siwx_issued_at_too_old", f"issuedAt is more than {WINDOW_SECONDS} s old")
    if proof.expiration_time and _time(proof.expiration_time, "expiration_time") < now:
        raise Refused("invalid_siwx_expired", "the proof has expired")
    if proof.not_before and _time(proof.not_before, "not_before") > now + skew:
        raise Refused("invalid_siwx_not_yet_valid", "notBefore is in the future")


@dataclass(frozen=True, slots=True)
class SignedInPayer:
    """A payer proven by a ``SIGN-IN-WITH-X`` proof (``request.user`` under DRF)."""

    address: str
    is_authenticated: bool = True


class SignInWithX(BaseAuthentication):
    """DRF authentication by a ``SIGN-IN-WITH-X`` proof: ``request.auth`` is the payer's
    checksummed address. No header: unauthenticated (``payer_of`` then answers 401 with the
    declaration to sign); a proof that fails: 403 (``Refused``). Read on reads only: a create
    is paid, not signed in, and must not spend a proof sent along by mistake."""

    def authenticate(self, request: Request) -> tuple[SignedInPayer, str] | None:
        if request.method not in SAFE_METHODS or not request.headers.get(HEADER):
            return None
        address = _verified_signer(request.headers[HEADER])
        return SignedInPayer(address), address

    def authenticate_header(self, request: Request) -> str:
        return HEADER


def _verified_signer(header: str) -> str:
    proof = SignIn.parse(header)
    check(proof, datetime.now(UTC))
    try:
        signer = Account.recover_message(encode_defunct(text=proof.message()), signature=proof.signature)
    except Exception:  # noqa: BLE001 - any malformed signature is a refusal
        raise Refused("invalid_siwx_signature", "the signature is malformed") from None
    if signer != to_checksum_address(proof.address):
        raise Refused("invalid_siwx_signature", "the signature was not made by address")
    # Claimed last, so nobody burns a nonce with a proof that does not verify.
    if not cache.add(f"x402:siwx:{proof.nonce}", 1, WINDOW_SECONDS + x402.verification.clock_skew_seconds):
        raise Refused("invalid_siwx_nonce", "this proof was already used; sign a new one")
    return signer


def payer_of(request: Request, what: str = "Listing") -> str:
    """The payer ``SignInWithX`` authenticated (checksummed); 401 with the declaration without a
    proof. ``what`` names what needs the proof, in the 401's detail."""
    if isinstance(request.user, SignedInPayer):
        return request.user.address
    raise SignInRequired(
        f"{what} needs an operator token, or a {HEADER} proof (x402 sign-in-with-x, EIP-4361): "
        "sign the declaration in extensions.",
        declaration(request),
    )
