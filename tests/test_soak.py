"""Soak: mixed traffic on loopback for a bounded time against the live server and a real worker.

Challenges, paid creates, polls and bad inputs from several threads; then every accepted
payment must be in the ledger once, settled, and the pay-to's balance must have grown by
exactly their sum.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import requests
from eth_account import Account

from payments.models import Payment
from payments.options import payment_options
from payments.x402.types import Requirement
from tests.conftest import rpc, send_as_mint, token_balance
from tests.payers import v2_header

pytestmark = [
    pytest.mark.security,
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
]
URL = "/v1/models/demo/echo-text/predictions"
PRICE = 10_000
SECONDS = 12


def test_soak_mixed_traffic(chain_settings, demo_model, live_server, celery_worker_process, settings) -> None:
    settings.X402_RATE_LIMITS = {"challenge": "", "failed": ""}  # one client address drives it all
    chain = chain_settings
    payers = [Account.create() for _ in range(12)]
    for account in payers:
        send_as_mint(chain, account.address, 10**8)
    req = Requirement(payment_options()[0], PRICE)
    headers = [v2_header(a.key.hex(), req) for a in payers for _ in range(15)]
    random.shuffle(headers)
    lock = threading.Lock()
    statuses: Counter[str] = Counter()
    accepted: list[str] = []
    url = live_server.url + URL
    before = token_balance(chain, chain.pay_to)
    deadline = time.monotonic() + SECONDS

    def client(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while time.monotonic() < deadline:
            kind = rng.choice(["challenge", "paid", "paid", "poll", "bad"])
            if kind == "paid":
                with lock:
                    header = headers.pop() if headers else None
                if header is None:
                    kind = "challenge"
                else:
                    r = session.post(
                        url,
                        json={"input": {"text": "soak"}},
                        headers={"PAYMENT-SIGNATURE": header},
                        timeout=30,
                    )
                    if r.status_code == 201:
                        with lock:
                            accepted.append(r.json()["id"])
            if kind == "challenge":
                r = session.post(url, json={"input": {"text": "soak"}}, timeout=30)
            elif kind == "poll":
                with lock:
                    target = rng.choice(accepted) if accepted else "missing"
                r = session.get(f"{live_server.url}/v1/predictions/{target}", timeout=30)
            elif kind == "bad":
                r = session.post(
                    url,
                    data=rng.choice(["{", '{"input": 5}', '{"input": {"text": 7}}']),
                    headers={"Content-Type": "application/json", "PAYMENT-SIGNATURE": "junk"},
                    timeout=30,
                )
            with lock:
                statuses[f"{kind}:{r.status_code}"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    served = sum(statuses.values())
    errors = {k: v for k, v in statuses.items() if int(k.split(":")[1]) >= 500}
    print(f"soak: {served} requests in {SECONDS}s, {len(accepted)} paid, {dict(statuses)}")
    assert served > 100 and not errors
    assert {k.split(":")[1] for k in statuses if k.startswith("challenge")} <= {"402"}
    assert {k.split(":")[1] for k in statuses if k.startswith("bad")} <= {"400", "402", "422"}
    wait_until = time.monotonic() + 60
    while Payment.objects.exclude(status="confirmed").exists() and time.monotonic() < wait_until:
        time.sleep(0.25)
    ledger = Payment.objects.all()
    assert ledger.count() == len(accepted)  # nothing lost, nothing double-counted
    assert set(ledger.values_list("status", flat=True)) == {"confirmed"}
    assert token_balance(chain, chain.pay_to) - before == sum(int(p.amount) for p in ledger)
    assert rpc(chain.rpc_url, "eth_blockNumber", [])
