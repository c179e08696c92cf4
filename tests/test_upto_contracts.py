"""Our Permit2 and x402 upto proxy (contracts/), placed at the canonical addresses on anvil,
against payments signed by the official SDK's upto client and settled by the SDK's upto
facilitator: the behaviour the scheme relies on (witness transfers, unordered nonces, the
proxy's ``settle`` and its refusals)."""

from __future__ import annotations

from typing import Any

import pytest
from web3 import Web3
from web3.exceptions import ContractLogicError

from payments.chain import contracts, devchain
from payments.chain.devchain import DevChain
from payments.x402.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS
from payments.x402.types import SCHEME_UPTO, PaymentOption, Requirement
from tests.conftest import fresh_payer, token_balance
from tests.upto import sdk_upto_payload, settle_args

MAXIMUM = 50_000


def _requirement(chain: DevChain, facilitator: str) -> Requirement:
    option = PaymentOption(chain.chain_id, chain.asset, chain.asset_name, chain.asset_version, chain.pay_to)
    return Requirement(option, MAXIMUM, scheme=SCHEME_UPTO, facilitators=(facilitator,))


def _proxy(w3: Web3) -> Any:
    return w3.eth.contract(address=UPTO_PROXY_ADDRESS, abi=contracts.artifact("X402UptoPermit2Proxy")["abi"])


def _permit2(w3: Web3) -> Any:
    return w3.eth.contract(address=PERMIT2_ADDRESS, abi=contracts.artifact("Permit2")["abi"])


@pytest.fixture
def payer(chain: DevChain) -> dict[str, str]:
    p = fresh_payer(chain, 10**9)
    devchain.approve_permit2(chain.rpc_url, chain.asset, p["address"])
    return p


def _settle(w3: Web3, payload: dict[str, Any], amount: int, sender: str) -> str:
    tx = _proxy(w3).functions.settle(*settle_args(payload, amount)).transact({"from": sender, "gas": 300_000})
    return w3.eth.wait_for_transaction_receipt(tx)


def _revert(w3: Web3, payload: dict[str, Any], amount: int, sender: str) -> str:
    with pytest.raises(ContractLogicError) as exc:
        _proxy(w3).functions.settle(*settle_args(payload, amount)).call({"from": sender})
    return str(exc.value)


def test_contracts_are_at_the_canonical_addresses(chain: DevChain) -> None:
    w3 = Web3(Web3.HTTPProvider(chain.rpc_url))
    assert (chain.permit2, chain.upto_proxy) == (PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS)
    assert len(w3.eth.get_code(PERMIT2_ADDRESS)) > 0 and len(w3.eth.get_code(UPTO_PROXY_ADDRESS)) > 0
    domain = _permit2(w3).functions.DOMAIN_SEPARATOR().call()
    from payments.x402.permit2 import permit2_domain_separator

    assert domain == permit2_domain_separator(chain.chain_id)
    # The demo payers approved Permit2 at deploy time.
    token = w3.eth.contract(address=chain.asset, abi=contracts.artifact("TestUSDC")["abi"])
    assert token.functions.allowance(chain.payers[0]["address"], PERMIT2_ADDRESS).call() == 2**256 - 1


def test_settle_moves_the_chosen_amount_once(chain: DevChain, payer: dict[str, str]) -> None:
    w3 = Web3(Web3.HTTPProvider(chain.rpc_url))
    payload = sdk_upto_payload(payer["private_key"], _requirement(chain, chain.relayer_address))
    before_payer, before_to = token_balance(chain, payer["address"]), token_balance(chain, chain.pay_to)
    receipt = _settle(w3, payload, 12_345, chain.relayer_address)
    assert receipt["status"] == 1
    assert token_balance(chain, payer["address"]) == before_payer - 12_345
    assert token_balance(chain, chain.pay_to) == before_to + 12_345
    nonce = int(payload["permit2Authorization"]["nonce"])
    bitmap = _permit2(w3).functions.nonceBitmap(payer["address"], nonce >> 8).call()
    assert bitmap & (1 << (nonce & 255))
    # The permit's nonce is spent: never twice.
    invalid_nonce = Web3.keccak(text="InvalidNonce()")[:4].hex()
    assert invalid_nonce in _revert(w3, payload, 1, chain.relayer_address)


def test_proxy_refusals(chain: DevChain, payer: dict[str, str]) -> None:
    w3 = Web3(Web3.HTTPProvider(chain.rpc_url))
    payload = sdk_upto_payload(payer["private_key"], _requirement(chain, chain.relayer_address))
    selector = {e["name"]: Web3.keccak(text=f"{e['name']}()")[:4].hex() for e in _proxy(w3).abi if e["type"] == "error"}

    def reason(amount: int, sender: str, mutate: Any = None) -> str:
        args = settle_args(payload, amount)
        if mutate:
            mutate(args)
        with pytest.raises(ContractLogicError) as exc:
            _proxy(w3).functions.settle(*args).call({"from": sender})
        return str(exc.value.data or exc.value)

    assert selector["AmountExceedsPermitted"] in reason(MAXIMUM + 1, chain.relayer_address)
    assert selector["InvalidAmount"] in reason(0, chain.relayer_address)
    assert selector["UnauthorizedFacilitator"] in reason(1, chain.pay_to)

    def other_destination(args: list[Any]) -> None:
        to, facilitator, valid_after = args[3]
        args[3] = (chain.payers[0]["address"], facilitator, valid_after)

    # A changed witness no longer matches the signature: Permit2 refuses the signer.
    permit2_errors = {e["name"]: Web3.keccak(text=f"{e['name']}()")[:4].hex() for e in _permit2(w3).abi if e["type"] == "error"}
    assert permit2_errors["InvalidSigner"] in reason(1, chain.relayer_address, other_destination)

    def more_than_signed(args: list[Any]) -> None:
        (token, amount), nonce, deadline = args[0]
        args[0] = ((token, amount * 2), nonce, deadline)

    assert permit2_errors["InvalidSigner"] in reason(MAXIMUM + 1, chain.relayer_address, more_than_signed)
    # Nothing moved.
    assert token_balance(chain, payer["address"]) == 10**9


def test_the_sdk_facilitator_settles_through_our_contracts(chain: DevChain, payer: dict[str, str]) -> None:
    """Second opinion: the SDK's own upto facilitator verifies (it simulates ``settle``) and
    settles a partial amount through our Permit2 and proxy."""
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme
    from x402.schemas import PaymentRequirements, parse_payment_payload

    key = chain.spare_keys[0]  # type: ignore[attr-defined]
    signer = FacilitatorWeb3Signer(private_key=key, rpc_url=chain.rpc_url)
    facilitator_address = signer.get_addresses()[0]
    req = _requirement(chain, facilitator_address)
    payload = sdk_upto_payload(payer["private_key"], req)
    body = {"x402Version": 2, "accepted": req.v2(), "payload": payload}
    wire = req.v2()
    requirements = PaymentRequirements(
        scheme=wire["scheme"], network=wire["network"], asset=wire["asset"], amount=wire["amount"],
        pay_to=wire["payTo"], max_timeout_seconds=wire["maxTimeoutSeconds"], extra=wire["extra"],
    )
    scheme = UptoEvmFacilitatorScheme(signer)
    verdict = scheme.verify(parse_payment_payload(body), requirements)
    assert verdict.is_valid, verdict.invalid_reason
    before = token_balance(chain, chain.pay_to)
    settled = scheme.settle(parse_payment_payload(body), requirements.model_copy(update={"amount": "777"}))
    assert settled.success, (settled.error_reason, settled.error_message)
    assert token_balance(chain, chain.pay_to) == before + 777
    again = scheme.verify(parse_payment_payload(body), requirements)
    assert not again.is_valid
