"""Pay with the x402 ``batch-settlement`` scheme in tests through the official x402 SDK's client
(``x402.mechanisms.evm.batch_settlement``): the payloads an agent sends, exactly."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    InMemoryClientChannelStorage,
)
from x402.mechanisms.evm.batch_settlement.client.storage import BatchSettlementClientContext
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.types import RefundPayload
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements

from payments.x402.batch_settlement import SCHEME_BATCH_SETTLEMENT

CHAIN_ID = 31337
NETWORK = f"eip155:{CHAIN_ID}"
WITHDRAW_DELAY = 900


def requirements(
    asset: str,
    pay_to: str,
    receiver_authorizer: str,
    amount: int,
    *,
    withdraw_delay: int = WITHDRAW_DELAY,
    name: str = "USD Coin",
    version: str = "2",
    **extra: Any,
) -> PaymentRequirements:
    """A ``batch-settlement`` requirement as our 402 would offer it."""
    return PaymentRequirements(
        scheme=SCHEME_BATCH_SETTLEMENT,
        network=NETWORK,
        asset=asset,
        amount=str(amount),
        pay_to=pay_to,
        max_timeout_seconds=300,
        extra={
            "receiverAuthorizer": receiver_authorizer,
            "withdrawDelay": withdraw_delay,
            "name": name,
            "version": version,
            **extra,
        },
    )


class Agent:
    """One payer: the SDK client scheme over its own channel storage."""

    def __init__(self, key: str, signer: Any = None, **options: Any) -> None:
        self.account = Account.from_key(key)
        self.storage = InMemoryClientChannelStorage()
        self.client = BatchSettlementEvmScheme(
            signer or self.account, BatchSettlementEvmSchemeOptions(storage=self.storage, **options)
        )

    def channel_id(self, req: PaymentRequirements) -> str:
        return compute_channel_id(self.client.build_channel_config(req), NETWORK).lower()

    def pay(self, req: PaymentRequirements) -> dict[str, Any]:
        """The client's payload for ``req`` given what it knows of its channel."""
        return self.client.create_payment_payload(req)

    def knows(self, req: PaymentRequirements, *, charged: int, balance: int) -> None:
        """Set what the client believes of its channel (as a payment response would)."""
        self.storage.set(
            self.channel_id(req),
            BatchSettlementClientContext(charged_cumulative_amount=str(charged), balance=str(balance)),
        )

    def voucher(self, req: PaymentRequirements, *, charged: int, balance: int) -> dict[str, Any]:
        """A ``voucher`` payload on a channel where ``charged`` was charged so far."""
        self.knows(req, charged=charged, balance=balance)
        return self.pay(req)

    def refund(self, req: PaymentRequirements, *, charged: int, amount: int | None = None) -> dict[str, Any]:
        """A ``refund`` payload as the client's ``refund()`` builds it: a zero-charge voucher."""
        payload = RefundPayload()
        payload.channel_config = self.client.build_channel_config(req)
        payload.voucher = sign_voucher(EthAccountSigner(self.account), self.channel_id(req), charged, NETWORK)
        if amount is not None:
            payload.amount = str(amount)
        return payload.to_dict()
