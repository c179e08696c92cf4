"""The chain half of verification, shared by the payment gate and our facilitator API."""

from __future__ import annotations

from .chain import payer_state
from .options import ConfiguredOption
from .x402.verify import (
    INSUFFICIENT_BALANCE,
    INVALID_SIGNATURE,
    NONCE_ALREADY_USED,
    PaymentRejected,
    VerifiedPayment,
    digest_of,
)


def verify_on_chain(conf: ConfiguredOption, verified: VerifiedPayment) -> None:
    """Nonce unused and balance sufficient, in one round trip.

    Raises PaymentRejected for a no, and ChainUnavailable when the node cannot say.
    """
    auth = verified.payload.authorization
    contract = (digest_of(verified), verified.payload.signature) if verified.contract_signature else None
    state = payer_state(conf.rpc_url, conf.option.asset, auth.from_, auth.nonce, contract)
    if contract is not None and not state.contract_approves:
        raise PaymentRejected(
            INVALID_SIGNATURE, "not from's signature, and from is no contract wallet approving it"
        )
    if state.nonce_used:
        raise PaymentRejected(NONCE_ALREADY_USED, "this authorization was already used on chain")
    if state.balance < auth.value:
        raise PaymentRejected(INSUFFICIENT_BALANCE, "the payer's balance does not cover the price")
