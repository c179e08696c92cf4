"""Bring the whole stack up locally: chain, token, database, demo model, worker, web server.

Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from payments.chain import devchain
from x402site.conf import x402

BASE_DIR = Path(settings.BASE_DIR)
#: Relayer lanes besides the first (anvil accounts 10 and up).
EXTRA_LANES = 4


def ensure_database(fresh: bool) -> None:
    """Create the configured PostgreSQL database if needed; ``fresh`` drops it first.

    The embedded default database belongs to the dev chain, which starts empty on every run:
    a ledger left from an earlier chain would point at transactions that no longer exist.
    """
    db = settings.DATABASES["default"]
    if "postgresql" not in db["ENGINE"]:
        return
    params = {
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
    }
    with psycopg.connect(
        dbname="postgres", autocommit=True, **{k: v for k, v in params.items() if v}
    ) as conn:
        if fresh:
            conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{db["NAME"]}"')


#: The first line of the .env the quick start writes: a file without it is the user's, never touched.
DEV_ENV_MARK = "# Written by `make run` (manage.py quickstart): development values for this checkout only."
DEV_ENV = f"""{DEV_ENV_MARK}
# It lets every manage.py command of the README run here as printed (e.g. export_ledger) against
# the quick start's database and dev chain. Never copy it to a server: production sets its own
# environment (docs/deploy.md). Rewritten by every `make run`; delete it to go back to defaults.
DJANGO_DEBUG=true
# Payment channels (batch-settlement) claim early here: once 0.1 USDC is unclaimed, swept every
# 5 s, so examples/agent_pay_channel.py sees its claim and settle to pay-to within seconds.
X402_CHANNEL_CLAIM_UNCLAIMED_MAX=100000
X402_CHANNEL_SWEEP_INTERVAL=5
"""


def write_dev_env(path: Path) -> bool:
    """Write the quick start's ``.env`` at ``path`` unless a file of the user's is there; whether
    it wrote it."""
    if path.exists() and not path.read_text().startswith(DEV_ENV_MARK):
        return False
    path.write_text(DEV_ENV)
    return True


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--chain-port", type=int, default=8545)

    def handle(self, *args: Any, **opts: Any) -> None:
        started = time.monotonic()
        var = BASE_DIR / "var"
        var.mkdir(exist_ok=True)
        children: list[subprocess.Popen] = []
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            # Only the embedded default is ours to reset; a configured DATABASE_URL is kept.
            embedded = "DATABASE_URL" not in os.environ
            ensure_database(fresh=embedded)
            self.stdout.write("starting anvil and deploying the test USDC...")
            try:
                # 0 deploys and relays, 1 is paid, 2-9 are demo payers, 10-13 more relayer lanes.
                anvil, config = devchain.start_anvil(
                    opts["chain_port"], accounts=10 + EXTRA_LANES, log_path=var / "anvil.log"
                )
            except RuntimeError as exc:
                raise CommandError(f"{exc} (is port {opts['chain_port']} already in use?)") from exc
            children.append(anvil)
            chain = devchain.deploy(
                f"http://127.0.0.1:{opts['chain_port']}", config, extra_relayers=EXTRA_LANES
            )
            chain.write(x402.chain.devchain_file)
            if not write_dev_env(BASE_DIR / ".env"):
                self.stdout.write(self.style.WARNING(".env is yours, left as it is: without DJANGO_DEBUG=true in it, "
                                                     "manage.py commands here refuse the development key"))
            manage = [sys.executable, str(BASE_DIR / "manage.py")]
            subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], check=True)
            subprocess.run([*manage, "seed_demo"], check=True)
            if embedded:
                self._dev_admin()
            # Two workers: settlement never waits behind a slow prediction (x402site.celery.route_task).
            from x402site.celery import app, settlement_queue

            celery = [sys.executable, "-m", "celery", "-A", "x402site", "worker", "-l", "info", "--concurrency", "2"]
            worker_log = open(var / "worker.log", "ab")
            children.append(
                subprocess.Popen(
                    [*celery, "-Q", settlement_queue(), "-n", "settlement@%h"],
                    stdout=worker_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            children.append(
                subprocess.Popen(
                    [
                        *celery,
                        "-Q",
                        app.conf.task_default_queue,
                        "-n",
                        "predictions@%h",
                        "-B",
                        "-s",
                        str(var / "celerybeat-schedule"),
                    ],
                    stdout=worker_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            # One ASGI server for every route, as deployed (docs/deploy.md): the prediction
            # streams and Prefer: wait wait on its event loop, not in a thread each.
            asgi = [sys.executable, "-m", "uvicorn", "x402site.asgi:application"]
            children.append(
                subprocess.Popen(
                    [*asgi, "--host", "127.0.0.1", "--port", str(opts["port"])],
                    start_new_session=True,
                )
            )
            devchain.wait_for_rpc(chain.rpc_url)
            devchain.wait_http(f"http://127.0.0.1:{opts['port']}/v1/predictions/none")
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nReady in {time.monotonic() - started:.1f}s: http://127.0.0.1:{opts['port']}\n"
                )
            )
            self.stdout.write(
                f"  chain      {chain.rpc_url} (chain id {chain.chain_id}), test USDC {chain.asset}\n"
                f"  settlement BatchSettler {chain.batch_settler}, {len(chain.relayer_private_keys)} relayer lanes\n"
                f"  pay-to     {chain.pay_to}\n"
                f"  dev chain  {x402.chain.devchain_file} ({len(chain.payers)} funded payers)\n"
                f"  admin      http://127.0.0.1:{opts['port']}/admin/ (user admin, password admin: dev only)\n"
                f"  logs       {var}/worker.log, {var}/anvil.log\n\n"
                "Pay for a prediction as an agent would (in another terminal):\n"
                "  make agent\n"
                '  .venv-agent/bin/python examples/agent_pay.py "hello"\n'
                "and watch a streaming model's words arrive one by one (replicate.stream):\n"
                '  .venv-agent/bin/python examples/replicate_agent.py --stream "streams arrive word by word"\n\n'
                "Ctrl-C stops everything.\n"
            )
            while all(c.poll() is None for c in children):
                time.sleep(0.5)
            raise CommandError("a component exited; see var/*.log")
        except KeyboardInterrupt:
            self.stdout.write("\nstopping...")
        finally:
            for child in reversed(children):
                devchain.stop(child)

    @staticmethod
    def _dev_admin() -> None:
        """A superuser admin/admin on the dev database, so the admin can be tried at once."""
        from django.contrib.auth import get_user_model

        User = get_user_model()  # noqa: N806
        if not User.objects.filter(username="admin").exists():
            User.objects.create_superuser("admin", "admin@localhost", "admin")
