"""System checks of the payment options: caught at start-up, not on an agent's request."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Warning, register
from eth_utils import is_address, is_checksum_address

from payments.x402.networks import chain_id_of
from x402site.conf import x402

REQUIRED = ("network", "rpc_url", "asset", "asset_name", "asset_version", "pay_to")


def _address_errors(i: int, key: str, value: Any) -> list[Error]:
    if not isinstance(value, str) or not is_address(value):
        return [Error(f"payment option {i}: {key} {value!r} is not an address", id="payments.E002")]
    if value != value.lower() and value != value.upper() and not is_checksum_address(value):
        return [
            Error(
                f"payment option {i}: {key} {value} has a bad EIP-55 checksum (a typo?)",
                hint="Copy the address again, or write it all lowercase to skip the checksum.",
                id="payments.E003",
            )
        ]
    return []


@register("payments")
def check_payment_options(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    errors: list[Error | Warning] = []
    for i, option in enumerate(x402.chain.payment_options):
        missing = [k for k in REQUIRED if not option.get(k)]
        if missing:
            errors.append(Error(f"payment option {i}: missing {', '.join(missing)}", id="payments.E001"))
            continue
        try:
            chain_id_of(option["network"])
        except ValueError as exc:
            errors.append(Error(f"payment option {i}: {exc}", id="payments.E004"))
        errors += _address_errors(i, "asset", option["asset"])
        errors += _address_errors(i, "pay_to", option["pay_to"])
    if (
        x402.chain.payment_options
        and not x402.relayer.key
        and any(not o.get("facilitator_url") for o in x402.chain.payment_options)
    ):
        errors.append(Warning("no X402_RELAYER_KEY: local settlement will fail", id="payments.W001"))
    return errors


@register("payments", deploy=True)
def check_assets_on_chain(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """With --deploy: every asset must be a contract on its chain (one call per option)."""
    from payments.chain.node import ChainUnavailable, endpoint, rpc

    errors = []
    for i, option in enumerate(x402.chain.payment_options):
        try:
            code = rpc(option["rpc_url"], "eth_getCode", [option["asset"], "latest"], timeout=5)
        except (ChainUnavailable, KeyError, Exception) as exc:  # noqa: BLE001 - reported as a check
            errors.append(
                Error(
                    f"payment option {i}: cannot reach {endpoint(str(option.get('rpc_url')))}: "
                    f"{exc.__class__.__name__}",
                    id="payments.E005",
                )
            )
            continue
        if code in (None, "0x", "0x0"):
            errors.append(
                Error(
                    f"payment option {i}: asset {option['asset']} is not a contract on {option['network']}",
                    id="payments.E006",
                )
            )
    return errors


def _address_of(key: str) -> str | None:
    from eth_account import Account

    try:
        return Account.from_key(key).address
    except (ValueError, TypeError):
        return None


@register("payments")
def check_refund_key_is_its_own(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """The refund wallet must not be a relayer: refunds and settlements each count only their
    own table's held nonces under the same RelayerNonce row, so a shared key collides nonces
    (one transaction replaces or blocks the other)."""
    if not x402.refunds.key:
        return []
    refund = _address_of(x402.refunds.key)
    relayers = {_address_of(k) for k in [x402.relayer.key, *x402.relayer.keys] if k}
    if refund is not None and refund in relayers:
        return [
            Error(
                "X402_REFUND_KEY is also a relayer key: refunds and settlements would collide on nonces",
                hint="Give the refund wallet its own key.",
                id="payments.E007",
            )
        ]
    return []
