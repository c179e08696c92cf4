"""The payment options we accept, built from settings (never from the database).

An admin login must not be able to redirect money, so network, asset and pay-to live only in
the environment; this module turns ``X402_PAYMENT_OPTIONS`` (``x402.chain.payment_options``)
into typed options once and rebuilds them when a test overrides the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from django.core.signals import setting_changed
from eth_utils import to_checksum_address

from payments.x402.networks import chain_id_of, default_confirmations
from payments.x402.types import PaymentOption
from x402site.conf import x402


class SettlementMode(StrEnum):
    """Who verifies and settles an option's payments (verifiers and settlers are registered by it)."""

    RELAYER = "relayer"  # our node and our relayer, one transaction per payment
    BATCH = "batch"  # our node and our relayer, many payments per transaction (BatchSettler)
    FACILITATOR = "facilitator"  # a remote x402 facilitator


@dataclass(frozen=True, slots=True)
class ConfiguredOption:
    """A payment option and where to reach its chain."""

    option: PaymentOption
    rpc_url: str
    #: When set, verification and settlement are delegated to this x402 facilitator.
    facilitator_url: str = ""
    #: Optional ``Authorization`` header value for the facilitator.
    facilitator_auth: str = ""
    #: Our BatchSettler contract on this chain: settle many payments per transaction.
    batch_settler: str = ""

    @property
    def mode(self) -> SettlementMode:
        if self.facilitator_url:
            return SettlementMode.FACILITATOR
        if self.batch_settler and x402.settlement.batch:
            return SettlementMode.BATCH
        return SettlementMode.RELAYER


@lru_cache(maxsize=1)
def configured() -> tuple[ConfiguredOption, ...]:
    result = []
    for raw in x402.chain.payment_options:
        chain_id = chain_id_of(raw["network"])
        confirmations = raw.get("confirmations")
        option = PaymentOption(
            chain_id=chain_id,
            asset=to_checksum_address(raw["asset"]),
            asset_name=raw["asset_name"],
            asset_version=raw["asset_version"],
            pay_to=to_checksum_address(raw["pay_to"]),
            decimals=int(raw.get("decimals", 6)),
            symbol=raw.get("symbol", "USDC"),
            max_timeout_seconds=int(raw.get("max_timeout_seconds", 300)),
            confirmations=default_confirmations(chain_id) if confirmations is None else int(confirmations),
        )
        result.append(
            ConfiguredOption(
                option=option,
                rpc_url=raw["rpc_url"],
                facilitator_url=raw.get("facilitator_url", "").rstrip("/"),
                facilitator_auth=raw.get("facilitator_auth", ""),
                batch_settler=to_checksum_address(raw["batch_settler"]) if raw.get("batch_settler") else "",
            )
        )
    return tuple(result)


def payment_options() -> list[PaymentOption]:
    return [c.option for c in configured()]


def for_option(option: PaymentOption) -> ConfiguredOption:
    return next(c for c in configured() if c.option == option)


def for_payment(network: str, asset: str) -> ConfiguredOption:
    """The configured option a ledger row was paid through (LookupError if it was removed)."""
    for c in configured():
        if c.option.network == network and c.option.asset == asset:
            return c
    raise LookupError(f"no payment option for {network} {asset}")


def _on_setting_changed(setting: str, **kwargs: object) -> None:
    if setting == "X402_PAYMENT_OPTIONS":
        configured.cache_clear()


def connect_signals() -> None:
    setting_changed.connect(_on_setting_changed, dispatch_uid="payments.options")
