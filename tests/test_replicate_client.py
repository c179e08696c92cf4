"""The official ``replicate`` client (pinned in requirements-dev), as an agent written for
Replicate would use it, through a transport that pays each x402 challenge with the official
x402 SDK: every call works, and no payment goes without its result.

Against the live server, a real Celery worker and the local chain; the payer is a fresh
account, so its balance shows exactly what was charged.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import replicate
from eth_account import Account
from pydantic.v1 import ValidationError
from replicate.exceptions import ReplicateError
from x402 import x402ClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client

from payments.models import PAID_STATUSES, HardwareTier, Payment
from predictions.models import ModelVersion, Prediction
from tests.conftest import fresh_payer, token_balance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from x402_transport import X402Transport  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PRICE = 10_000
SLEEPY = "7" * 64


def agent(base_url: str, chain, key: str, **client_kwargs) -> tuple[replicate.Client, X402Transport]:
    """The replicate client with no API token, paying through the x402 transport."""
    account = Account.from_key(key)
    x402 = x402ClientSync()
    register_exact_evm_client(x402, account)
    x402.set_spend_controls(
        {"allowed_assets": [{"network": chain.network, "asset": chain.asset, "max_amount_per_payment": str(PRICE)}]}
    )
    transport = X402Transport(x402, siwx_account=account)
    return replicate.Client(api_token="", base_url=base_url, transport=transport, **client_kwargs), transport


def test_every_call_of_the_official_client_and_no_payment_without_its_result(
    chain_settings, demo_model, live_server, celery_worker_process, settings
) -> None:
    settings.X402_PUBLIC_URL = live_server.url  # sign-in-with-x proofs are bound to this origin
    chain = chain_settings
    echo = demo_model.latest_version
    ModelVersion.objects.create(
        id=SLEEPY,
        model=demo_model,
        predictor="tests.predictors.Sleepy",
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string"}, "seconds": {"type": "number", "default": 0}},
            "required": ["text"],
        },
        output_schema={"type": "string"},
        created_at=echo.created_at - timedelta(days=1),  # not the latest: run("demo/echo-text") runs echo
    )
    HardwareTier.objects.get_or_create(slug="cpu", defaults={"name": "CPU", "price_per_second": "0.0001"})
    payer = fresh_payer(chain)
    before = token_balance(chain, payer["address"])
    client, transport = agent(live_server.url, chain, payer["private_key"])
    results: list[str] = []  # the prediction each paid call handed back

    # run("owner/name:version"): create (paid), then GET .../versions/{id}, then the output.
    assert client.run(f"demo/echo-text:{echo.id}", input={"text": "by version"}) == "by version"
    results.append("by version")
    # run("owner/name"): the model's latest version.
    assert client.run("demo/echo-text", input={"text": "by name"}) == "by name"
    results.append("by name")
    # A wait that runs out before the end: the create answers "starting", run() polls to the end.
    assert client.run(f"demo/echo-text:{SLEEPY}", input={"text": "patient", "seconds": 2}, wait=1) == "patient"
    results.append("patient")

    # models.get, models.versions.list/get: free.
    model = client.models.get("demo/echo-text")
    assert model.latest_version.id == echo.id and isinstance(model.latest_version.cog_version, str)
    assert model.run_count == 3
    assert [v.id for v in model.versions.list().results] == [echo.id, SLEEPY]  # newest first
    version = model.versions.get(SLEEPY)
    assert version.openapi_schema["components"]["schemas"]["Input"]["properties"]["seconds"]["default"] == 0

    # predictions.create / get / list / cancel.
    created = client.predictions.create(version=echo.id, input={"text": "created"})
    results.append(created.id)
    created.wait()
    assert created.status == "succeeded" and client.predictions.get(created.id).output == "created"
    slow = client.predictions.create(version=SLEEPY, input={"text": "slow", "seconds": 8})
    results.append(slow.id)
    deadline = time.monotonic() + 30
    while client.predictions.get(slow.id).status != "processing" and time.monotonic() < deadline:
        time.sleep(0.2)
    canceled = client.predictions.cancel(slow.id)
    assert canceled.status == "canceled"
    listed = {p.id for p in client.predictions.list().results}  # with a sign-in-with-x proof
    assert {created.id, slow.id} <= listed and len(listed) == 5

    # accounts.current (the payer, proven the same way), hardware.list, collections (not offered).
    assert client.accounts.current().username == payer["address"]
    assert [h.sku for h in client.hardware.list()] == [t.slug for t in HardwareTier.objects.filter(active=True)]
    with pytest.raises(ReplicateError) as missing:
        client.collections.list()
    assert missing.value.status == 404 and "GET /v1/models" in missing.value.detail

    # Each payment the transport made bought the answer of the call that made it.
    assert [r.status for r in transport.receipts] == [201] * len(results)
    paid = Payment.objects.filter(payer=payer["address"])
    assert paid.count() == len(results)
    deadline = time.monotonic() + 30
    while paid.exclude(status__in=PAID_STATUSES).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert token_balance(chain, payer["address"]) == before - PRICE * len(results)
    # The canceled run was paid for before it started (before_run): it is the prediction cancel returned.
    assert Prediction.objects.get(pk=slow.id).payment.status in PAID_STATUSES


def test_run_ends_on_aborted_and_the_agent_is_not_charged(
    chain_settings, demo_model, live_server, celery_worker_process, settings
) -> None:
    """``aborted`` (Cancel-After passed before the start) is not a status the 1.0.x client
    knows: it raises at once (pydantic rejects the status), it does not poll forever. Under
    ``after_success`` the authorization is released: nothing is charged."""
    demo_model.settlement_policy = "after_success"
    demo_model.save()
    chain = chain_settings
    payer = fresh_payer(chain)
    before = token_balance(chain, payer["address"])
    client, transport = agent(live_server.url, chain, payer["private_key"], headers={"Cancel-After": "1ms"})
    started = time.monotonic()
    with pytest.raises(ValidationError, match="aborted"):
        client.run("demo/echo-text", input={"text": "too late"})
    assert time.monotonic() - started < 30
    [receipt] = transport.receipts
    assert receipt.status == 201 and receipt.settlement["success"] is False
    prediction = Prediction.objects.get(payment__payer=payer["address"])
    assert prediction.status == "aborted" and prediction.payment.status not in PAID_STATUSES
    assert token_balance(chain, payer["address"]) == before
