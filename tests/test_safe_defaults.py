"""Safe by default in production: debug off, weak keys refused, purpose-keyed derived secrets,
no secret in /readyz or the logs, operator-only metrics, the client address counted from the
right of X-Forwarded-For, webhooks pinned to the address that passed the SSRF check, and a
listing proof bound to this deployment and used once.

docs/security.md maps each of these to its defence.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.test import Client, override_settings

from payments.options import payment_options
from payments.x402.types import Requirement
from tests.conftest import free_port, option_settings
from tests.payers import v2_header
from tests.siwx import siwx_header

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parent.parent
URL = "/v1/models/demo/echo-text/predictions"
PUBLIC = "http://127.0.0.1:8000"  # X402_PUBLIC_URL's default


def run_django(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh process configured by ``env`` alone (nothing of the test settings)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "X402_"))}
    base["DJANGO_ENV_FILE"] = ""  # not the checkout's .env (the quick start's, if it ran here)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "x402site.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


SETUP = "import django; django.setup(); from django.conf import settings; print('DEBUG', settings.DEBUG)"
STRONG = "q5H2-Qz0_" + "x7Lr9aMk3vWc8NpT4yBd6FgJ1sEh0uKo2iRt5nYe9jXw3zCq8mVb"


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({}, "is the development key"),
        ({"DJANGO_SECRET_KEY": "a1b2c3d4e5" * 4 + "f6g7h8i9"}, "shorter than 50"),
        ({"DJANGO_SECRET_KEY": "django-insecure-" + STRONG}, "known default"),
        ({"DJANGO_SECRET_KEY": "x" * 60}, "fewer than 5 distinct"),
        ({"DJANGO_SECRET_KEY": STRONG}, None),
        ({"DJANGO_DEBUG": "true"}, None),  # the quick start's debug mode keeps the dev key
    ],
)
def test_production_is_the_default_and_a_weak_key_is_refused(env: dict[str, str], refused: str | None) -> None:
    done = run_django(SETUP, **env)
    if refused is None:
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"DEBUG {env.get('DJANGO_DEBUG') == 'true'}" in done.stdout
    else:
        assert done.returncode != 0
        assert "x402site.E001" in done.stderr and refused in done.stderr, done.stderr[-2000:]


def test_the_quick_start_needs_nothing_configured_and_check_deploy_reports_the_key() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "X402_"))}
    base["DJANGO_ENV_FILE"] = ""
    quick = subprocess.run(
        [sys.executable, "manage.py", "quickstart", "--help"], cwd=ROOT, env=base, capture_output=True, text=True
    )
    assert quick.returncode == 0, quick.stderr[-2000:]
    deploy = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env={**base, "DJANGO_DEBUG": "true"},
        capture_output=True,
        text=True,
    )
    assert deploy.returncode != 0 and "x402site.E001" in deploy.stderr, deploy.stderr[-2000:]


def test_the_suite_does_not_take_the_quick_starts_dev_chain() -> None:
    """Issue 25 (a CI flake): CI runs the quick start before the suite, which leaves
    var/devchain.json behind: another chain, whose extra relayer lanes and refund wallet have no
    gas money on the suite's anvil. The suite's settings take no option, lane or key from it
    (tests name their chain), so no test settles on a lane that cannot pay."""
    from tests import settings as suite
    from x402site.settings import relayer_keys_from_env

    assert "X402_DEVCHAIN_FILE" not in os.environ  # only the suite's subprocesses get theirs
    assert suite.X402_PAYMENT_OPTIONS == []
    assert relayer_keys_from_env() == suite.X402_RELAYER_KEYS  # the environment's, never the file's
    assert os.environ.get("X402_REFUND_KEY", "") == suite.X402_REFUND_KEY


def test_derived_secrets_use_a_keyed_derivation_with_a_purpose(settings) -> None:
    import base64

    from django.utils.crypto import salted_hmac

    from predictions.runners import cog
    from predictions.webhooks import secret

    settings.X402_WEBHOOK_SECRET = ""
    webhook_key = base64.b64decode(secret().removeprefix("whsec_"))
    assert webhook_key == salted_hmac("predictions.webhooks.secret", "whsec", algorithm="sha256").digest()
    token = cog.callback_token("abc")
    assert token == salted_hmac("predictions.runners.cog.callback", "abc", algorithm="sha256").hexdigest()
    settings.SECRET_KEY = STRONG
    assert base64.b64decode(secret().removeprefix("whsec_")) != webhook_key
    assert cog.callback_token("abc") != token


def test_the_refund_wallet_may_not_be_a_relayer(settings) -> None:
    """Refunds and settlements each count only their own held nonces under one RelayerNonce
    row: a shared key would collide. The check compares addresses, not the keys' spelling."""
    from payments.checks import check_refund_key_is_its_own

    relayer, refund = "0x" + "11" * 32, "0x" + "22" * 32
    settings.X402_RELAYER_KEY, settings.X402_RELAYER_KEYS = "", [relayer, "0x" + "33" * 32]
    settings.X402_REFUND_KEY = refund
    assert check_refund_key_is_its_own() == []
    settings.X402_REFUND_KEY = relayer.removeprefix("0x").upper()  # the same key, spelled otherwise
    [error] = check_refund_key_is_its_own()
    assert error.id == "payments.E007" and "X402_REFUND_KEY" in error.msg
    settings.X402_RELAYER_KEYS, settings.X402_RELAYER_KEY = [], relayer  # the single-relayer setting
    assert [e.id for e in check_refund_key_is_its_own()] == ["payments.E007"]
    settings.X402_REFUND_KEY = ""  # no refund wallet: nothing to collide
    assert check_refund_key_is_its_own() == []


@pytest.mark.django_db(transaction=True)
def test_no_rpc_url_key_in_readyz_errors_or_logs(chain, demo_model, caplog, settings) -> None:
    """An RPC URL carries the provider's key in its path or query: never shown, never logged."""
    from payments.checks import check_assets_on_chain
    from payments.facilitator import FacilitatorClient, FacilitatorUnavailable

    caplog.set_level(logging.DEBUG)
    secret_url = f"http://127.0.0.1:{free_port()}/v2/SECRETPATHKEY?apikey=SECRETQUERYKEY"
    # Set before override_settings: set inside it, the settings fixture's restore at teardown
    # would bring back the overridden options (the secret URL) for the tests that follow.
    settings.X402_OPS_TOKENS = ["ops-token"]
    with override_settings(**option_settings(chain, rpc_url=secret_url)):
        seen = [Client(REMOTE_ADDR="203.0.113.9").get("/readyz")]
        seen.append(Client().get("/readyz", headers={"Authorization": "Bearer ops-token"}))
        seen.append(Client().get("/readyz"))
        header = v2_header(chain.payers[0]["private_key"], Requirement(payment_options()[0], 10_000))
        paid = Client().post(
            URL, data=json.dumps({"input": {"text": "x"}}), content_type="application/json",
            headers={"PAYMENT-SIGNATURE": header},
        )
        assert paid.status_code == 503
        seen.append(paid)
        checks = [str(e) for e in check_assets_on_chain()]
    with pytest.raises(FacilitatorUnavailable) as failed:
        FacilitatorClient(secret_url, "Bearer SECRETAUTH", timeout=1, retries=0).verify(2, {}, {})
    assert [r.status_code for r in seen[:3]] == [503, 503, 503]
    assert seen[0].json()["checks"]["chain"] == {"ok": False}  # the name, nothing more
    assert seen[1].json()["checks"]["chain"] == {"ok": False, "error": "ChainUnavailable"}
    assert seen[2].json()["checks"]["chain"] == {"ok": False}  # a token is now required
    text = " ".join([r.content.decode() for r in seen] + checks + [str(failed.value), caplog.text])
    for secret in ("SECRETPATHKEY", "SECRETQUERYKEY", "SECRETAUTH", chain.relayer_private_key[2:]):
        assert secret not in text


@pytest.mark.django_db
def test_metrics_are_for_operators(settings) -> None:
    assert Client().get("/metrics").status_code == 200  # no token configured: this host only
    outside = Client(REMOTE_ADDR="203.0.113.9")
    assert outside.get("/metrics").status_code == 403
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    # Through a proxy on this host, the client is the proxy's entry, not a forged one.
    proxied = Client().get("/metrics", headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.9"})
    assert proxied.status_code == 403 and proxied["Content-Type"] == "application/problem+json"
    settings.X402_OPS_TOKENS = ["ops-token"]
    assert Client().get("/metrics").status_code == 403
    assert outside.get("/metrics", headers={"Authorization": "Bearer ops-token"}).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_rate_limits_count_the_client_from_the_right_of_x_forwarded_for(
    chain_settings, demo_model, settings
) -> None:
    settings.X402_RATE_LIMITS = {"challenge": "2/60", "failed": "", "webhook": ""}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    proxy = Client(REMOTE_ADDR="10.0.0.1")
    body = json.dumps({"input": {"text": "x"}})

    def create(forwarded: str) -> int:
        return proxy.post(
            URL, data=body, content_type="application/json", headers={"X-Forwarded-For": forwarded}
        ).status_code

    # The client forges the leftmost entries; the proxy appended the real one on the right.
    assert [create(f"198.51.100.{i}, 203.0.113.7") for i in range(3)] == [402, 402, 429]
    assert create("203.0.113.7, 203.0.113.8") == 402  # another client behind the same proxy
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 0}
    assert [create(f"203.0.113.{i}") for i in range(20, 23)] == [402, 402, 429]  # header ignored


class Sink:
    """An HTTP receiver on one loopback address, counting what reaches it."""

    def __init__(self, host: str, port: int) -> None:
        self.requests: list[dict[str, str]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                sink.requests.append(dict(self.headers))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def rebinding_resolver(monkeypatch):
    """``rebind.test`` answers a "public" address first, then 127.0.0.1 (DNS rebinding);
    127.0.0.2 plays the public address (the SSRF guard is told it is global)."""
    real_getaddrinfo = socket.getaddrinfo
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "slow.test":
            time.sleep(3)
        if host not in ("rebind.test", "slow.test", "public.test"):
            return real_getaddrinfo(host, port, *args, **kwargs)
        calls.append(host)
        ip = "127.0.0.1" if host == "rebind.test" and len(calls) > 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    original = ipaddress.IPv4Address.is_global
    monkeypatch.setattr(
        ipaddress.IPv4Address,
        "is_global",
        property(lambda self: str(self) == "127.0.0.2" or original.fget(self)),
    )
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


@pytest.mark.django_db(transaction=True)
def test_webhook_delivery_goes_to_the_address_that_passed_the_check(demo_model, rebinding_resolver, settings):
    from predictions.models import Prediction
    from predictions.webhooks import deliver

    settings.X402_WEBHOOK_ALLOW_PRIVATE = False
    port = free_port()
    public, internal = Sink("127.0.0.2", port), Sink("127.0.0.1", port)
    try:
        version = demo_model.latest_version
        prediction = Prediction.objects.create(
            model=demo_model, version=version, input={"text": "x"}, webhook=f"http://rebind.test:{port}/hook"
        )
        assert deliver.apply(args=(prediction.id, "completed", "msg_rebind")).get() == "delivered"
    finally:
        public.close()
        internal.close()
    assert internal.requests == []  # the rebound answer was never asked for, nor connected to
    assert [r["Host"] for r in public.requests] == [f"rebind.test:{port}"]
    assert rebinding_resolver == ["rebind.test"]  # resolved once, by the check


@pytest.mark.django_db(transaction=True)
def test_webhook_check_is_rate_limited_and_has_a_short_dns_timeout(
    chain_settings, demo_model, rebinding_resolver, settings, monkeypatch
) -> None:
    settings.X402_WEBHOOK_ALLOW_PRIVATE = False
    monkeypatch.setattr("predictions.webhooks.DNS_TIMEOUT", 0.3)
    started = time.monotonic()
    slow = Client().post(
        URL, data=json.dumps({"input": {"text": "x"}, "webhook": "http://slow.test/h"}), content_type="application/json"
    )
    assert slow.status_code == 422 and "did not resolve within" in slow.json()["invalid_fields"]["webhook"]
    assert time.monotonic() - started < 2
    from django.core.cache import cache

    cache.clear()
    settings.X402_RATE_LIMITS = {"challenge": "", "failed": "", "webhook": "1/60"}
    body = json.dumps({"input": {"text": "x"}, "webhook": "http://public.test/h"})
    codes = [Client().post(URL, data=body, content_type="application/json").status_code for _ in range(2)]
    assert codes == [402, 429]
    assert rebinding_resolver.count("public.test") == 1  # the refused request resolved nothing


@pytest.mark.django_db(transaction=True)
def test_a_listing_proof_is_bound_to_this_deployment_and_used_once(chain_settings, demo_model) -> None:
    key = chain_settings.payers[0]["private_key"]

    def listing(header: str):  # type: ignore[no-untyped-def]
        return Client().get("/v1/predictions", headers={"SIGN-IN-WITH-X": header})

    other = listing(siwx_header(key, "https://other-deployment.example"))
    assert other.status_code == 403 and "invalid_siwx_domain_mismatch" in other.json()["detail"]
    moved = listing(siwx_header(key, PUBLIC, uri="https://other-deployment.example/v1/predictions"))
    assert moved.status_code == 403 and "invalid_siwx_uri_mismatch" in moved.json()["detail"]
    proof = siwx_header(key, PUBLIC)
    assert listing(proof).status_code == 200
    again = listing(proof)
    assert again.status_code == 403 and "invalid_siwx_nonce" in again.json()["detail"]
    old = listing(siwx_header(key, PUBLIC, issued_at=datetime.now(UTC) - timedelta(minutes=6)))
    assert old.status_code == 403 and "too_old" in old.json()["detail"]


def test_the_quick_starts_env_file_lets_its_checkouts_commands_run(tmp_path) -> None:
    """`make run` writes a .env (debug on) that every later manage.py command of the checkout
    reads, so the README's commands run as printed; a .env of the user's is never overwritten."""
    from payments.management.commands.quickstart import write_dev_env

    path = tmp_path / ".env"
    assert write_dev_env(path) and write_dev_env(path)  # ours: rewritten on every run
    started = run_django(SETUP, DJANGO_ENV_FILE=str(path))
    assert started.returncode == 0, started.stderr[-2000:]
    assert "DEBUG True" in started.stdout
    path.write_text("DJANGO_SECRET_KEY=mine\n")
    assert not write_dev_env(path)
    assert path.read_text() == "DJANGO_SECRET_KEY=mine\n"
