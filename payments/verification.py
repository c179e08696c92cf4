"""The chain half of verification, shared by the payment gate and our facilitator API."""

from __future__ import annotations

from .chain import payer_state
from .options import ConfiguredOption
from .x402.verify import INSUFFICIENT_BALANCE, NONCE_ALREADY_USED, PaymentRejected, VerifiedPayment


def verify_on_chain(conf: ConfiguredOption, verified: VerifiedPayment) -> None:
    """Nonce unused and balance sufficient, in one round trip.

    Raises PaymentRejected for a no, and ChainUnavailable when the node cannot say.
    """
    auth = verified.payload.authorization
    state = payer_state(conf.rpc_url, conf.option.asset, auth.from_, auth.nonce)
    if state.nonce_used:
        raise PaymentRejected(NONCE_ALREADY_USED, "this authorization was already used on chain")
    if state.balance < auth.value:
        raise PaymentRejected(INSUFFICIENT_BALANCE, "the payer's balance does not cover the price")
