"""Smart-contract wallets (EIP-1271): verified through the chain, settled with their signature."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from eth_account import Account
from web3 import Web3

from payments.chain import contracts
from payments.models import Payment
from payments.options import payment_options
from payments.x402.codec import encode_header
from payments.x402.exact import verify_exact
from payments.x402.types import PaymentOption, Requirement, parse_payload
from tests.conftest import token_balance
from tests.payers import sign_authorization, v2_payload

pytestmark = [pytest.mark.django_db(transaction=True)]
URL = "/v1/models/demo/echo-text/predictions"
PRICE = 10_000


def test_pure_verification_defers_a_non_eoa_signature_to_the_chain() -> None:
    option = PaymentOption(
        chain_id=1, asset="0x" + "aa" * 20, asset_name="USD Coin", asset_version="2", pay_to="0x" + "bb" * 20
    )
    req = Requirement(option, PRICE)
    owner = Account.create()
    obj = v2_payload(req, sign_authorization(owner.key.hex(), req, from_="0x" + "cc" * 20))
    import time

    verified = verify_exact(parse_payload(obj), [req], int(time.time()), contract_signers=True)
    assert verified.contract_signature is True


@pytest.fixture
def wallet(chain):
    """A MockERC1271Wallet owned by a fresh key, holding test USDC."""
    w3 = Web3(Web3.HTTPProvider(chain.rpc_url))
    build = contracts.artifact("MockERC1271Wallet")
    owner = Account.create()
    tx = (
        w3.eth.contract(abi=build["abi"], bytecode=build["bytecode"])
        .constructor(owner.address)
        .transact({"from": chain.relayer_address})
    )
    address = w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
    token = contracts.artifact("TestUSDC")
    mint = w3.eth.contract(address=chain.asset, abi=token["abi"]).functions.mint(address, 10**9)
    w3.eth.wait_for_transaction_receipt(mint.transact({"from": chain.relayer_address}))
    return address, owner


def test_a_contract_wallet_pays_and_settles(chain_settings, demo_model, eager_celery, wallet) -> None:
    address, owner = wallet
    req = Requirement(payment_options()[0], PRICE)
    before = token_balance(chain_settings, address)
    header = encode_header(v2_payload(req, sign_authorization(owner.key.hex(), req, from_=address)))
    response = Client().post(
        URL,
        data=json.dumps({"input": {"text": "from a contract"}}),
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": header},
    )
    assert response.status_code == 201, response.content
    assert Client().get(f"/v1/predictions/{response.json()['id']}").json()["status"] == "succeeded"
    assert Payment.objects.get().status == "confirmed"
    assert token_balance(chain_settings, address) == before - PRICE


def test_a_contract_wallet_refuses_a_stranger_signature(chain_settings, demo_model, wallet) -> None:
    address, _ = wallet
    req = Requirement(payment_options()[0], PRICE)
    header = encode_header(
        v2_payload(req, sign_authorization(Account.create().key.hex(), req, from_=address))
    )
    response = Client().post(
        URL,
        data=json.dumps({"input": {"text": "x"}}),
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": header},
    )
    assert response.status_code == 402 and response.json()["error"] == "invalid_exact_evm_payload_signature"
    # An EOA payer whose signature is wrong is refused the same way (no code at the address).
    eoa = chain_settings.payers[0]["address"]
    header = encode_header(v2_payload(req, sign_authorization(Account.create().key.hex(), req, from_=eoa)))
    response = Client().post(
        URL,
        data=json.dumps({"input": {"text": "x"}}),
        content_type="application/json",
        headers={"PAYMENT-SIGNATURE": header},
    )
    assert response.status_code == 402 and response.json()["error"] == "invalid_exact_evm_payload_signature"
    assert Payment.objects.count() == 0
