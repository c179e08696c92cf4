"""The x402 schemes this package speaks, each one module holding one :class:`WireScheme` (as
the x402 SDK's ``mechanisms``): ``exact.py`` (EIP-3009) and ``upto.py`` (Permit2).

A scheme module calls :func:`register` with its object; the built-in ones are imported on
first use of the registry (:data:`BUILTIN`). The wire types (the challenge's ``extra``, the
v1 ``accepts``, the payload's shape) and the verifier look a scheme up here by its name and
never branch on it. The Django side of a scheme (chain reads, settlement, ledger) is
``payments.schemes``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .types import PaymentPayload, Requirement
    from .verify import VerifiedPayment

#: The modules that register the built-in schemes.
BUILTIN = ("payments.x402.exact", "payments.x402.upto")


class WireScheme(Protocol):
    """One x402 scheme on the wire. Implementations are stateless singletons."""

    #: The scheme's name on the wire (``accepted.scheme``).
    name: str
    #: The x402 versions that carry it (v1 clients are offered only the schemes v1 knows).
    versions: frozenset[int]

    def extra(self, req: Requirement) -> dict[str, str]:
        """What the scheme adds to a requirement's ``extra`` (besides the token's name, version)."""

    def parse(self, obj: dict[str, Any], payload: dict[str, Any], accepted: dict[str, Any] | None) -> PaymentPayload:
        """Type-check the scheme's ``payload`` object of a decoded header ``obj`` (raise
        ``DecodeError``); ``accepted`` is the requirement a v2 payload echoes (None in v1)."""

    def verify(
        self,
        payload: PaymentPayload,
        requirements: list[Requirement],
        now: int,
        *,
        settle_margin: int,
        clock_skew: int,
        contract_signers: bool,
    ) -> VerifiedPayment:
        """The requirement of this scheme the payload validly pays, or raise ``PaymentRejected``
        (see :func:`payments.x402.verify.verify_payment`)."""

    def digest(self, verified: VerifiedPayment) -> bytes:
        """The EIP-712 digest the payer signed (what an EIP-1271 wallet is asked to approve)."""


_registry: dict[str, WireScheme] = {}
_loaded = False


def register(scheme: WireScheme) -> WireScheme:
    """Register ``scheme`` under its name; one implementation per name."""
    existing = _registry.get(scheme.name)
    if existing is not None and type(existing) is not type(scheme):
        raise ValueError(f"scheme {scheme.name!r} is already registered by {type(existing).__name__}")
    _registry[scheme.name] = scheme
    return scheme


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def get(name: str, version: int | None = None) -> WireScheme | None:
    """The scheme registered as ``name`` (and carried by x402 ``version``, when given), or None."""
    _load()
    scheme = _registry.get(name)
    if scheme is None or (version is not None and version not in scheme.versions):
        return None
    return scheme


def names() -> list[str]:
    """The registered schemes' names, in registration order."""
    _load()
    return list(_registry)
