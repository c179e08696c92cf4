"""A person pays on the paywall page with a browser wallet: headless Chromium (Debian's package)
opens a paid endpoint, an injected EIP-1193 wallet signs with anvil's dev account, a real
Celery worker settles and runs the prediction, and the output appears on the page."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from payments.models import Payment
from payments.x402.codec import decode_header
from predictions.models import Prediction, SettlementPolicy
from tests.conftest import token_balance

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PRICE = 10_000  # demo/echo-text: 0.01 USDC


def pay_in_browser(url: str, rpc_url: str, account: str, text: str, screenshot: Path) -> dict:
    node = shutil.which("node")
    assert node and Path(CHROMIUM).exists(), "the browser test needs node and Debian's chromium (make tools)"
    run = subprocess.run(
        [
            node,
            str(ROOT / "tests" / "browser" / "pay_with_wallet.mjs"),
            "--url",
            url,
            "--rpc",
            rpc_url,
            "--account",
            account,
            "--field",
            f"text={text}",
            "--screenshot",
            str(screenshot),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy", [SettlementPolicy.BEFORE_RUN, SettlementPolicy.AFTER_SUCCESS])
def test_a_person_pays_with_a_browser_wallet_and_sees_the_output(
    chain_settings, demo_model, live_server, celery_worker_process, tmp_path, policy
) -> None:
    """after_success holds the payment through the run: the page must sign for the 402's longer
    maxTimeoutSeconds, or the gate refuses the authorization as expiring too soon."""
    chain = chain_settings
    demo_model.settlement_policy = policy
    demo_model.save()
    payer = chain.payers[3]["address"]
    before = token_balance(chain, payer)
    # The model's "try it" link is the paid endpoint, which a browser gets as the paywall page.
    url = requests.get(f"{live_server.url}/v1/models/demo/echo-text", timeout=10).json()["try_url"]
    assert url == f"{live_server.url}/v1/models/demo/echo-text/predictions"
    text = f"paid in the browser ({policy})"

    started = time.monotonic()
    page = pay_in_browser(url, chain.rpc_url, payer, text, tmp_path / "paid.png")
    print(f"paid in the browser ({policy}), from launch to output, in {time.monotonic() - started:.2f}s")

    assert page["state"] == "succeeded", page
    assert page["output"] == text
    assert page["errors"] == []
    assert {"eth_requestAccounts", "wallet_switchEthereumChain", "eth_signTypedData_v4"} <= set(page["methods"])
    deadline = time.monotonic() + 20  # after_success settles after the run
    while token_balance(chain, payer) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert token_balance(chain, payer) == before - PRICE
    [payment] = Payment.objects.all()
    [prediction] = Prediction.objects.all()
    assert prediction.payment == payment and payment.payer == payer and prediction.output == text
    assert payment.settle_tx_hash and payment.settle_tx_hash in page["details"]
    # The page paid exactly the requirement the JSON 402 carries for this input.
    agent = requests.post(url, json={"input": {"text": text}}, timeout=10)
    assert payment.requirement == decode_header(agent.headers["PAYMENT-REQUIRED"])["accepts"][0]
    if policy == SettlementPolicy.AFTER_SUCCESS:
        assert payment.requirement["maxTimeoutSeconds"] > 300


def _json_script(html: str, element_id: str) -> object:
    start = html.index(f'<script id="{element_id}" type="application/json">')
    start = html.index(">", start) + 1
    return json.loads(html[start : html.index("</script>", start)])


def test_the_page_pays_what_the_402_asks_and_resends_the_request_fields(chain_settings, demo_model) -> None:
    """The page's requirement is the PAYMENT-REQUIRED header itself; a POST to /v1/predictions
    keeps its version when the page sends it again with the visitor's input."""
    from django.test import Client

    version = demo_model.latest_version
    page = Client().post(
        "/v1/predictions",
        data=json.dumps({"version": version.id, "input": {"text": "hi"}}),
        content_type="application/json",
        headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
    )
    assert page.status_code == 402 and page["Content-Type"].startswith("text/html")
    html = page.content.decode()
    assert _json_script(html, "x402-payment-required") == decode_header(page["PAYMENT-REQUIRED"])
    assert _json_script(html, "x402-request-fields") == {"version": version.id}
    assert _json_script(html, "x402-input-schema") == version.input_schema
    assert "/static/paywall/paywall.js" in html and "https://cdn" not in html
