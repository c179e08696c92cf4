"""``exact``: the price, paid with an EIP-3009 ``transferWithAuthorization`` that the token
settles (from any relayer lane, alone or in a batch); its use is the token's
``AuthorizationUsed`` log."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from eth_utils import to_checksum_address

from payments.chain.abi import AUTHORIZATION_USED_TOPIC, TOKEN_ABI, TRANSFER_TOPIC
from payments.chain.calls import SettlementCall, transfer_logs, word
from payments.chain.node import AuthorizationUse, PayerState, authorization_use, payer_state
from payments.models import Payment
from payments.options import ConfiguredOption, configured
from payments.pricing import atomic_amount
from payments.x402.eip712 import Authorization
from payments.x402.exact import EXACT as WIRE
from payments.x402.types import Requirement
from payments.x402.verify import (
    INSUFFICIENT_BALANCE,
    INVALID_SIGNATURE,
    NONCE_ALREADY_USED,
    PaymentRejected,
    VerifiedPayment,
)
from x402site.conf import x402

if TYPE_CHECKING:
    from payments.permissions import Charge

#: Gas limit for one transferWithAuthorization (82,900 measured on anvil; USDC needs a little more).
GAS_LIMIT = 150_000


@lru_cache(maxsize=1)
def _token_contract() -> Any:
    from web3 import Web3  # imported lazily: web3 costs ~0.6 s and only workers need it

    return Web3().eth.contract(abi=TOKEN_ABI)


def authorization_calldata(auth: Authorization, pay_to: str, signature: bytes) -> str:
    """transferWithAuthorization with (v, r, s) for a canonical 65-byte ECDSA signature, else the
    ``bytes`` overload (contract wallets, EIP-1271): the chain gets the bytes that were verified."""
    head = [
        to_checksum_address("0x" + auth.from_.hex()),
        to_checksum_address(pay_to),
        auth.value,
        auth.valid_after,
        auth.valid_before,
        auth.nonce,
    ]
    contract = _token_contract()
    if len(signature) != 65 or signature[64] not in (27, 28):
        return contract.encode_abi(
            "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
            [*head, signature],
        )
    return contract.encode_abi(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)",
        [*head, signature[64], signature[:32], signature[32:64]],
    )


def calldata(p: Payment) -> str:
    """The payment's transferWithAuthorization, as recorded in the ledger."""
    auth = Authorization(
        from_=bytes.fromhex(p.payer[2:]),
        to=bytes.fromhex(p.pay_to[2:]),
        value=int(p.amount),
        valid_after=p.valid_after,
        valid_before=p.valid_before,
        nonce=bytes.fromhex(p.nonce[2:]),
    )
    return authorization_calldata(auth, p.pay_to, bytes.fromhex(p.signature[2:]))


class Exact:
    name = WIRE.name
    wire = WIRE
    usage_priced = False
    batches = True
    facilitator_api = True

    def offers(self, charge: Charge, price: Decimal) -> list[Requirement]:
        """Every configured option, at the price."""
        return [
            Requirement(
                c.option, atomic_amount(price, c.option.decimals), hold_seconds=charge.hold_seconds, scheme=self.name
            )
            for c in configured()
        ]

    def chain_state(
        self, conf: ConfiguredOption, verified: VerifiedPayment, contract: tuple[bytes, bytes] | None
    ) -> PayerState:
        auth = verified.payload.authorization
        state = payer_state(conf.rpc_url, conf.option.asset, auth.from_, auth.nonce, contract)
        if contract is not None and not state.contract_approves:
            raise PaymentRejected(INVALID_SIGNATURE, "not from's signature, and from is no contract wallet approving it")
        if state.nonce_used:
            raise PaymentRejected(NONCE_ALREADY_USED, "this authorization was already used on chain")
        if state.balance < auth.value:
            raise PaymentRejected(INSUFFICIENT_BALANCE, "the payer's balance does not cover the price")
        return state

    def settlement_call(self, p: Payment, *, held: bool = False) -> SettlementCall:
        """The token's transferWithAuthorization, from any lane (the amount is the signed one)."""
        return SettlementCall(p.asset, calldata(p), GAS_LIMIT)

    def held_call(self, verified: VerifiedPayment) -> SettlementCall:
        payload, option = verified.payload, verified.requirement.option
        data = authorization_calldata(payload.authorization, option.pay_to, payload.signature)
        return SettlementCall(option.asset, data, GAS_LIMIT)

    def last_usable_second(self, valid_before: int) -> int:
        return valid_before - 1  # the token requires block.timestamp < validBefore

    def transfer_matches(self, receipt: dict[str, Any], p: Payment) -> bool:
        """The token's ``AuthorizationUsed(payer, nonce)`` log, followed by its
        ``Transfer(payer, payTo, amount)``.

        Matching the authorization, not just a Transfer of the right amount, matters in a batch:
        two payments of one payer for the same price may share a transaction, and only the one
        whose authorization was used is paid.
        """
        logs = transfer_logs(receipt, p.asset)
        transfer = [TRANSFER_TOPIC, word(p.payer), word(p.pay_to)]
        used = [AUTHORIZATION_USED_TOPIC, word(p.payer), p.nonce.lower()]
        for i, entry in enumerate(logs):
            if entry[:3] == used:
                # Its Transfer: after it, before the next authorization's use (the token emits
                # AuthorizationUsed, then Transfer).
                for later in logs[i + 1 :]:
                    if later[0] == AUTHORIZATION_USED_TOPIC:
                        return False
                    if later[:3] == transfer and int(later[3], 16) == int(p.amount):
                        return True
                return False
        return False

    def chain_use(self, p: Payment, conf: ConfiguredOption) -> AuthorizationUse:
        """The token's ``authorizationState`` and its ``AuthorizationUsed`` log."""
        return authorization_use(
            conf.rpc_url,
            p.asset,
            p.payer,
            p.nonce,
            from_block=p.search_from_block,
            lookback=x402.chain.log_lookback_blocks,
            span=x402.chain.log_span_blocks,
        )


EXACT = Exact()
