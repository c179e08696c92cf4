"""``batch-settlement``: the agent deposits once into a payment channel of the x402 settlement
contract and pays each request with an off-chain cumulative voucher; we charge each request when
it ends and claim many channels' vouchers in one transaction later (payments.channels).

Unlike ``exact`` and ``upto`` (one signed authorization per payment, a ``Payment`` in the ledger
and a settlement each) a channel payment is checked against our mirror of its channel and
recorded as a hold, then a ``ChannelCharge``: it is a :class:`ChannelScheme`, registered in
:data:`payments.schemes.CHANNEL_SCHEMES`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from payments.channels import gate
from payments.options import configured
from payments.pricing import atomic_amount
from payments.x402 import batch_settlement as bs
from payments.x402.types import Requirement

if TYPE_CHECKING:
    from payments.exceptions import Challenge
    from payments.permissions import Charge


class BatchSettlement:
    name = bs.SCHEME_BATCH_SETTLEMENT

    def offers(self, charge: Charge, price: Decimal) -> list[Requirement]:
        """One requirement per option where channels are on and the model offers them: at the
        price, or for a run paid per second at its usage maximum (the voucher's ceiling)."""
        if not charge.channels or not gate.enabled():
            return []
        ceiling = charge.channel_usage.maximum if charge.channel_usage is not None else price
        return gate.offers([(c, atomic_amount(ceiling, c.option.decimals)) for c in configured()])

    def accept(self, obj: dict[str, Any], challenge: Challenge) -> gate.ChannelPayment:
        return gate.accept(obj, challenge)


BATCH_SETTLEMENT = BatchSettlement()
