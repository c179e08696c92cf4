"""End to end with payment channels: the official x402 SDK's ``batch-settlement`` client pays
predictions on a live server; one deposit, then vouchers only; a real Celery worker (with beat)
runs the predictions, claims the channel's vouchers and settles to pay-to; the SDK's cooperative
refund returns the rest. The chain, the ledger and the agent agree to the unit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
import requests
from django.test import override_settings
from eth_account import Account
from eth_utils import to_checksum_address
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    InMemoryClientChannelStorage,
)

from payments.channels.models import Channel, ChannelCharge, ChannelTx, ChannelTxStatus
from payments.models import Payment, SettlementTx
from payments.x402.codec import decode_header
from predictions.models import Prediction
from predictions.runclock import run_seconds
from tests.conftest import TEST_QUEUE, fresh_payer, option_settings, start_worker, token_balance
from tests.invariants import channel_violations, settled_for
from tests.test_upto_e2e import PER_SECOND, export_rows, per_second_model  # noqa: F401 - a fixture

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PRICE = 10_000  # demo/echo-text: 0.01 USDC
REQUESTS = 20
Kind = SettlementTx.Kind


@pytest.fixture
def channel_server(chain, demo_model, live_server, tmp_path) -> Iterator[dict[str, Any]]:
    """Channels on (the dev chain's receiverAuthorizer) with a pay-to of this test's own (the
    contract's figures for it start at 0), and a worker whose beat sweeps channels every second
    and claims a channel once 20 requests' charges are unclaimed."""
    pay_to = to_checksum_address(fresh_payer(chain, 0)["address"])
    options = option_settings(chain, pay_to=pay_to)
    settings = {**options, "X402_CHANNEL_AUTHORIZER_KEY": chain.channel_authorizer_private_key, "X402_CHANNELS": True}
    with override_settings(**settings):
        worker = start_worker(
            chain,
            tmp_path / "worker.log",
            TEST_QUEUE,
            beat=True,
            env={
                "X402_PAYMENT_OPTIONS": json.dumps(options["X402_PAYMENT_OPTIONS"]),
                "X402_RELAYER_KEYS": ",".join(options["X402_RELAYER_KEYS"]),
                "X402_CHANNEL_AUTHORIZER_KEY": chain.channel_authorizer_private_key,
                "X402_CHANNELS": "true",
                "X402_CHANNEL_SWEEP_INTERVAL": "1",
                "X402_CHANNEL_CLAIM_UNCLAIMED_MAX": str(REQUESTS * PRICE),
                "X402_PUBLIC_URL": live_server.url,
            },
        )
        try:
            yield {"url": live_server.url, "log": tmp_path / "worker.log", "pay_to": pay_to}
        finally:
            from payments.chain import devchain

            devchain.stop(worker)


def agent_session(chain, key: str) -> tuple[requests.Session, BatchSettlementEvmScheme, InMemoryClientChannelStorage]:  # type: ignore[no-untyped-def]
    """The agent as the SDK makes it: a requests session paying through the batch-settlement
    client, allowed to pay the test token (up to 1 USDC a request; deposits up to 5 times that)."""
    storage = InMemoryClientChannelStorage()
    scheme = BatchSettlementEvmScheme(Account.from_key(key), BatchSettlementEvmSchemeOptions(storage=storage))
    client = x402ClientSync()
    client.register("eip155:*", scheme)
    client.set_spend_controls(
        {"allowed_assets": [{"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(10**6)}]}
    )
    return wrapRequestsWithPayment(requests.Session(), client), scheme, storage


def wait_until(check, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_the_sdk_client_pays_twenty_predictions_with_one_deposit(chain, channel_server, capsys, staff) -> None:
    payer = fresh_payer(chain, 10**7)  # 10 USDC
    before_payer = token_balance(chain, payer["address"])
    before_pay_to = token_balance(chain, channel_server["pay_to"])
    settled_before = settled_for(chain.rpc_url, channel_server["pay_to"], chain.asset)
    session, scheme, storage = agent_session(chain, payer["private_key"])
    url = f"{channel_server['url']}/v1/models/demo/echo-text/predictions"

    challenge = requests.post(url, json={"input": {"text": "x"}}, timeout=10)
    assert challenge.status_code == 402
    assert "batch-settlement" not in [a["scheme"] for a in challenge.json()["accepts"]]  # the v1 body
    [offer] = [a for a in decode_header(challenge.headers["PAYMENT-REQUIRED"])["accepts"] if a["scheme"] == "batch-settlement"]
    assert offer["amount"] == str(PRICE) and offer["payTo"] == channel_server["pay_to"]
    assert offer["extra"]["receiverAuthorizer"] == Account.from_key(chain.channel_authorizer_private_key).address
    outputs = []
    for i in range(REQUESTS):
        response = session.post(url, json={"input": {"text": f"call {i}"}}, headers={"Prefer": "wait"}, timeout=60)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "succeeded", body
        outputs.append(body["output"])
        answer = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
        assert answer.success and answer.extra["chargedAmount"] == str(PRICE)
        assert answer.extra["channelState"]["chargedCumulativeAmount"] == str((i + 1) * PRICE)
    assert outputs == [f"call {i}" for i in range(REQUESTS)]

    # One transaction from the agent's side: the deposit; no payment rows, no transfer per request.
    assert Payment.objects.count() == 0
    assert sorted(SettlementTx.objects.values_list("kind", flat=True)) in ([Kind.CHANNEL_DEPOSIT], [Kind.CHANNEL_CLAIM, Kind.CHANNEL_DEPOSIT])
    [channel] = Channel.objects.all()
    deposit = int(ChannelTx.objects.get(tx__kind=Kind.CHANNEL_DEPOSIT).amount)
    assert token_balance(chain, payer["address"]) == before_payer - deposit
    charges = list(ChannelCharge.objects.filter(channel=channel).order_by("cumulative"))
    assert [int(c.amount) for c in charges] == [PRICE] * REQUESTS
    assert {c.reference for c in charges} == {str(p.pk) for p in Prediction.objects.all()}
    known = storage.get(channel.channel_id)  # what the agent believes of its channel
    assert int(known.charged_cumulative_amount) == REQUESTS * PRICE and int(known.balance) == deposit

    # Later, the worker's beat claims the vouchers (due at 20 charges) and settles to pay-to.
    def settled() -> bool:
        return ChannelTx.objects.filter(tx__kind=Kind.CHANNEL_SETTLE, status=ChannelTxStatus.MINED).exists()

    wait_until(settled, 40, "the claim and the settle to pay-to")
    assert ChannelTx.objects.filter(tx__kind=Kind.CHANNEL_CLAIM, status=ChannelTxStatus.MINED).exists()
    assert token_balance(chain, channel_server["pay_to"]) == before_pay_to + REQUESTS * PRICE
    channel.refresh_from_db()
    assert int(channel.total_claimed) == int(channel.charged_cumulative) == REQUESTS * PRICE

    # The SDK's cooperative refund returns exactly the rest.
    answer = scheme.refund(f"{channel_server['url']}/v1/channels/refund")
    assert answer.success and answer.transaction
    assert token_balance(chain, payer["address"]) == before_payer - REQUESTS * PRICE
    channel.refresh_from_db()
    assert int(channel.refunded) == deposit - REQUESTS * PRICE
    assert int(channel.balance) == int(channel.total_claimed) == REQUESTS * PRICE
    # The auditor's view: the ledger against the contract, read raw.
    assert channel_violations(chain.rpc_url, channel_server["pay_to"], chain.asset, settled_before) == []

    # Finance: the export's channel lines and the dashboard's earned / claimed / settled.
    rows = export_rows(capsys)
    charged = [r for r in rows if r["kind"] == "channel_charge"]
    assert len(charged) == REQUESTS and {r["status"] for r in charged} == {"claimed"}
    assert sum(int(r["amount_atomic"]) for r in charged) == REQUESTS * PRICE
    assert {r["model"] for r in charged} == {"demo/echo-text"}
    sent = {r["status"].split(":")[0]: r for r in rows if r["kind"] == "channel_tx"}
    assert set(sent) == {Kind.CHANNEL_DEPOSIT, Kind.CHANNEL_CLAIM, Kind.CHANNEL_SETTLE, Kind.CHANNEL_REFUND}
    assert int(sent[Kind.CHANNEL_SETTLE]["charged_atomic"]) == REQUESTS * PRICE
    assert int(sent[Kind.CHANNEL_REFUND]["amount_atomic"]) == deposit - REQUESTS * PRICE
    page = staff["finance"].get("/admin/payments/payment/dashboard/").content.decode()
    figures = page[page.index('id="channels"') :]
    assert '<td class="earned">0.200000</td>' in figures and '<td class="settled">0.200000</td>' in figures
    assert '<td class="claimed">0.200000</td>' in figures
    # Reconciliation: what the channels' contract sent to pay-to is the settle's, matched.
    from datetime import timedelta

    from django.utils import timezone

    from payments.finance.reconciliation import LineKind, LineStatus, Period, report

    now = timezone.now()
    lines = report(Period(now - timedelta(hours=1), now + timedelta(minutes=1))).lines
    [settle] = [line for line in lines if line.kind == LineKind.CHANNEL_SETTLE]
    assert settle.status == LineStatus.MATCHED and settle.amount == REQUESTS * PRICE
    assert not [line for line in lines if line.needs_attention and line.kind == LineKind.CHANNEL_SETTLE]


@pytest.mark.usefixtures("per_second_model")
def test_a_per_second_model_is_charged_its_measured_seconds_within_the_ceiling(chain, channel_server) -> None:
    """demo/count-seconds on a channel: the voucher's ceiling is the time limit's price (10 s),
    each run is charged the seconds it took; the refund claims what was charged and returns the
    rest, and the next sweep settles the claim to pay-to."""
    payer = fresh_payer(chain, 10**7)
    before_payer = token_balance(chain, payer["address"])
    before_pay_to = token_balance(chain, channel_server["pay_to"])
    session, scheme, _ = agent_session(chain, payer["private_key"])
    url = f"{channel_server['url']}/v1/models/demo/count-seconds/predictions"
    ceiling = 10 * int(PER_SECOND * 10**6)
    charged = []
    for seconds in (0.2, 0.5, 1.0):
        response = session.post(url, json={"input": {"seconds": seconds}}, headers={"Prefer": "wait"}, timeout=60)
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "succeeded"
        answer = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
        amount = int(answer.extra["chargedAmount"])
        prediction = Prediction.objects.get(pk=response.json()["id"])
        # Its measured seconds at the tier's price, rounded up once; never above the ceiling.
        seconds_run = run_seconds(prediction, prediction.completed_at)
        expected = min(ceiling, int((PER_SECOND * seconds_run * 10**6).to_integral_value(rounding=ROUND_CEILING)))
        assert seconds_run >= Decimal(str(seconds))
        assert amount == expected and 0 < amount < ceiling
        charged.append(amount)
    channel = Channel.objects.get()
    assert [int(c.amount) for c in channel.charges.order_by("cumulative")] == charged
    assert int(channel.charged_cumulative) == sum(charged)

    answer = scheme.refund(f"{channel_server['url']}/v1/channels/refund")
    assert answer.success
    assert token_balance(chain, payer["address"]) == before_payer - sum(charged)

    def settled() -> bool:
        return ChannelTx.objects.filter(tx__kind=Kind.CHANNEL_SETTLE, status=ChannelTxStatus.MINED).exists()

    wait_until(settled, 40, "the settle to pay-to")
    assert token_balance(chain, channel_server["pay_to"]) == before_pay_to + sum(charged)


def test_mcp_tool_calls_pay_through_the_channel(chain, channel_server) -> None:
    """The SDK's x402 MCP session with its batch-settlement client: the first tool call deposits,
    the next ones pay with vouchers; each result's payment response carries the charge. The MCP
    session does not run the scheme's payment-response hook (the SDK's HTTP clients do), so the
    agent hands each response to it (docs/channels.md), as below."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from x402 import x402Client
    from x402.mcp import x402MCPSession
    from x402.schemas import PaymentResponseContext

    payer = fresh_payer(chain, 10**7)
    scheme = BatchSettlementEvmScheme(Account.from_key(payer["private_key"]))
    client = x402Client()
    client.register("eip155:*", scheme)
    client.set_spend_controls(
        {"allowed_assets": [{"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(10**6)}]}
    )

    class Remembering:
        """The x402 client, keeping the payload it made last (for the scheme's hook)."""

        last: Any = None

        async def create_payment_payload(self, required: Any) -> Any:
            self.last = await client.create_payment_payload(required)
            return self.last

    payments = Remembering()

    async def calls() -> list[Any]:
        async with (
            streamable_http_client(f"{channel_server['url']}/mcp") as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            paying = x402MCPSession(session, payments)  # type: ignore[arg-type]
            results = []
            for i in range(3):
                result = await paying.call_tool("demo__echo-text", {"text": f"tool {i}"})
                ctx = PaymentResponseContext(payments.last, payments.last.accepted, result.payment_response)
                scheme.scheme_hooks.on_payment_response(ctx)
                results.append(result)
            return results

    results = asyncio.run(calls())
    assert [r.content[0].text for r in results] == ["tool 0", "tool 1", "tool 2"]
    answers = [r.payment_response for r in results]
    assert all(a.success for a in answers) and answers[0].transaction and not answers[1].transaction
    assert [a.extra["chargedAmount"] for a in answers] == [str(PRICE)] * 3
    assert [a.extra["channelState"]["chargedCumulativeAmount"] for a in answers] == [str(PRICE * i) for i in (1, 2, 3)]
    assert list(SettlementTx.objects.values_list("kind", flat=True)) == [Kind.CHANNEL_DEPOSIT]
    assert int(Channel.objects.get().charged_cumulative) == 3 * PRICE
