"""The x402 schemes we take payments in, each one module implementing
:class:`~payments.schemes.base.Scheme` and one entry in :data:`SCHEMES`.

``exact`` (a fixed price, EIP-3009) and ``upto`` (pay per second, Permit2) are built in. The
gate, the ledger, settlement, batching, the facilitator API and the schema ask the registry
(:func:`scheme_of`, or the schemes' flags) and never branch on a scheme's name. A scheme's wire
side is its pure :class:`~payments.x402.mechanisms.WireScheme` (``payments/x402/<name>.py``);
adding a scheme is those two modules and their registrations (:func:`register`).
"""

from __future__ import annotations

from payments.schemes.base import ChannelScheme, Scheme
from payments.schemes.batch_settlement import BATCH_SETTLEMENT
from payments.schemes.exact import EXACT
from payments.schemes.upto import UPTO
from payments.x402 import mechanisms

__all__ = ["CHANNEL_SCHEMES", "SCHEMES", "ChannelScheme", "Scheme", "priced_by", "register", "scheme_of"]

#: Every scheme, by name, in the order a 402 offers them.
SCHEMES: dict[str, Scheme] = {s.name: s for s in (EXACT, UPTO)}
#: The schemes paid from a payment channel, offered after those.
CHANNEL_SCHEMES: dict[str, ChannelScheme] = {s.name: s for s in (BATCH_SETTLEMENT,)}


def register(scheme: Scheme) -> Scheme:
    """Add ``scheme`` (and its wire side) to the registries; one implementation per name."""
    existing = SCHEMES.get(scheme.name)
    if existing is not None and type(existing) is not type(scheme):
        raise ValueError(f"scheme {scheme.name!r} is already registered by {type(existing).__name__}")
    mechanisms.register(scheme.wire)
    SCHEMES[scheme.name] = scheme
    return scheme


def scheme_of(name: str) -> Scheme:
    """The scheme registered as ``name`` (KeyError for one we do not take)."""
    return SCHEMES[name]


def priced_by(usage: bool) -> Scheme:
    """The first scheme that takes a usage price (``usage``) or a fixed price."""
    return next(s for s in SCHEMES.values() if s.usage_priced == usage)
