"""Bearer tokens from settings, as DRF authentication: one class, parameterised by the setting
that lists the tokens (operators, facilitator clients, ops).

A token that is not one of the setting's is not an error: the request goes on unauthenticated.
An agent's replicate client always sends its own API token, and must meet the 402 challenge,
not a 401. Plain Django views (ops endpoints) and transports outside DRF (MCP) ask the same
class with ``holds``.
"""

import hmac
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from django.http import HttpRequest
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from x402site.conf import x402


@dataclass(frozen=True, slots=True)
class TokenHolder:
    """Whoever presented one of a setting's tokens (``request.user`` under DRF)."""

    role: str
    is_authenticated: bool = True


class BearerToken(BaseAuthentication):
    """``Authorization: Bearer <token>`` with a token of the role's (``x402.tokens.<role>``, from
    the ``setting``); ``request.auth`` is the role. Compared in constant time."""

    #: The Django setting that lists the tokens.
    setting: ClassVar[str]
    #: Also the token list's name in ``x402.tokens``.
    role: ClassVar[str]
    schemes: ClassVar[frozenset[str]] = frozenset({"bearer"})

    @classmethod
    def holds(cls, request: HttpRequest | Request) -> bool:
        tokens = getattr(x402.tokens, cls.role)
        if not tokens:
            return False
        scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        given_bytes = given.strip().encode("utf-8", "surrogatepass")  # compare_digest: str must be ASCII
        return scheme.lower() in cls.schemes and any(hmac.compare_digest(given_bytes, t.encode()) for t in tokens)

    def authenticate(self, request: Request) -> tuple[TokenHolder, str] | None:
        return (TokenHolder(self.role), self.role) if self.holds(request) else None

    def authenticate_header(self, request: Request) -> str:
        return f'Bearer realm="{self.role}"'


class OperatorToken(BearerToken):
    """``X402_OPERATOR_TOKENS``: our own staff and integrations run without payment and list
    everything (the replicate client with an API token; ``Token`` is its older scheme)."""

    setting = "X402_OPERATOR_TOKENS"
    role = "operator"
    schemes = frozenset({"bearer", "token"})


class FacilitatorToken(BearerToken):
    """``X402_FACILITATOR_TOKENS``: clients of our facilitator API (``/facilitator/...``)."""

    setting = "X402_FACILITATOR_TOKENS"
    role = "facilitator"


class OpsToken(BearerToken):
    """``X402_OPS_TOKENS``: monitoring (``/metrics``, ``/readyz`` details)."""

    setting = "X402_OPS_TOKENS"
    role = "ops"


def has_role(request: HttpRequest | Request, authentication: type[BearerToken]) -> bool:
    """Whether the request presented one of ``authentication``'s tokens: DRF's verdict for a DRF
    request authenticated by that class, the header itself elsewhere."""
    if isinstance(request, Request) and any(isinstance(a, authentication) for a in request.authenticators):
        return request.auth == authentication.role
    return authentication.holds(request)


def is_operator(request: Any) -> bool:
    return has_role(request, OperatorToken)


class _BearerScheme(OpenApiAuthenticationExtension):
    """The OpenAPI security scheme of a ``BearerToken`` class."""

    target_class = BearerToken
    match_subclasses = True
    priority = -1

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": inspect.getdoc(self.target_class) or ""}


class OperatorScheme(_BearerScheme):
    target_class = OperatorToken
    name = "operatorToken"
    priority = 0


class FacilitatorScheme(_BearerScheme):
    target_class = FacilitatorToken
    name = "facilitatorToken"
    priority = 0


class SignInWithXScheme(OpenApiAuthenticationExtension):
    target_class = "predictions.auth.SignInWithX"
    name = "signInWithX"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "SIGN-IN-WITH-X",
            "description": "An x402 sign-in-with-x proof (EIP-4361, used once): lists the payer's own predictions.",
        }
