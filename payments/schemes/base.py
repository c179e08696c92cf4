"""What one x402 scheme is on our side: the :class:`Scheme` every scheme implements.

The wire (the requirement's ``extra``, the payload's shape, the signature checks) is the
scheme's pure :class:`~payments.x402.mechanisms.WireScheme`; this adds what needs the chain, the
ledger and the settings: what the 402 offers, the chain checks at the gate, the settlement call,
how a receipt or the chain says the payment was paid, and how the ledger prices it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from payments.chain.calls import SettlementCall
    from payments.chain.node import AuthorizationUse, PayerState
    from payments.channels.gate import ChannelPayment
    from payments.exceptions import Challenge
    from payments.models import Payment
    from payments.options import ConfiguredOption
    from payments.permissions import Charge
    from payments.x402.mechanisms import WireScheme
    from payments.x402.types import Requirement
    from payments.x402.verify import VerifiedPayment


class Scheme(Protocol):
    """One x402 scheme, registered in :data:`payments.schemes.SCHEMES`. Implementations are
    stateless singletons; nothing outside them branches on a scheme's name."""

    #: ``Payment.scheme`` and the wire's ``scheme``.
    name: str
    #: Its pure side: parse, verify, ``extra``, digest.
    wire: WireScheme
    #: Priced by usage: the payer signs a maximum, the charge is measured after the run
    #: (``Payment.maximum`` and ``usage_price`` are recorded; ``ledger.charge_usage``).
    usage_priced: bool
    #: Its payments may go in a batch of our BatchSettler (EIP-3009 items).
    batches: bool
    #: Our facilitator API (``/supported``, ``/verify``, ``/settle``) speaks it.
    facilitator_api: bool

    def offers(self, charge: Charge, price: Decimal) -> list[Requirement]:
        """The requirements of a 402 for ``charge`` (at ``price``, for a fixed-price scheme;
        a usage-priced one offers the charge's usage maximum, or nothing)."""

    def chain_state(
        self, conf: ConfiguredOption, verified: VerifiedPayment, contract: tuple[bytes, bytes] | None
    ) -> PayerState:
        """The gate's chain reads (one JSON-RPC batch): raise ``PaymentRejected`` when the payment
        cannot be settled now; ``contract``: the digest and signature an EIP-1271 wallet must
        approve."""

    def settlement_call(self, p: Payment, *, held: bool = False) -> SettlementCall:
        """The transaction that settles ``p`` for its amount, or (``held``) at the most it can
        settle, as simulated before a run the payment is held through."""

    def held_call(self, verified: VerifiedPayment) -> SettlementCall:
        """:meth:`settlement_call` (``held``) of a payment not recorded yet."""

    def last_usable_second(self, valid_before: int) -> int:
        """The last block timestamp at which an authorization valid before ``valid_before`` may
        still be used."""

    def transfer_matches(self, receipt: dict[str, Any], p: Payment) -> bool:
        """The succeeded receipt carries this payment's own transfer."""

    def chain_use(self, p: Payment, conf: ConfiguredOption) -> AuthorizationUse:
        """The chain's word on the payment's authorization: used (by which transaction) or not.
        Raises ``ChainUnavailable``, or ``UseNotFound`` when used by what it cannot tell yet."""


class ChannelScheme(Protocol):
    """A scheme paid from a payment channel (``batch-settlement``), registered in
    :data:`payments.schemes.CHANNEL_SCHEMES`: its payments are vouchers checked against our
    mirror of the channel, not authorizations recorded and settled one by one."""

    #: The wire's ``scheme``.
    name: str

    def offers(self, charge: Charge, price: Decimal) -> list[Requirement]:
        """The requirements of a 402 for ``charge`` at ``price`` (none where it is not offered)."""

    def accept(self, obj: dict[str, Any], challenge: Challenge) -> ChannelPayment:
        """Check a decoded payment header of this scheme against ``challenge``; raise
        ``PaymentRequired`` (the reason, or a corrective 402)."""
