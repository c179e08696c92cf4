"""Attacks on the ``batch-settlement`` gate, through the API as an agent (or an attacker) sends
them, with payloads made by the official x402 SDK client: replayed and lower vouchers, vouchers
over the balance, channels with another receiver, authorizer, token or delay, forged voucher
signatures, twenty vouchers at once on one channel, and a run that fails on our side. The
channels, deposits and claims are on the real anvil chain."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from django.test import Client, override_settings
from eth_account import Account
from x402 import x402ClientSync
from x402.http import x402HTTPClientSync
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    InMemoryClientChannelStorage,
)
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.signers import EthAccountSigner

from payments.channels.models import Channel, ChannelCharge
from payments.models import Payment, SettlementTx
from payments.x402 import batch_settlement as bs
from payments.x402.codec import decode_header
from predictions.models import ModelVersion, Prediction
from tests.conftest import fresh_payer, option_settings, token_balance

pytestmark = [pytest.mark.django_db(transaction=True)]

URL = "/v1/models/demo/echo-text/predictions"
PRICE = 10_000
BODY = {"input": {"text": "hello"}}
E = bs.ErrorCode


@pytest.fixture
def channels_on(chain_settings) -> Iterator[Any]:
    with override_settings(
        **option_settings(chain_settings),
        X402_CHANNEL_AUTHORIZER_KEY=chain_settings.channel_authorizer_private_key,
        X402_CHANNELS=True,
        X402_CHANNEL_MIN_DEPOSIT=3 * PRICE,
    ):
        yield chain_settings


class Agent:
    """An SDK batch-settlement client, driven request by request (so that a test can change
    what it signs)."""

    def __init__(self, chain: Any, key: str | None = None, *, any_asset: bool = False, **options: Any) -> None:
        self.key = key or fresh_payer(chain, 10**7)["private_key"]
        self.storage = InMemoryClientChannelStorage()
        self.scheme = BatchSettlementEvmScheme(
            Account.from_key(self.key), BatchSettlementEvmSchemeOptions(storage=self.storage, **options)
        )
        client = x402ClientSync()
        client.register("eip155:*", self.scheme)
        allowed = [{"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(10**6)}]
        client.set_spend_controls({"allowed_assets": True if any_asset else allowed})
        self.client = client
        self.http = x402HTTPClientSync(client)

    def required(self, client: Client, edit: Any = None) -> Any:
        challenge = client.post(URL, BODY, content_type="application/json")
        assert challenge.status_code == 402
        required = self.http.get_payment_required_response(challenge.headers.get, challenge.json())
        required.accepts = [a for a in required.accepts if a.scheme == bs.SCHEME_BATCH_SETTLEMENT]
        if edit is not None:
            edit(required.accepts[0])
        return required

    def header(self, client: Client, edit: Any = None, tamper: Any = None) -> dict[str, str]:
        payload = self.client.create_payment_payload(self.required(client, edit))
        self.last = payload
        headers = self.http.encode_payment_signature_header(payload)
        if tamper is not None:
            obj = json.loads(base64.b64decode(headers["PAYMENT-SIGNATURE"]))
            tamper(obj)
            headers = {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(obj).encode()).decode()}
        return headers

    def pay(self, client: Client, **kwargs: Any) -> Any:
        headers = self.header(client, **kwargs)
        response = client.post(URL, BODY, content_type="application/json", headers=headers)
        self.http.process_payment_result(self.last, response.headers.get, response.status_code)
        return response


def status_of(response: Any) -> str:
    """The prediction's status now (eager Celery ran it after the answer's body was made)."""
    return Prediction.objects.get(pk=response.json()["id"]).status


def refused(response: Any, code: bs.ErrorCode) -> dict[str, Any]:
    assert response.status_code == 402, response.content
    required = decode_header(response["PAYMENT-REQUIRED"])
    assert required["error"] == code.value, required["error"]
    return required


def test_replayed_lower_forged_and_foreign_vouchers_are_refused(channels_on, demo_model, eager_celery) -> None:
    chain, client = channels_on, Client()
    agent = Agent(chain)
    before = token_balance(chain, Account.from_key(agent.key).address)
    first = client.post(URL, BODY, content_type="application/json", headers=(opened := agent.header(client)))
    agent.http.process_payment_result(agent.last, first.headers.get, first.status_code)
    assert first.status_code == 201 and status_of(first) == "succeeded"
    [channel] = Channel.objects.all()
    assert int(channel.charged_cumulative) == PRICE and int(channel.balance) == 3 * PRICE
    deposits = SettlementTx.objects.count()

    # Replayed (the opening deposit and its voucher): the corrective 402, nothing relayed again.
    required = refused(client.post(URL, BODY, content_type="application/json", headers=opened), E.CUMULATIVE_AMOUNT_MISMATCH)
    [offer] = [a for a in required["accepts"] if a["scheme"] == bs.SCHEME_BATCH_SETTLEMENT]
    assert offer["extra"]["channelState"]["chargedCumulativeAmount"] == str(PRICE)
    assert offer["extra"]["voucherState"]["signedMaxClaimable"] == str(PRICE)
    assert SettlementTx.objects.count() == deposits

    # A lower cumulative (the client made to forget the charge).
    agent.storage.set(channel.channel_id, _known(agent, charged=0, balance=3 * PRICE))
    refused(agent.pay(client), E.CUMULATIVE_AMOUNT_MISMATCH)
    agent.storage.set(channel.channel_id, _known(agent, charged=PRICE, balance=3 * PRICE))

    # Forged: the right voucher signed by someone else; and one with a signature bit flipped.
    thief = EthAccountSigner(Account.create())

    def forge(obj: dict[str, Any]) -> None:
        voucher = obj["payload"]["voucher"]
        voucher["signature"] = sign_voucher(thief, voucher["channelId"], voucher["maxClaimableAmount"], chain.network).signature

    refused(agent.pay(client, tamper=forge), E.VOUCHER_SIGNATURE)

    def flip(obj: dict[str, Any]) -> None:
        sig = obj["payload"]["voucher"]["signature"]
        obj["payload"]["voucher"]["signature"] = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]

    refused(agent.pay(client, tamper=flip), E.VOUCHER_SIGNATURE)

    # Channels that are not ours: another receiverAuthorizer, another withdraw delay, another
    # receiver (pay-to), another token. The client opens them with a deposit: nothing is relayed.
    other = Account.create().address

    def set_extra(key: str, value: Any) -> Any:
        return lambda req: req.extra.__setitem__(key, value)

    refused(Agent(chain).pay(client, edit=set_extra("receiverAuthorizer", other)), E.RECEIVER_AUTHORIZER_MISMATCH)
    refused(Agent(chain).pay(client, edit=set_extra("withdrawDelay", 900)), E.WITHDRAW_DELAY_MISMATCH)
    refused(Agent(chain).pay(client, edit=lambda req: setattr(req, "pay_to", other)), E.RECEIVER_MISMATCH)
    refused(Agent(chain, any_asset=True).pay(client, edit=lambda req: setattr(req, "asset", other)), E.TOKEN_MISMATCH)
    assert SettlementTx.objects.count() == deposits

    # Over the balance: the client skips the top-up its next voucher needs (3 PRICE deposited).
    assert agent.pay(client).status_code == 201
    assert agent.pay(client).status_code == 201
    short = Agent(chain, agent.key, deposit_strategy=lambda ctx: False)
    short.storage.set(channel.channel_id, _known(short, charged=3 * PRICE, balance=3 * PRICE))
    refused(short.pay(client), E.CUMULATIVE_EXCEEDS_BALANCE)

    channel.refresh_from_db()
    assert int(channel.charged_cumulative) == 3 * PRICE == int(channel.signed_max_claimable)
    assert ChannelCharge.objects.filter(channel=channel).count() == 3 == Prediction.objects.count()
    assert not channel.held_by and Payment.objects.count() == 0
    # The agent paid the deposit and nothing else.
    assert token_balance(chain, Account.from_key(agent.key).address) == before - 3 * PRICE


def _known(agent: Agent, *, charged: int, balance: int) -> Any:
    from x402.mechanisms.evm.batch_settlement.client.storage import BatchSettlementClientContext

    return BatchSettlementClientContext(charged_cumulative_amount=str(charged), balance=str(balance))


def test_a_run_that_fails_on_our_side_charges_nothing(channels_on, demo_model, eager_celery) -> None:
    client = Client()
    agent = Agent(channels_on)
    assert agent.pay(client).status_code == 201
    version = demo_model.latest_version
    ModelVersion.objects.create(
        id="f" * 64, model=demo_model, predictor="tests.predictors.Boom", input_schema=version.input_schema
    )
    failed = agent.pay(client)
    assert failed.status_code == 201 and status_of(failed) == "failed"
    answer = decode_header(failed["PAYMENT-RESPONSE"])
    assert answer["success"] and answer["extra"]["chargedAmount"] == "0"
    assert answer["extra"]["channelState"]["chargedCumulativeAmount"] == str(PRICE)
    channel = Channel.objects.get()
    assert int(channel.charged_cumulative) == PRICE and not channel.held_by
    # The next voucher carries the same cumulative it did (the client followed the answer).
    ModelVersion.objects.create(
        id="a" * 64, model=demo_model, predictor=version.predictor, input_schema=version.input_schema
    )
    ok = agent.pay(client)
    assert ok.status_code == 201 and status_of(ok) == "succeeded"
    channel.refresh_from_db()
    assert int(channel.charged_cumulative) == 2 * PRICE
    assert [int(c.amount) for c in ChannelCharge.objects.order_by("cumulative")] == [PRICE, PRICE]


def test_twenty_vouchers_at_once_on_one_channel_buy_one_run(channels_on, demo_model, live_server) -> None:
    """One channel, the same next voucher sent twenty times at once (and no worker: the admitted
    run holds the channel): one prediction, the others refused busy or as a replay; nothing is
    charged beyond what the payer signed."""
    from x402site.celery import app

    agent = Agent(channels_on)
    app.conf.task_always_eager = True
    try:
        assert agent.pay(Client()).status_code == 201  # opens the channel; its run ends at once
    finally:
        app.conf.task_always_eager = False
    headers = agent.header(Client())
    barrier = threading.Barrier(20)

    def send(_: int) -> requests.Response:
        barrier.wait(10)
        return requests.post(f"{live_server.url}{URL}", json=BODY, headers=headers, timeout=30)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(send, range(20)))
    codes = [a.status_code for a in answers]
    assert codes.count(201) == 1, codes
    errors = {decode_header(a.headers["PAYMENT-REQUIRED"])["error"] for a in answers if a.status_code == 402}
    assert errors <= {E.CHANNEL_BUSY.value, E.CUMULATIVE_AMOUNT_MISMATCH.value}
    assert all(a.headers.get("Retry-After") == "1" for a in answers if a.status_code == 402 and "busy" in a.text)
    assert len(codes) == 20 and set(codes) <= {201, 402, 429}
    channel = Channel.objects.get()
    [held] = Prediction.objects.filter(status="starting")
    assert channel.held_by == str(held.pk)
    assert int(channel.charged_cumulative) == PRICE  # charged when it ends, once


def test_finance_refunds_a_channels_unused_balance_from_the_admin(channels_on, demo_model, eager_celery, staff) -> None:
    from payments.channels import outbox
    from payments.channels.models import ChannelTxStatus
    from tests.conftest import wait_mined

    chain, client = channels_on, Client()
    agent = Agent(chain)
    payer = Account.from_key(agent.key).address
    before = token_balance(chain, payer)
    assert agent.pay(client).status_code == 201
    channel = Channel.objects.get()
    action = {"action": "refund_unused", "_selected_action": [channel.pk]}
    # An operator may look, not refund (finance approves refunds).
    staff["operator"].post("/admin/payments/channel/", action)
    assert not SettlementTx.objects.filter(kind=SettlementTx.Kind.CHANNEL_REFUND).exists()
    staff["finance"].post("/admin/payments/channel/", action)
    [tx] = SettlementTx.objects.filter(kind=SettlementTx.Kind.CHANNEL_REFUND)
    wait_mined(chain.rpc_url, tx.tx_hash)
    assert outbox.track(tx.pk) == ChannelTxStatus.MINED
    channel.refresh_from_db()
    assert int(channel.refunded) == 3 * PRICE - PRICE and int(channel.total_claimed) == PRICE
    assert token_balance(chain, payer) == before - PRICE


def test_a_channel_whose_withdrawal_finalizes_soon_takes_no_more_vouchers(
    channels_on, demo_model, eager_celery, monkeypatch
) -> None:
    """The payer starts a timed withdrawal: within the margin before it finalizes the gate
    refuses vouchers on the channel (what they would be charged might never be claimed); it
    reads the chain for that when its mirror is older than the state TTL."""
    from datetime import timedelta

    from payments.channels import gate, state
    from tests.conftest import rpc, wait_mined

    chain, client = channels_on, Client()
    agent = Agent(chain)
    assert agent.pay(client).status_code == 201
    channel = Channel.objects.get()
    data = state.calldata("initiateWithdraw", channel.config.abi(), int(channel.balance))
    payer = Account.from_key(agent.key).address
    wait_mined(chain.rpc_url, rpc(chain.rpc_url, "eth_sendTransaction", [{"from": payer, "to": bs.BATCH_SETTLEMENT_ADDRESS, "data": data}]))
    # Our mirror is fresh (read when the deposit was mined): the withdrawal is not seen yet.
    assert agent.pay(client).status_code == 201
    # Older than the TTL: read again; the withdrawal (a day's delay) finalizes in more than the margin.
    Channel.objects.update(chain_read_at=None)
    assert agent.pay(client).status_code == 201
    channel.refresh_from_db()
    assert channel.withdraw_finalize_after is not None
    monkeypatch.setattr(gate, "WITHDRAWAL_MARGIN", timedelta(days=2))
    response = agent.pay(client)
    refused(response, E.CUMULATIVE_EXCEEDS_BALANCE)
    assert "timed withdrawal" in response.json()["message"]
    assert ChannelCharge.objects.filter(channel=channel).count() == 3


def test_deposits_we_would_relay_for_nothing_are_refused_first(channels_on, demo_model, eager_celery) -> None:
    """A deposit about to expire (it could revert at our gas cost), and a first deposit below
    the minDeposit we offer, are refused before anything is sent."""
    import time

    chain, client = channels_on, Client()

    def expiring(obj: dict[str, Any]) -> None:
        obj["payload"]["deposit"]["authorization"]["erc3009Authorization"]["validBefore"] = str(int(time.time()) + 5)

    refused(Agent(chain).pay(client, tamper=expiring), E.VALID_BEFORE)
    small = Agent(chain, deposit_strategy=lambda ctx: ctx.minimum_deposit_amount)  # one request's worth
    refused(small.pay(client), E.DEPOSIT_PAYLOAD)
    assert not SettlementTx.objects.exists() and not Prediction.objects.exists()
