#!/usr/bin/env python
"""Benchmarks: payment overhead, throughput and cost growth, side by side with the reference.

    .venv/bin/python benchmarks/run.py            # the full suite (about 20 minutes)
    .venv/bin/python benchmarks/run.py --quick    # a smoke run (about 1.5 minutes)

Starts its own anvil, database (``x402_bench``, or ``X402_BENCH_DATABASE``), Redis database
(13, or ``X402_BENCH_REDIS``), our uvicorn (as deployed) and gunicorn servers, Celery workers and load generator (wrk), prints
a table and writes ``benchmarks/results/latest.json`` and ``latest.md`` (machine, date, commit),
plus the sustained run's backlog curve (``sustained.png``, ``sustained.csv``) and the profile of
the paid create (``profile.txt``). Comparisons are ratios measured in the same run: these
machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Relayer lanes (keys) the benchmark's settlement uses.
LANES = 3
#: Prefix of the extra result files: "" for the full run, "quick." for the smoke run (not committed).
PREFIX = ""
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
PRICE = 10_000
MODEL_PATH = "/v1/models/demo/echo-text/predictions"
BODY = '{"input": {"text": "benchmark"}}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- load generation ---------------------------------------------------------------------------

LUA_POST = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
%s
"""

LUA_PAID = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
function init(args)
  headers = {}
  for line in io.lines("%s/headers-" .. id .. ".txt") do headers[#headers + 1] = line end
  i = 0
end
function request()
  i = i + 1
  if i > #headers then i = 1 end
  return wrk.format(nil, nil, {["Content-Type"] = "application/json", ["%s"] = headers[i]})
end
"""

#: Appended to every wrk script: numbers the threads (``id``, for LUA_PAID's header files) and
#: counts the answers by status, printed as ``status <code> <count>`` lines when wrk is done (a
#: non-2xx count alone does not say whether the server refused, failed or was overloaded).
LUA_STATUSES = """
local threads = {}
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      io.write(string.format("status %d %d\\n", status, n))
    end
  end
end
"""


def _seconds(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if match is None:
        return float("nan")
    number, unit = match.groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1) if match else ""


def wrk(url: str, script: str, duration: int, connections: int, threads: int = 2) -> dict[str, Any]:
    """Run wrk; requests/s, p50, p99 and the load generator's own CPU use."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script + LUA_STATUSES)
    started = time.monotonic()
    before = os.times()
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", f.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = os.times()
    wall = time.monotonic() - started
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    codes = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    statuses: dict[int, int] = {}
    for code, count in re.findall(r"^status (\d+) (\d+)$", out, re.MULTILINE):
        statuses[int(code)] = statuses.get(int(code), 0) + int(count)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        # The latency distribution's own lines (a thread-stats share such as "87.50%" ends in
        # "50%" too, and the next word then read as a latency gave NaN).
        "p50_ms": _seconds(_find(r"^\s*50%\s+(\S+)", out)) * 1000,
        "p99_ms": _seconds(_find(r"^\s*99%\s+(\S+)", out)) * 1000,
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "non_2xx": int(codes.group(1)) if codes else 0,
        "statuses": statuses,
        "loadgen_cpu_pct": round(100 * cpu / wall, 1),
    }


def open_loop(url: str, headers_list: list[dict[str, str]], rate: float) -> dict[str, Any]:
    """Send requests at a fixed rate (open loop) and report latency percentiles."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    interval = 1.0 / rate
    start = time.monotonic() + 0.2
    jobs = list(enumerate(headers_list))
    workers = 8

    def run(worker: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        for i, headers in jobs[worker::workers]:
            due = start + i * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.monotonic()
            conn.request(
                "POST", parts.path, body=BODY, headers={"Content-Type": "application/json", **headers}
            )
            response = conn.getresponse()
            response.read()
            with lock:
                latencies.append((time.monotonic() - max(t0, due)) * 1000)
                statuses.append(response.status)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "rate": rate,
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "ok": sum(1 for s in statuses if s in (200, 201)),
    }


# --- the stack -----------------------------------------------------------------------------------


class Stack:
    """anvil + token + database + our servers (uvicorn as deployed, gunicorn), and later the
    reference server."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="x402-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.servers: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        from payments.chain import devchain

        self.devchain = devchain
        port = free_port()
        anvil, config = devchain.start_anvil(port, accounts=10 + 2 + LANES, log_path=self.tmp / "anvil.log")
        self.procs.append(anvil)
        self.chain = devchain.deploy(f"http://127.0.0.1:{port}", config, payer_count=8)
        # Accounts 10 and 11: the reference's facilitator; 12 and up: the relayer lanes. The
        # deployer (account 0) owns the token and mints for fund() whenever a section needs
        # payers: it is no lane, whose nonces the outbox allocates.
        self.spare_keys = config["private_keys"][10:12]
        self.chain.relayer_private_keys = config["private_keys"][12:]
        self.chain.write(self.tmp / "devchain.json")
        redis_url = os.environ.get("X402_BENCH_REDIS", "redis://127.0.0.1:6379/13")
        database = os.environ.get("X402_BENCH_DATABASE", "x402_bench")
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{database}",
            "X402_DEVCHAIN_FILE": str(self.tmp / "devchain.json"),
            "CELERY_BROKER_URL": redis_url,
            "CELERY_TASK_DEFAULT_QUEUE": f"bench-{secrets.token_hex(3)}",
            "CACHE_URL": redis_url,
            "CACHE_KEY_PREFIX": f"bench-{secrets.token_hex(3)}",
            "X402_OPERATOR_TOKENS": "bench-operator-token",
            "X402_LOG_LEVEL": "WARNING",
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),  # production mode refuses the dev key
            "DJANGO_SECURE_SSL_REDIRECT": "false",  # plain HTTP on loopback
            "X402_RATE_CHALLENGES": "",  # the load generator is one client: no per-client limits
            "X402_RATE_FAILED_PAYMENTS": "",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        }
        os.environ.update(
            {
                k: v
                for k, v in self.env.items()
                if k.startswith(("DATABASE", "X402", "CELERY", "CACHE", "DJANGO"))
            }
        )
        os.environ["DJANGO_SETTINGS_MODULE"] = "x402site.settings"
        import django

        django.setup()
        from payments.management.commands.quickstart import ensure_database

        ensure_database(fresh=True)
        manage = [sys.executable, str(ROOT / "manage.py")]
        subprocess.run([*manage, "migrate", "-v", "0"], env=self.env, check=True)
        subprocess.run([*manage, "seed_demo"], env=self.env, check=True, capture_output=True)

    def gunicorn(self, app: str, env: dict[str, str], workers: int = 2) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [
                str(ROOT / ".venv" / "bin" / "gunicorn"),
                "-w",
                str(workers),
                "-k",
                "gthread",
                "--threads",
                "4",
                "-b",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
                app,
            ],
            cwd=ROOT,
            env=env,
            stdout=open(self.tmp / f"gunicorn-{port}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self.devchain.die_with_parent,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.devchain.wait_http(url + "/")
        self.servers[url] = proc
        return url

    def uvicorn(self, env: dict[str, str], workers: int = 2) -> str:
        """The ASGI application as docs/deploy.md deploys it: uvicorn with ``workers`` processes
        (each with its own database connection pool, x402site/asgi.py)."""
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "x402site.asgi:application",
                "--workers",
                str(workers),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=open(self.tmp / f"uvicorn-{port}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self.devchain.die_with_parent,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.devchain.wait_http(url + "/")
        self.servers[url] = proc
        return url

    def fund(self, n: int) -> list[Any]:
        """n fresh payers, each minted USDC."""
        from eth_account import Account

        accounts = [Account.create() for _ in range(n)]
        for first in range(0, n, MINT_CHUNK):
            self._mint(accounts[first : first + MINT_CHUNK])
        return accounts

    def _mint(self, accounts: list[Any]) -> None:
        """Mint to ``accounts`` from the deployer, and wait until all are mined. In chunks of
        MINT_CHUNK, each from the account's nonce as it then stands: thousands sent at once
        stalled midway on a node left busy by a section's workers (2,000 mints stopped at 985)."""
        from payments.chain.node import rpc

        minter = self.chain.relayer_address
        nonce = int(rpc(self.chain.rpc_url, "eth_getTransactionCount", [minter, "pending"]), 16)
        for i, a in enumerate(accounts):  # one by one: anvil reorders a batch of sends into nonce gaps
            data = "0x40c10f19" + a.address[2:].lower().rjust(64, "0") + hex(10**9)[2:].rjust(64, "0")
            rpc(
                self.chain.rpc_url,
                "eth_sendTransaction",
                [{"from": minter, "to": self.chain.asset, "nonce": hex(nonce + i), "data": data}],
            )
        # Waited for as long as they are being mined; a minute without progress is a failure.
        mined, deadline = -1, 0.0
        while (count := int(rpc(self.chain.rpc_url, "eth_getTransactionCount", [minter, "latest"]), 16)) < nonce + len(
            accounts
        ):
            if count != mined:
                mined, deadline = count, time.monotonic() + 60
            elif time.monotonic() > deadline:
                pending = rpc(self.chain.rpc_url, "eth_getTransactionCount", [minter, "pending"])
                raise RuntimeError(
                    f"mints were not mined: {count - nonce} of {len(accounts)} after a minute without "
                    f"progress (pending nonce {int(pending, 16)})"
                )
            time.sleep(0.05)

    def worker(self, queue: str, concurrency: int, *, beat: bool = False, nice: int = 0) -> subprocess.Popen:
        """A Celery worker on ``queue`` (with beat: the reconciler and its sweep), ``nice``
        lower in CPU priority (docs/deploy.md: on a shared host, settlement comes first)."""
        name = queue.rsplit("-", 1)[-1]
        command = [
            sys.executable, "-m", "celery", "-A", "x402site", "worker", "-l", "warning",
            "-Q", queue, "-c", str(concurrency), "-n", f"{name}-{secrets.token_hex(2)}@%h",
        ]
        if beat:
            command += ["-B", "-s", str(self.tmp / "beat-schedule")]
        log = self.tmp / f"worker-{name}.log"
        proc = subprocess.Popen(
            command, cwd=ROOT, env={**self.env, "X402_LOG_LEVEL": "WARNING"}, stdout=open(log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: (self.devchain.die_with_parent(), os.nice(nice)),
        )
        self.procs.append(proc)
        return proc

    def lower_priority(self, url: str, nice: int) -> None:
        """Make server ``url`` (its process and its workers) ``nice`` lower in CPU priority."""
        root = self.servers[url].pid
        pids = [root, *(int(p) for p in Path(f"/proc/{root}/task/{root}/children").read_text().split())]
        for pid in pids:  # Linux: a priority is a thread's; new threads take their creator's
            for task in Path(f"/proc/{pid}/task").iterdir():
                tid = int(task.name)
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)

    def stop_server(self, url: str) -> None:
        proc = self.servers.pop(url)
        self.devchain.stop(proc)
        self.procs.remove(proc)

    def stop(self) -> None:
        import redis

        for proc in reversed(self.procs):
            self.devchain.stop(proc)
        # Tasks the paid requests enqueued and no worker took.
        queue = self.env["CELERY_TASK_DEFAULT_QUEUE"]
        redis.Redis.from_url(self.env["CELERY_BROKER_URL"]).delete(queue, f"{queue}-settlement")
        shutil.rmtree(self.tmp, ignore_errors=True)


def signed_headers(stack: Stack, payers: list[Any], per_payer: int, url: str, version: int = 2) -> list[str]:
    """Payment headers made by the official SDK client from the server's own 402."""
    import requests
    from x402 import x402ClientSync
    from x402.http import x402HTTPClientSync
    from x402.mechanisms.evm.exact import register_exact_evm_client

    challenge = requests.post(url, data=BODY, headers={"Content-Type": "application/json"}, timeout=10)
    assert challenge.status_code == 402, challenge.text
    out = []
    for account in payers:
        client = x402ClientSync()
        register_exact_evm_client(client, account)
        client.set_spend_controls(
            {
                "allowed_assets": [
                    {
                        "network": stack.chain.network,
                        "asset": stack.chain.asset,
                        "max_amount_per_payment": str(PRICE),
                    }
                ]
            }
        )
        http = x402HTTPClientSync(client)
        required = http.get_payment_required_response(challenge.headers.get, challenge.json())
        for _ in range(per_payer):
            headers = http.encode_payment_signature_header(client.create_payment_payload(required))
            out.append(headers["PAYMENT-SIGNATURE"])
    return out


def write_header_files(headers: list[str], threads: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="x402-headers-"))
    for t in range(threads):
        (folder / f"headers-{t}.txt").write_text("\n".join(headers[t::threads]) + "\n")
    return folder


# --- payment channels (batch-settlement) --------------------------------------------------------


def channel_agents(stack: Stack, url: str, n: int) -> list[tuple[Any, Any, Any]]:
    """``n`` channels opened through our relayer (the SDK client's deposit payloads, relayed by
    ``payments.channels.outbox.deposit`` as the gate does, then mined), for ``url``'s price:
    (payer's x402 client, its HTTP helper, the 402) per channel, each knowing its channel."""
    import requests
    from x402 import x402ClientSync
    from x402.http import x402HTTPClientSync
    from x402.mechanisms.evm.batch_settlement.client import (
        BatchSettlementEvmScheme,
        BatchSettlementEvmSchemeOptions,
        InMemoryClientChannelStorage,
    )
    from x402.mechanisms.evm.batch_settlement.client.storage import BatchSettlementClientContext

    from payments.channels import gate, outbox
    from payments.channels.models import ChannelTxStatus
    from payments.options import configured
    from payments.x402 import batch_settlement as bs

    conf = configured()[0]
    challenge = requests.post(url, data=BODY, headers={"Content-Type": "application/json"}, timeout=10)
    agents, txs = [], []
    for account in stack.fund(n):
        storage = InMemoryClientChannelStorage()
        client = x402ClientSync()
        scheme = BatchSettlementEvmScheme(account, BatchSettlementEvmSchemeOptions(storage=storage))
        client.register("eip155:*", scheme)
        client.set_spend_controls(
            {"allowed_assets": [{"network": stack.chain.network, "asset": stack.chain.asset, "max_amount_per_payment": str(10**7)}]}
        )
        http = x402HTTPClientSync(client)
        required = http.get_payment_required_response(challenge.headers.get, challenge.json())
        required.accepts = [a for a in required.accepts if a.scheme == bs.SCHEME_BATCH_SETTLEMENT]
        payload = bs.parse_payload(scheme.create_payment_payload(required.accepts[0]), stack.chain.chain_id)
        assert isinstance(payload, bs.DepositPayload)
        txs.append(outbox.deposit(conf, payload))
        storage.set(
            bs.hex_of(payload.voucher.channel_id),
            BatchSettlementClientContext(charged_cumulative_amount="0", balance=str(payload.deposit.amount)),
        )
        agents.append((client, http, required))
    for tx in txs:
        assert gate.wait_for(tx.pk, 30) == ChannelTxStatus.MINED, tx.tx_hash
    return agents


def voucher_headers(agents: list[tuple[Any, Any, Any]]) -> list[str]:
    """Each channel's next voucher (the SDK client's payload), one per channel; the channels'
    mirrors are read from the chain last (as for channels in use: the gate reads a channel again
    only once its mirror is older than ``gate.STATE_TTL``)."""
    from payments.channels import state
    from payments.channels.models import Channel
    from payments.options import configured

    headers = [
        http.encode_payment_signature_header(client.create_payment_payload(required))["PAYMENT-SIGNATURE"]
        for client, http, required in agents
    ]
    channels = list(Channel.objects.filter(held_by=""))
    for i in range(0, len(channels), 200):
        state.refresh_from_chain(configured()[0].rpc_url, channels[i : i + 200])
    return headers


def bench_channels_http(stack: Stack, server: str, duration: int, exact_rps: float, quick: bool = False) -> dict[str, Any]:
    """The paid create with vouchers, as the exact one is measured: closed loop (16
    connections), then at half its saturating rate (open loop). Every request is a channel's
    next voucher on a channel of its own (a request holds its channel until its run ends; no
    prediction worker runs here, as for the exact figures). ``quick``: a smoke of the path, 16
    then 8 channels paid at a fixed pace (open loop), no saturation."""
    url = server + MODEL_PATH
    if quick:
        paced = open_loop(url, [{"PAYMENT-SIGNATURE": h} for h in voucher_headers(channel_agents(stack, url, 16))], 16)
        paid = {**paced, "rps": paced["rate"], "non_2xx": paced["requests"] - paced["ok"], "channels_opened": 16}
        half = open_loop(url, [{"PAYMENT-SIGNATURE": h} for h in voucher_headers(channel_agents(stack, url, 8))], 8)
        return {"paid": paid, "paid_half_rate": half}
    started = time.monotonic()
    agents = channel_agents(stack, url, int(exact_rps * 1.3 * duration * 1.5) + 50)
    opened = time.monotonic() - started
    folder = write_header_files(voucher_headers(agents), 2)
    paid = wrk(url, LUA_PAID % (BODY, folder, "PAYMENT-SIGNATURE"), duration, 16)
    paid["channels_opened"] = len(agents)
    paid["open_seconds"] = round(opened, 1)
    half = max(5.0, paid["rps"] / 2)
    fresh = channel_agents(stack, url, int(half * duration) + 1)
    paid_half = open_loop(url, [{"PAYMENT-SIGNATURE": h} for h in voucher_headers(fresh)], half)
    return {"paid": paid, "paid_half_rate": paid_half}


def bench_channel_gas(stack: Stack, url: str, batch: int) -> dict[str, Any]:
    """Gas of a channel's life, measured on the chain: the deposit (relayed), a claim of
    ``batch`` channels in one transaction, the settle to pay-to, a cooperative refund; then
    the gas per paid request at 10, 100 and 1,000 requests per channel (one deposit, the
    channel's share of a claim and a settle, one refund), beside the exact scheme's batched
    settlement (gas per payment, from the settlement benchmark's batches)."""
    from payments.channels import charges, gate, outbox
    from payments.channels.models import Channel, ChannelTxStatus
    from payments.models import SettlementTx
    from payments.options import configured
    from payments.x402 import batch_settlement as bs

    conf = configured()[0]
    before = set(SettlementTx.objects.values_list("pk", flat=True))
    agents = channel_agents(stack, url, batch)
    terms = gate.terms(conf)
    ids = []
    for client, _, required in agents:
        payload = bs.parse_payload(client.create_payment_payload(required).payload, stack.chain.chain_id)
        channel = Channel.objects.get(channel_id=bs.hex_of(payload.voucher.channel_id))
        verified = bs.verify_payload(payload, terms, channel.mirror, PRICE)
        charges.charge_voucher(verified, PRICE, price=PRICE)
        ids.append(channel.pk)

    def gas_of(tx: SettlementTx | None) -> int:
        assert tx is not None, "nothing was sent"
        status = gate.wait_for(tx.pk, 30)
        assert status == ChannelTxStatus.MINED, f"{tx.kind} {tx.tx_hash}: {status}"
        tx.refresh_from_db()
        return int(tx.gas_used or 0)

    claim = gas_of(outbox.claim(conf, list(Channel.objects.filter(pk__in=ids))))
    settle = gas_of(outbox.settle(conf))
    refund = gas_of(outbox.refund(conf, Channel.objects.get(pk=ids[0]).channel_id))
    deposits = SettlementTx.objects.filter(kind=SettlementTx.Kind.CHANNEL_DEPOSIT).exclude(pk__in=before)
    deposit = max(int(t.gas_used or 0) for t in deposits)
    batched = SettlementTx.objects.filter(kind=SettlementTx.Kind.BATCH, gas_used__isnull=False)
    exact = round(sum(int(t.gas_used) for t in batched) / max(sum(t.items for t in batched), 1)) if batched else None
    per_channel = deposit + claim / batch + settle / batch + refund
    return {
        "deposit": deposit,
        "claim": claim,
        "claim_batch": batch,
        "settle": settle,
        "refund": refund,
        "per_request": {str(n): round(per_channel / n) for n in (10, 100, 1000)},
        "exact_batched_per_payment": exact,
    }


# --- the measurements ----------------------------------------------------------------------------


def bench_verification(n: int) -> dict[str, Any]:
    """Signatures verified per second by verify_exact, next to raw secp256k1 recovery."""
    from coincurve import PublicKey
    from eth_account import Account

    from payments.x402.exact import verify_exact
    from payments.x402.types import PaymentOption, Requirement, parse_payload
    from tests.payers import sign_authorization, v2_payload

    option = PaymentOption(
        chain_id=84532,
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        asset_name="USDC",
        asset_version="2",
        pay_to="0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
    )
    req = Requirement(option, PRICE)
    keys = [Account.create().key.hex() for _ in range(16)]
    payloads = [parse_payload(v2_payload(req, sign_authorization(keys[i % 16], req))) for i in range(n)]
    now = int(time.time())
    t0 = time.perf_counter()
    for p in payloads:
        verify_exact(p, [req], now)
    verify_rate = n / (time.perf_counter() - t0)
    sig = payloads[0].signature
    compact = sig[:64] + bytes([sig[64] - 27])
    digest = secrets.token_bytes(32)
    t0 = time.perf_counter()
    for _ in range(n):
        PublicKey.from_signature_and_message(compact, digest, hasher=None)
    raw_rate = n / (time.perf_counter() - t0)
    return {
        "verify_per_s": round(verify_rate),
        "raw_recover_per_s": round(raw_rate),
        "ratio": round(verify_rate / raw_rate, 2),
    }


def bench_price_cache(n: int) -> dict[str, Any]:
    from payments.pricing import honoured_cache, pricing_state
    from predictions.models import Model

    model = Model.objects.get(owner="demo", name="echo-text")
    pricing_state(model, 330)
    t0 = time.perf_counter()
    for _ in range(n):
        pricing_state(model, 330)
    hit = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        honoured_cache.clear()
        pricing_state(model, 330)
    miss = (time.perf_counter() - t0) / n
    return {"cached_us": round(hit * 1e6, 1), "uncached_us": round(miss * 1e6, 1)}


def bench_chain_read(stack: Stack, n: int) -> dict[str, Any]:
    """The paid create's one chain read (balance, nonce state and head in one JSON-RPC batch,
    ``payer_state``) against anvil, one call at a time: its wall time and this process's CPU
    per call (the rest of the wall is the node's and the loopback's)."""
    from payments.chain.node import payer_state

    payer = secrets.token_bytes(20)
    payer_state(stack.chain.rpc_url, stack.chain.asset, payer, secrets.token_bytes(32))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        payer_state(stack.chain.rpc_url, stack.chain.asset, payer, secrets.token_bytes(32))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"calls": n, "wall_ms": round(wall / n * 1000, 3), "cpu_ms": round(cpu / n * 1000, 3)}


def record_payments(stack: Stack, payers: list[Any], per_payer: int) -> list[Any]:
    from django.db import transaction

    from payments import ledger
    from payments.options import configured
    from payments.verification import Verification
    from payments.x402.exact import verify_exact
    from payments.x402.types import Requirement, Resource, parse_payload
    from tests.payers import sign_authorization, v2_payload

    conf = configured()[0]
    req = Requirement(conf.option, PRICE)
    out = []
    for account in payers:
        for _ in range(per_payer):
            verified = verify_exact(
                parse_payload(v2_payload(req, sign_authorization(account.key.hex(), req))),
                [req],
                int(time.time()),
            )
            # Fresh payers, fresh nonces: the chain check is skipped to fill the queue fast.
            with transaction.atomic():
                out.append(
                    ledger.record(
                        Verification(verified, conf, "local"), resource=Resource("http://bench/"), fingerprint="bench"
                    )
                )
    return out


def bench_settlement(stack: Stack, single_n: int, batched_n: int, workers: int = 2) -> dict[str, Any]:
    """Settled-and-confirmed payments per second on anvil, one transaction per payment (one at a
    time, and four concurrent workers) and batched (``workers`` batchers in parallel on the
    relayer lanes), in the same run; gas per payment of each."""
    from django.db import connection
    from django.test import override_settings

    from payments.chain import batching, settlement
    from payments.models import Payment, SettlementTx
    from payments.options import configured
    from x402site.conf import x402

    conf = configured()[0]
    payments = record_payments(stack, stack.fund(single_n), 1)
    half = len(payments) // 2
    one_per_transaction = override_settings(X402_BATCH_SETTLEMENT=False)  # x402.settlement follows
    one_per_transaction.enable()
    t0 = time.perf_counter()
    for p in payments[:half]:
        settlement.settle(p.pk)
    sequential = half / (time.perf_counter() - t0)

    rest = payments[half:]

    def single_worker(chunk: list[Any]) -> None:
        for p in chunk:
            settlement.settle(p.pk)
        connection.close()

    threads = [threading.Thread(target=single_worker, args=(rest[i::4],)) for i in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = len(rest) / (time.perf_counter() - t0)
    one_per_transaction.disable()
    singles = Payment.objects.filter(pk__in=[p.pk for p in payments])
    single_gas = [g for g in singles.values_list("gas_used", flat=True) if g]

    batched = record_payments(stack, stack.fund(batched_n), 1)
    sent: list[Any] = []

    def batcher() -> None:
        while Payment.objects.filter(status="verified").exists():
            mine = batching.run(conf, force=True)
            sent.extend(mine)
            batching.follow([tx.pk for tx in mine], wait_seconds=30)
        connection.close()

    real_kick = batching.kick
    batching.kick = lambda *a, **k: None  # the batchers are these threads
    try:
        threads = [threading.Thread(target=batcher) for _ in range(workers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        left = batching.follow([tx.pk for tx in sent], wait_seconds=60)
        batched_seconds = time.perf_counter() - t0
    finally:
        batching.kick = real_kick
    done = Payment.objects.filter(pk__in=[p.pk for p in batched])
    txs = SettlementTx.objects.filter(pk__in=[tx.pk for tx in sent])
    big = [tx.gas_used / tx.items for tx in txs if tx.items >= 50 and tx.gas_used]
    return {
        "payments": len(payments),
        "confirmed": singles.filter(status="confirmed").count(),
        "sequential_per_s": round(sequential, 1),
        "four_workers_per_s": round(concurrent, 1),
        "gas_per_payment": round(statistics.mean(single_gas)) if single_gas else None,
        "batched": {
            "payments": len(batched),
            "confirmed": done.filter(status="confirmed").count(),
            "unconfirmed_transactions": len(left),
            "workers": workers,
            "lanes": LANES,
            "batch_max": x402.settlement.batch_max,
            "transactions": len(sent),
            "per_s": round(len(batched) / batched_seconds, 1),
            "gas_per_payment_at_50_plus": round(statistics.mean(big)) if big else None,
            "mean_items": round(statistics.mean(tx.items for tx in sent), 1) if sent else 0,
        },
    }


def bench_reconciliation(sizes: list[int]) -> list[dict[str, Any]]:
    """One reconciler pass over N settled-unconfirmed payments whose receipts are absent
    (synthetic rows: the worst case, every row is read, locked and moved)."""
    import uuid

    from django.utils import timezone

    from payments.chain import node as chain_module
    from payments.chain import receipts, tracking
    from payments.models import Payment
    from payments.options import payment_options

    option = payment_options()[0]
    results = []
    calls = {"batches": 0, "calls": 0}
    real_batch = chain_module.rpc_batch

    def counting(url: str, batch: list, timeout: float | None = None, **kw: object) -> list:
        calls["batches"] += 1
        calls["calls"] += len(batch)
        return real_batch(url, batch, timeout, **kw)

    receipts.rpc_batch = counting  # type: ignore[assignment]
    try:
        for n in sizes:
            resource = f"http://bench/reconcile/{n}"  # the bench database is thrown away after
            now = timezone.now()
            Payment.objects.bulk_create(
                [
                    Payment(
                        status="settled",
                        x402_version=2,
                        network=option.network,
                        asset=option.asset,
                        payer="0x" + secrets.token_hex(20),
                        pay_to=option.pay_to,
                        amount=PRICE,
                        nonce="0x" + secrets.token_hex(32),
                        valid_after=0,
                        valid_before=int(time.time()) + 3600,
                        signature="0x" + "00" * 65,
                        payload={},
                        requirement={},
                        resource=resource,
                        request_fingerprint="x",
                        settle_tx_hash="0x" + uuid.uuid4().hex * 2,
                        block_number=1,
                        block_hash="0x" + "00" * 32,
                        confirmations=1,
                        settling_at=now,
                        settled_at=now,
                    )
                    for _ in range(n)
                ],
                batch_size=5000,
            )
            ids = list(Payment.objects.filter(resource=resource).values_list("pk", flat=True))
            calls.update(batches=0, calls=0)
            t0 = time.perf_counter()
            stats = tracking.reconcile_batch(ids)
            seconds = time.perf_counter() - t0
            results.append(
                {
                    "n": n,
                    "seconds": round(seconds, 2),
                    "rpc_http_requests": calls["batches"],
                    "rpc_calls_in_batches": calls["calls"],
                    "per_payment_ms": round(1000 * seconds / n, 3),
                    "moved": stats["payments"],
                }
            )
    finally:
        receipts.rpc_batch = real_batch  # type: ignore[assignment]
    return results


def bench_sustained(stack: Stack, url: str, rate_hint: float, seconds: int) -> dict[str, Any]:
    """Paid requests at SUSTAINED_FRACTION of the saturating rate (open loop) for ``seconds``, while real Celery
    workers settle in batches (the settlement queue, with beat) and run the predictions: the
    settlement backlog sampled every second, then drained; expiries; ledger against chain. The
    saturating rate is the deployment's, measured with its workers running: the lower of its web
    tier's accept rate and its end-to-end rate (``rate_hint``, a guess of the paid rate, sizes
    that measurement). Its workers are stopped at the end."""
    from django.db.models import Count, Min, Sum
    from django.utils import timezone

    from payments.models import Payment
    from predictions.models import TERMINAL, Prediction
    from x402site.celery import app

    queue = stack.env["CELERY_TASK_DEFAULT_QUEUE"]
    app.conf.task_default_queue = queue
    # As docs/deploy.md runs them on a shared host: the web tier and the prediction workers below
    # settlement in CPU priority, so that settlement keeps pace while requests saturate the CPU.
    settlement = stack.worker(f"{queue}-settlement", 2, beat=True)
    predictions = stack.worker(queue, 2, nice=WEB_NICE)
    server = url.removesuffix(MODEL_PATH)
    stack.lower_priority(server, WEB_NICE)
    components = {
        "web tier (uvicorn)": stack.servers[server].pid,
        "settlement workers (Celery, beat)": settlement.pid,
        "prediction worker (Celery)": predictions.pid,
        "chain node (anvil)": stack.procs[0].pid,
        "load generator (this benchmark)": os.getpid(),
    }
    # The saturating paid rate of the deployment as it runs: a closed-loop load on the web tier
    # with its workers running (the HTTP section measured it with none). The load defers work
    # (settlement, then the runs): the deployment's end-to-end rate is the accepted requests
    # over the time until every payment is confirmed and every prediction ended.
    duration = 2 if seconds < 60 else 10
    expected = int(rate_hint * duration * 1.5) + 50
    warm = signed_headers(stack, stack.fund(40), expected // 40 + 1, url)
    before_burst = Prediction.objects.count()
    burst_started = time.monotonic()
    deployed = wrk(url, LUA_PAID % (BODY, write_header_files(warm, 2), "PAYMENT-SIGNATURE"), duration, 16)
    deadline = time.monotonic() + 180
    while (
        Payment.objects.filter(status__in=["verified", "settling", "settled"]).exists()
        or Prediction.objects.exclude(status__in=list(TERMINAL)).exists()
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    burst_seconds = time.monotonic() - burst_started
    end_to_end = round((Prediction.objects.count() - before_burst) / burst_seconds, 1)
    # What the deployment sustains: a paid request is done when its payment is confirmed and its
    # prediction ended, not when it is accepted (the burst's accept rate only defers that work).
    rate = SUSTAINED_FRACTION * min(deployed["rps"], end_to_end)
    payers = stack.fund(32)
    make_header = header_maker(url, payers)
    started_at = timezone.now()
    pay_to_before = token_balance(stack, stack.chain.pay_to)
    # What the ledger says was paid, before and after: payments accepted before the load and
    # settled during it (an earlier section's) count on both sides.
    paid_statuses = ["settled", "confirmed"]
    ledger_before = int(Payment.objects.filter(status__in=paid_statuses).aggregate(a=Sum("amount"))["a"] or 0)
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        from django.db import connection

        t0 = time.monotonic()
        mine = Payment.objects.filter(created_at__gte=started_at)
        runs = Prediction.objects.filter(created_at__gte=started_at)
        while not stop.is_set():
            ready = mine.filter(status="verified", settle_requested_at__isnull=False)
            oldest = ready.aggregate(t=Min("settle_requested_at"))["t"]
            unsettled = mine.filter(status__in=["verified", "settling"]).aggregate(t=Min("created_at"))["t"]
            samples.append(
                {
                    "t": round(time.monotonic() - t0, 1),
                    "accepted": mine.count(),
                    "ready": ready.count(),
                    "settling": mine.filter(status__in=["settling", "settled"]).count(),
                    "confirmed": mine.filter(status="confirmed").count(),
                    "runs_ended": runs.filter(status__in=list(TERMINAL)).count(),
                    "oldest_ready_s": round((timezone.now() - oldest).total_seconds(), 2) if oldest else 0.0,
                    "oldest_unsettled_s": round((timezone.now() - unsettled).total_seconds(), 2) if unsettled else 0.0,
                }
            )
            stop.wait(1.0)
        connection.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        cpu_before = cpu_seconds_by_component(components)
        load = paced_loop(url, make_header, rate, seconds)
        load_ended = time.monotonic()
        mine = Payment.objects.filter(created_at__gte=started_at)
        deadline = time.monotonic() + 180
        while mine.filter(status__in=["verified", "settling", "settled"]).exists() and time.monotonic() < deadline:
            time.sleep(1)
        drain_seconds = time.monotonic() - load_ended
        # Load and drain: the settlement of every payment accepted, by what it cost each part.
        cpu = cpu_per_request(cpu_before, cpu_seconds_by_component(components), load["requests"] - load["non_2xx"])
        time.sleep(1.5)
    finally:
        stop.set()
        sampler.join()
    for worker in (settlement, predictions):  # the sections after this one run with none
        stack.devchain.stop(worker)
        stack.procs.remove(worker)
    counts = dict(mine.values_list("status").annotate(n=Count("id")))
    ledger = int(Payment.objects.filter(status__in=paid_statuses).aggregate(a=Sum("amount"))["a"] or 0) - ledger_before
    balance_change = token_balance(stack, stack.chain.pay_to) - pay_to_before
    write_backlog_curve(samples, load["requests"] / seconds, seconds)
    during = [s for s in samples if s["t"] <= seconds]
    confirmed_at_load_end = max((s["confirmed"] for s in during), default=0)
    accepted_at_load_end = max((s["accepted"] for s in during), default=0)
    return {
        "seconds": seconds,
        "saturating_rps_without_workers": None,  # the HTTP section's (it runs after this one)
        "saturating_rps_deployed": deployed["rps"],
        "saturating_rps_end_to_end": end_to_end,
        "offered_rps": round(rate, 1),
        "load": load,
        "statuses": counts,
        "expired_or_failed": counts.get("expired", 0) + counts.get("failed", 0),
        "max_ready_backlog": max((s["ready"] for s in samples), default=0),
        "max_oldest_ready_s": max((s["oldest_ready_s"] for s in samples), default=0.0),
        "max_oldest_unsettled_s": max((s["oldest_unsettled_s"] for s in during), default=0.0),
        "confirmed_during_load_fraction": round(confirmed_at_load_end / accepted_at_load_end, 3)
        if accepted_at_load_end
        else 0.0,
        "settled_during_load_per_s": round(confirmed_at_load_end / seconds, 1),
        "runs_ended_during_load_fraction": round(max((s["runs_ended"] for s in during), default=0) / accepted_at_load_end, 3)
        if accepted_at_load_end
        else 0.0,
        "drain_seconds_after_load": round(drain_seconds, 1),
        "ledger_atomic": ledger,
        "pay_to_balance_change_atomic": balance_change,
        "ledger_equals_chain": ledger == balance_change,
        "cpu_ms_per_request": cpu,
    }


#: Components of the host not started by the benchmark, by what their processes run.
CPU_BY_COMMAND = [("PostgreSQL", "postgres"), ("Redis (broker, cache)", "redis-server")]


def cpu_seconds_by_component(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each component: the process trees of ``roots`` (name -> pid;
    a benchmark's own process counts without its children), the processes of CPU_BY_COMMAND,
    ``other``; and ``host``, the whole machine (from /proc/stat). Two readings' difference is
    where the CPU went between them (a process that ended in between is missing)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    seconds: dict[int, float] = {}
    command: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm, fields = (proc / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue  # ended meanwhile
        pid, values = int(proc.name), fields.split()
        parent[pid], seconds[pid] = int(values[1]), (int(values[11]) + int(values[12])) / ticks
        command[pid] = comm.split("(", 1)[1]
    owner = {pid: name for name, pid in roots.items()}

    def component(pid: int) -> str:
        start = pid
        while pid > 1:
            if pid in owner and (pid == start or owner[pid] != "load generator (this benchmark)"):
                return owner[pid]
            pid = parent.get(pid, 0)
        return next((name for name, mark in CPU_BY_COMMAND if command[start].startswith(mark)), "other")

    used = dict.fromkeys([*roots, *(n for n, _ in CPU_BY_COMMAND), "other"], 0.0)
    for pid, cpu in seconds.items():
        used[component(pid)] += cpu
    total = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    used["host"] = (sum(int(v) for v in total[:8]) - int(total[3]) - int(total[4])) / ticks  # less idle, iowait
    return used


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Milliseconds of CPU per accepted request, by component, between two readings (a process
    that ended in between is missing from ``other``; ``host`` counts everything)."""
    return {k: round((after[k] - before[k]) * 1000 / max(requests, 1), 2) for k in after}


def header_maker(url: str, payers: list[Any]) -> Any:
    """Sign payment headers as they are sent: a run longer than maxTimeoutSeconds cannot use
    headers signed beforehand (v2 clients sign validBefore = now + maxTimeoutSeconds). The
    EIP-712 digest and secp256k1 signature are computed directly (about 0.1 ms a header)."""
    import itertools

    import requests
    from coincurve import PrivateKey

    from payments.x402.codec import decode_header, encode_header
    from payments.x402.eip712 import Authorization, authorization_digest, domain_separator
    from payments.x402.networks import chain_id_of

    challenge = requests.post(url, data=BODY, headers={"Content-Type": "application/json"}, timeout=10)
    accepted = decode_header(challenge.headers["PAYMENT-REQUIRED"])["accepts"][0]
    separator = domain_separator(
        accepted["extra"]["name"],
        accepted["extra"]["version"],
        chain_id_of(accepted["network"]),
        bytes.fromhex(accepted["asset"][2:]),
    )
    keys = itertools.cycle([(PrivateKey(bytes(a.key)), bytes.fromhex(a.address[2:])) for a in payers])
    lock = threading.Lock()

    def make() -> str:
        with lock:
            key, address = next(keys)
        valid_before = int(time.time()) + accepted["maxTimeoutSeconds"]
        nonce = secrets.token_bytes(32)
        auth = Authorization(
            from_=address,
            to=bytes.fromhex(accepted["payTo"][2:]),
            value=int(accepted["amount"]),
            valid_after=0,
            valid_before=valid_before,
            nonce=nonce,
        )
        sig = key.sign_recoverable(authorization_digest(separator, auth), hasher=None)
        signature = sig[:64] + bytes([sig[64] + 27])
        payload = {
            "signature": "0x" + signature.hex(),
            "authorization": {
                "from": "0x" + address.hex(),
                "to": accepted["payTo"],
                "value": accepted["amount"],
                "validAfter": "0",
                "validBefore": str(valid_before),
                "nonce": "0x" + nonce.hex(),
            },
        }
        return encode_header({"x402Version": 2, "accepted": accepted, "payload": payload})

    return make


#: Mints sent at once by Stack.fund.
MINT_CHUNK = 200

#: The sustained load's rate, as a fraction of the saturating paid rate measured in the same run.
SUSTAINED_FRACTION = 0.8
#: How much lower the web tier and the prediction workers run than settlement (nice).
WEB_NICE = 5


def paced_loop(url: str, make_header: Any, rate: float, seconds: int, clients: int = 32) -> dict[str, Any]:
    """Paid requests at a fixed ``rate`` for ``seconds`` (open loop, headers signed as they go):
    request i is due at ``i / rate``; its latency counts from when it was due, so a server that
    falls behind is charged for the wait (no coordinated omission)."""
    import http.client
    import itertools
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    timeline: list[tuple[float, float]] = []  # (when due, seconds into the load; latency ms)
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    slots = itertools.count()
    start = time.monotonic() + 0.2
    end = start + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while True:
            with lock:
                due = start + next(slots) / rate
            if due >= end:
                return
            header = make_header()
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn.request("POST", parts.path, body=BODY, headers={"Content-Type": "application/json", "PAYMENT-SIGNATURE": header})
            response = conn.getresponse()
            response.read()
            with lock:
                latencies.append((time.monotonic() - due) * 1000)
                timeline.append((due - start, latencies[-1]))
                statuses[response.status] = statuses.get(response.status, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(time.monotonic() - start, seconds)
    latencies.sort()
    ok = statuses.get(201, 0)
    return {
        "rate": round(rate, 1),
        "rps": round(ok / wall, 1),
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 1) if latencies else None,
        "requests": len(latencies),
        "non_2xx": len(latencies) - ok,
        "statuses": statuses,
        "p99_ms_by_window": windowed_p99(timeline, 10 if seconds >= 60 else 1),
    }


def windowed_p99(timeline: list[tuple[float, float]], window: int) -> list[float]:
    """The p99 latency of the requests due in each ``window`` seconds of a load, in order: a
    high p99 over the whole load is a spike, a drift or a constant, and this tells which."""
    buckets: dict[int, list[float]] = {}
    for due, latency in timeline:
        buckets.setdefault(int(due // window), []).append(latency)
    return [round(sorted(b)[max(0, int(len(b) * 0.99) - 1)], 1) for _, b in sorted(buckets.items())]


def token_balance(stack: Stack, address: str) -> int:
    from payments.chain.node import rpc

    data = "0x70a08231" + address[2:].lower().rjust(64, "0")
    return int(rpc(stack.chain.rpc_url, "eth_call", [{"to": stack.chain.asset, "data": data}, "latest"]), 16)


def write_backlog_curve(samples: list[dict[str, float]], accept_rate: float, seconds: int) -> None:
    """``sustained.csv`` and ``sustained.png``: the backlog over time (matplotlib, dev only)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(samples[0]) if samples else []
    lines = [",".join(keys)] + [",".join(str(s[k]) for k in keys) for s in samples]
    (RESULTS / f"{PREFIX}sustained.csv").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (requirements-dev.txt): no sustained.png", file=sys.stderr)
        return
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [s["ready"] for s in samples], label="ready (verified, not yet in a transaction)")
    top.plot(t, [s["settling"] for s in samples], label="in a transaction, not yet confirmed")
    top.set_ylabel("payments")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"Sustained paid load ({accept_rate:.0f}/s accepted for {seconds} s) and the settlement backlog")
    bottom.plot(t, [s["oldest_ready_s"] for s in samples], color="tab:red", label="age of the oldest ready payment")
    bottom.axvline(seconds, color="grey", linestyle=":", label="load stops")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("seconds")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{PREFIX}sustained.png", dpi=110)
    plt.close(fig)


#: Where a paid create's time goes: the first rule whose frame appears in a sampled stack.
PROFILE_BUCKETS = [
    ("chain read (balance + nonce, JSON-RPC to anvil)", ("payer_state",)),
    ("settlement kick (cache add / task publish)", ("kick", "start_settlement")),
    ("webhook / task publish", ("apply_async", "delay")),
    ("ledger + prediction rows (PostgreSQL, commit)", ("ledger.py", "create_prediction", "commit", "atomic")),
    ("signature verification (EIP-712, secp256k1)", ("verify_exact",)),
    ("price lookup", ("pricing_state",)),
    ("backpressure check", ("backpressure",)),
    ("input validation (JSON Schema)", ("validate_input", "jsonschema")),
    ("header decode and parse", ("decode_header", "parse_payload")),
    ("response rendering", ("render", "prediction_json", "settle_response")),
]


def profile_paid(stack: Stack, url: str, headers: list[dict[str, str]], rate: float) -> dict[str, Any]:
    """Sample the server's workers with py-spy (wall time, idle included) while an open loop sends
    paid requests; what share of the request threads' samples each part of the path takes."""
    import shutil as sh

    spy = sh.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy is not installed (requirements-dev.txt)"}
    server = stack.servers[url.removesuffix(MODEL_PATH)]
    out = stack.tmp / "profile.raw"
    duration = max(3, int(len(headers) / rate) + 1)
    spy_proc = subprocess.Popen(
        [spy, "record", "--pid", str(server.pid), "--subprocesses", "--idle", "--nonblocking", "--rate", "250",
         "--format", "raw", "--duration", str(duration), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    result = open_loop(url, headers, rate)
    spy_proc.wait(duration + 30)
    counts: dict[str, int] = {}
    total = 0
    if out.exists():
        for line in out.read_text().splitlines():
            stack_text, _, n = line.rpartition(" ")
            # A request's sync code: under WSGI in Django's get_response, under ASGI in the
            # thread asgiref runs it in (thread_handler); the rest is idle threads, the arbiter,
            # the event loop's own waiting.
            if "get_response" not in stack_text and "thread_handler" not in stack_text:
                continue
            total += int(n)
            bucket = next((name for name, keys in PROFILE_BUCKETS if any(k in stack_text for k in keys)), "Django, DRF and the rest")
            counts[bucket] = counts.get(bucket, 0) + int(n)
    (RESULTS / f"{PREFIX}profile.txt").write_text(
        "\n".join(f"{100 * n / max(total, 1):5.1f}%  {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) + "\n"
    )
    return {
        "open_loop": result,
        "samples": total,
        "share_pct": {name: round(100 * n / max(total, 1), 1) for name, n in sorted(counts.items(), key=lambda kv: -kv[1])},
    }


EXPORT_PROBE = """
import os, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")
sys.path.insert(0, os.getcwd())
import django
django.setup()
from pathlib import Path
from payments.models import Payment
from payments.finance.reports import LedgerFilter
mode, out, network = sys.argv[1:4]
flt = LedgerFilter(network=network)
t0 = time.perf_counter()
if mode == "baseline-csv":
    from benchmarks.baseline_export import export_csv
    with open(out, "w", encoding="utf-8", newline="") as handle:
        export_csv(Payment.objects.filter(network=network), handle)
else:
    from payments.finance import exports, xlsx
    if mode == "copy-csv":
        with open(out, "wb") as handle:
            exports.copy_csv(flt, handle)
    elif mode == "copy-zip":
        exports.write_zip(flt, Path(out))
    else:
        xlsx.write_xlsx(flt, Path(out))
# VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark across exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(time.perf_counter() - t0, hwm)
"""
#: What the export section measures: today's path (COPY to data.csv alone, and the zip with its
#: summary that the admin hands out), the path before issue 20 (ORM chunks formatted in
#: Python, totals as rows), and XLSX (the same COPY, typed, through xlsxwriter).
EXPORT_MODES = {
    "copy-csv": ("csv", "COPY to CSV (data.csv)"),
    "copy-zip": ("zip", "COPY to the zip (data.csv + summary.csv + rates.csv + export.json)"),
    "baseline-csv": ("csv", "before issue 20: ORM keyset chunks + csv.writer, totals as rows"),
    "xlsx": ("xlsx", "XLSX (COPY typed rows + xlsxwriter, constant memory)"),
}
#: XLSX is measured up to this many rows (xlsxwriter writes some 10,000 rows/s: a million takes minutes).
XLSX_MAX_ROWS = 100_000


def bench_export(stack: Stack, sizes: list[int]) -> list[dict[str, Any]]:
    """Ledger rows exported per second and the exporting process's peak RSS, each path in its
    own process, side by side on the same rows."""
    from django.db import connection
    from django.utils import timezone

    from payments.models import Payment

    results = []
    made = 0
    network = "eip155:999999"  # synthetic rows of their own, apart from the other benchmarks
    for n in sizes:
        now = timezone.now()
        while made < n:
            batch = min(20000, n - made)
            Payment.objects.bulk_create(
                [
                    Payment(
                        status="confirmed",
                        x402_version=2,
                        network=network,
                        asset=stack.chain.asset,
                        payer="0x" + secrets.token_hex(20),
                        pay_to=stack.chain.pay_to,
                        amount=PRICE + i % 7,
                        nonce="0x" + secrets.token_hex(32),
                        valid_after=0,
                        valid_before=2**40,
                        signature="0x00",
                        payload={},
                        requirement={},
                        resource="http://bench/export",
                        request_fingerprint="x",
                        settle_tx_hash="0x" + secrets.token_hex(32),
                        block_number=1,
                        confirmations=1,
                        settled_at=now,
                        confirmed_at=now,
                        gas_cost_wei=82_900 * 10**9,
                    )
                    for i in range(batch)
                ],
                batch_size=5000,
            )
            made += batch
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE payments_payment")  # fresh statistics after the bulk load
        for mode, (suffix, label) in EXPORT_MODES.items():
            if mode == "xlsx" and n > XLSX_MAX_ROWS:
                continue
            out = stack.tmp / f"export-{n}.{suffix}"
            done = subprocess.run(
                [sys.executable, "-c", EXPORT_PROBE, mode, str(out), network],
                cwd=ROOT,
                env=stack.env,
                capture_output=True,
                text=True,
                check=True,
            )
            seconds, rss_kb = done.stdout.split()[-2:]
            results.append(
                {
                    "rows": n,
                    "path": mode,
                    "label": label,
                    "seconds": round(float(seconds), 2),
                    "rows_per_s": round(n / float(seconds)),
                    "peak_rss_mb": round(int(rss_kb) / 1024),
                    "file_mb": round(out.stat().st_size / 2**20, 1),
                }
            )
            print(f"  {n} rows, {mode}: {results[-1]['rows_per_s']} rows/s, {results[-1]['peak_rss_mb']} MB", flush=True)
            out.unlink()
    return results


def export_only(sizes: list[int], quick: bool) -> int:
    """``--only export``: the export section alone (its own stack); results in export.json/.md."""
    stack = Stack(quick=False)
    started = time.monotonic()
    try:
        stack.start()
        rows = bench_export(stack, sizes)
    finally:
        stack.stop()
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "seconds": round(time.monotonic() - started, 1),
        "export": rows,
    }
    lines = [
        f"x402 export benchmark: {results['date']}, commit {results['commit']}, {results['machine']}",
        "",
        "| rows | path | seconds | rows/s | peak RSS MB | file MB |",
        "|---|---|---|---|---|---|",
        *[
            f"| {e['rows']:,} | {e['label']} | {e['seconds']} | {e['rows_per_s']:,} | {e['peak_rss_mb']} | {e['file_mb']} |"
            for e in rows
        ],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "quick.export" if quick else "export"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def http_only(duration: int, quick: bool) -> int:
    """``--only http``: the HTTP figures alone, uvicorn (as deployed) and gunicorn side by side."""
    stack = Stack(quick)
    try:
        stack.start()
        commit = bench_commit(1000)
        figures = {}
        for name, start in [("uvicorn", stack.uvicorn), ("gunicorn", lambda env: stack.gunicorn("x402site.wsgi:application", env))]:
            server = start(stack.env)
            figures[name] = http_figures(stack, server, duration, quick)
            stack.stop_server(server)
    finally:
        stack.stop()
    for name, f in figures.items():
        for key in ("challenge", "ungated", "paid", "paid_half_rate", "ungated_half_rate"):
            m = f[key]
            print(f"{name:9} {key:15} {m.get('rps', m.get('rate')):7.1f} req/s  p50 {m['p50_ms']:6.1f} ms  p99 {m['p99_ms']:6.1f} ms")
        print(f"{name:9} paid / ungated = {f['paid']['rps'] / f['ungated']['rps']:.2f}")
        if "rounds_rps" in f["paid"]:
            print(f"{name:9} rounds: ungated {f['ungated']['rounds_rps']}, paid {f['paid']['rounds_rps']}")
    print(f"one durable commit: p50 {commit['p50_ms']} ms, p99 {commit['p99_ms']} ms")
    return 0


def channels_only(duration: int, quick: bool) -> int:
    """``--only channels``: on uvicorn, the paid create with exact then with vouchers (closed
    loop, then half rate), and the gas of a channel's life per paid request."""
    stack = Stack(quick)
    try:
        stack.start()
        ours = stack.uvicorn(stack.env)
        figures = http_figures(stack, ours, duration, quick)
        channels = bench_channels_http(stack, ours, duration, figures["paid"]["rps"])
        gas = bench_channel_gas(stack, ours + MODEL_PATH, 5 if quick else 50)
    finally:
        stack.stop()
    for name, f in (("exact", figures), ("voucher", channels)):
        for key in ("paid", "paid_half_rate"):
            m = f[key]
            print(f"{name:8} {key:15} {m.get('rps', m.get('rate')):7.1f} req/s  p50 {m['p50_ms']:6.1f} ms  p99 {m['p99_ms']:6.1f} ms")
    print(f"voucher / exact = {channels['paid']['rps'] / figures['paid']['rps']:.2f}; gas:", json.dumps(gas))
    return 0


def sustained_only(seconds: int) -> int:
    """``--only sustained``: the sustained run alone, on a stack of its own (its 10 s pass
    measures the deployment's paid rate; no pass without workers runs before it, whose
    payments and runs its workers would take on)."""
    stack = Stack(False)
    try:
        stack.start()
        url = stack.uvicorn(stack.env) + MODEL_PATH
        sustained = bench_sustained(stack, url, 150.0, seconds)
    finally:
        stack.stop()
    print("sustained:", json.dumps({k: v for k, v in sustained.items() if k != "load"}))
    print("load:", json.dumps(sustained["load"]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes, short loads")
    parser.add_argument("--sustained", type=int, default=300, help="seconds of the sustained paid load (full run)")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections not to run: channels, reconciliation, export"
    )
    parser.add_argument(
        "--only",
        choices=["export", "http", "sustained", "channels"],
        help="run one section alone: export (1,000,000 rows side by side), http (both servers' figures), "
        "sustained (the paid rate measured, then --sustained seconds at 80%% of it), channels (the paid "
        "create with exact and with vouchers, and a channel's gas per request)",
    )
    args = parser.parse_args()
    if args.only == "export":
        return export_only([2000, 20000] if args.quick else [100_000, 1_000_000], args.quick)
    if args.only == "http":
        return http_only(3 if args.quick else 10, args.quick)
    if args.only == "sustained":
        return sustained_only(args.sustained)
    if args.only == "channels":
        return channels_only(2 if args.quick else 10, args.quick)
    quick = args.quick
    skip = set(filter(None, args.skip.split(",")))
    global PREFIX
    PREFIX = "quick." if quick else ""
    if shutil.which("wrk") is None:
        print("wrk is required (Debian package 'wrk'): apt-get install -y wrk", file=sys.stderr)
        return 2
    duration = 2 if quick else 10
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "quick": quick,
    }
    stack = Stack(quick)
    try:
        stack.start()
        print("verification...", flush=True)
        results["verification"] = bench_verification(500 if quick else 5000)
        results["price_cache"] = bench_price_cache(100 if quick else 1000)
        results["chain_read"] = bench_chain_read(stack, 100 if quick else 1000)
        results["durable_commit"] = bench_commit(100 if quick else 1000)

        # The sustained run first, on a clean stack: the sections after it run with no worker,
        # and leave thousands of payments and runs waiting that its workers would take on.
        ours = stack.uvicorn(stack.env)
        url = ours + MODEL_PATH
        sustained = 5 if quick else args.sustained
        print(f"sustained paid load with settlement workers ({sustained} s)...", flush=True)
        results["sustained"] = bench_sustained(stack, url, 150.0, sustained)
        checkpoint(results, quick)
        stack.stop_server(ours)

        # The deployed server (docs/deploy.md: uvicorn, 2 workers) first, then gunicorn (WSGI,
        # 2 gthread workers) for comparison; the sections after this one use the deployed one.
        print("HTTP on gunicorn (WSGI): challenge, ungated baseline, paid...", flush=True)
        wsgi = stack.gunicorn("x402site.wsgi:application", stack.env)
        results["wsgi"] = http_figures(stack, wsgi, duration, quick)
        stack.stop_server(wsgi)
        print("HTTP on uvicorn (ASGI, as deployed): challenge, ungated baseline, paid...", flush=True)
        ours = stack.uvicorn(stack.env)
        url = ours + MODEL_PATH
        results.update(http_figures(stack, ours, duration, quick))
        results["sustained"]["saturating_rps_without_workers"] = results["paid"]["rps"]
        half = results["paid_half_rate"]["rate"]
        print("profile of the paid create at half rate...", flush=True)
        fresh = signed_headers(stack, stack.fund(20), int(half * duration / 20) + 1, url)
        results["profile"] = profile_paid(stack, url, [{"PAYMENT-SIGNATURE": h} for h in fresh], half)

        print("reference: the SDK's Flask middleware + the SDK facilitator...", flush=True)
        from tests.sdk_facilitator import serve_sdk_facilitator

        with serve_sdk_facilitator(stack.chain.rpc_url, stack.spare_keys[0], stack.chain.network) as (
            fac_url,
            _,
        ):
            ref_env = {
                **stack.env,
                "REF_FACILITATOR_URL": fac_url,
                "REF_PAY_TO": stack.chain.pay_to,
                "REF_ASSET": stack.chain.asset,
                "REF_AMOUNT": str(PRICE),
            }
            ref = stack.gunicorn("benchmarks.reference_app:app", ref_env)
            ref_headers = signed_headers(stack, stack.fund(20), 10 if quick else 40, ref + "/paid")
            ref_folder = write_header_files(ref_headers, 2)
            results["reference_paid"] = wrk(
                ref + "/paid", LUA_PAID % (BODY, ref_folder, "PAYMENT-SIGNATURE"), duration, 16
            )

        print("settlement: one at a time, then batched...", flush=True)
        results["settlement"] = bench_settlement(stack, 10 if quick else 100, 100 if quick else 2000)
        checkpoint(results, quick)
        results["channels"] = None
        if "channels" not in skip:
            print("payment channels: the paid create with vouchers, and a channel's gas...", flush=True)
            results["channels"] = bench_channels_http(stack, ours, duration, results["paid"]["rps"], quick)
            results["channels"]["gas"] = bench_channel_gas(stack, url, 5 if quick else 50)
            checkpoint(results, quick)
        results["reconciliation"] = results["export"] = []
        if "reconciliation" not in skip:
            print("reconciliation...", flush=True)
            results["reconciliation"] = bench_reconciliation([100] if quick else [1000, 10000, 100000])
        if "export" not in skip:
            print("export...", flush=True)
            results["export"] = bench_export(stack, [500] if quick else [100000, 1000000])
    finally:
        stack.stop()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["ratios"] = {
        "paid_vs_ungated": round(results["paid"]["rps"] / results["ungated"]["rps"], 2),
        "paid_vs_ungated_wsgi": round(results["wsgi"]["paid"]["rps"] / results["wsgi"]["ungated"]["rps"], 2),
        "paid_asgi_vs_wsgi": round(results["paid"]["rps"] / results["wsgi"]["paid"]["rps"], 2),
        "paid_vs_reference": round(results["paid"]["rps"] / results["reference_paid"]["rps"], 2),
        "verify_vs_raw_recover": results["verification"]["ratio"],
        "batched_settle_vs_paid_accept": round(results["settlement"]["batched"]["per_s"] / results["paid"]["rps"], 2),
        # (quick: a fixed pace, not a saturating rate: no ratio)
        "voucher_vs_exact": None
        if quick or not results["channels"]
        else round(results["channels"]["paid"]["rps"] / results["paid"]["rps"], 2),
        "batched_vs_one_at_a_time": round(
            results["settlement"]["batched"]["per_s"] / results["settlement"]["sequential_per_s"], 1
        ),
    }
    report = render(results)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "quick" if quick else "latest"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(report + "\n")
    return 0


def http_figures(stack: Stack, server: str, duration: int, quick: bool) -> dict[str, Any]:
    """On one server: the 402 challenge, the ungated create (operator token), the paid create
    (closed loop, 16 connections), the paid create at half its saturating rate (open loop) and
    the ungated create offered that same rate (the floor the paid create's latency sits on: the
    same view, prediction row and commit, without the payment).

    The ungated and paid loads alternate in rounds (ungated 2 s, paid 2 s, five times in a full
    run): these hosts' speed drifts by tens of percent within a minute, and one load after the
    other puts the drift into their ratio. Each is reported over its rounds together."""
    url = server + MODEL_PATH
    figures: dict[str, Any] = {"challenge": wrk(url, LUA_POST % (BODY, ""), duration, 16)}
    ungated_script = LUA_POST % (BODY, 'wrk.headers["Authorization"] = "Bearer bench-operator-token"')
    payers = stack.fund(40 if quick else 200)
    rounds = 1 if quick else max(1, duration // 2)
    seconds = max(1, duration // rounds)
    ungated, paid, prepared = [], [], 0
    for _ in range(rounds):
        ungated.append(wrk(url, ungated_script, seconds, 16))
        # Headers for this round's paid load: one per request, never reused (a replayed
        # authorization is refused). Sized on the ungated rate, which the paid one does not
        # exceed, or on half the challenge's where that is more: a short ungated load on a busy
        # host can read low (a smoke run once prepared fewer headers than its paid load sent).
        basis = max(ungated[-1]["rps"], figures["challenge"]["rps"] / 2)
        headers = signed_headers(stack, payers, max(1, int(basis * seconds * 1.5 + 100) // len(payers)), url)
        prepared += len(headers)
        paid.append(wrk(url, LUA_PAID % (BODY, write_header_files(headers, 2), "PAYMENT-SIGNATURE"), seconds, 16))
        if paid[-1]["requests"] > len(headers):
            print(f"  the paid load sent {paid[-1]['requests']} requests on {len(headers)} headers", flush=True)
    figures["ungated"], figures["paid"] = together(ungated), together(paid)
    figures["paid"]["headers_prepared"] = prepared
    half = max(5.0, figures["paid"]["rps"] / 2)
    fresh = signed_headers(stack, stack.fund(20), int(half * duration / 20) + 1, url)
    figures["paid_half_rate"] = open_loop(url, [{"PAYMENT-SIGNATURE": h} for h in fresh], half)
    operator = {"Authorization": "Bearer bench-operator-token"}
    figures["ungated_half_rate"] = open_loop(url, [operator] * int(half * duration + 1), half)
    return figures


def together(loads: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one closed-loop load as one: requests over the seconds they ran, the median of
    the rounds' p50s and the highest p99 (wrk reports percentiles, not the latencies behind
    them), statuses added up; each round's rate beside them."""
    if len(loads) == 1:
        return loads[0]
    statuses: dict[int, int] = {}
    for load in loads:
        for code, n in load["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    requests = sum(load["requests"] for load in loads)
    return {
        "rps": round(requests / sum(load["requests"] / load["rps"] for load in loads), 2),
        "p50_ms": statistics.median(load["p50_ms"] for load in loads),
        "p99_ms": max(load["p99_ms"] for load in loads),
        "requests": requests,
        "non_2xx": sum(load["non_2xx"] for load in loads),
        "statuses": statuses,
        "loadgen_cpu_pct": round(statistics.mean(load["loadgen_cpu_pct"] for load in loads), 1),
        "rounds_rps": [load["rps"] for load in loads],
    }


def bench_commit(samples: int) -> dict[str, Any]:
    """What one durable commit costs on this host's database (a row inserted and committed,
    ``synchronous_commit`` as configured, i.e. on): every create, paid or not, waits for one."""
    from django.db import connection, transaction

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS bench_commit_durable (id serial PRIMARY KEY, v int)")
    took = []
    for i in range(samples):
        t0 = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("INSERT INTO bench_commit_durable (v) VALUES (%s)", [i])
        took.append((time.perf_counter() - t0) * 1000)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE bench_commit_durable")
    took.sort()
    return {"samples": samples, "p50_ms": round(took[len(took) // 2], 2), "p99_ms": round(took[int(len(took) * 0.99)], 2)}


def checkpoint(results: dict[str, Any], quick: bool) -> None:
    """The results so far (a long run interrupted keeps what it measured)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{'quick' if quick else 'latest'}.partial.json").write_text(json.dumps(results, indent=2) + "\n")


def render(r: dict[str, Any]) -> str:
    rows = [
        "| measurement | requests/s | p50 ms | p99 ms | notes |",
        "|---|---|---|---|---|",
    ]
    for server, figures in [("uvicorn, ASGI, as deployed", r), ("gunicorn, WSGI", r["wsgi"])]:
        for key, label in [
            ("challenge", "402 challenge (unpaid POST)"),
            ("ungated", "ungated create (operator token)"),
            ("paid", "paid create (verify + chain read + ledger)"),
        ]:
            m = figures[key]
            rows.append(
                f"| {server}: {label} | {m['rps']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                f"{m['requests']} requests, {m['non_2xx']} non-2xx, wrk CPU {m['loadgen_cpu_pct']}% |"
            )
        h = figures["paid_half_rate"]
        rows.append(
            f"| {server}: paid create at half the saturating rate ({h['rate']:.0f}/s, open loop) | "
            f"{h['rate']:.0f} | {h['p50_ms']} | {h['p99_ms']} | {h['ok']}/{h['requests']} succeeded |"
        )
        h = figures.get("ungated_half_rate")
        if h:  # (results from before it was measured have none)
            rows.append(
                f"| {server}: ungated create at the same rate ({h['rate']:.0f}/s, open loop) | "
                f"{h['rate']:.0f} | {h['p50_ms']} | {h['p99_ms']} | {h['ok']}/{h['requests']} succeeded |"
            )
    m = r["reference_paid"]
    rows.append(
        f"| reference: SDK Flask middleware (gunicorn), paid | {m['rps']:.0f} | {m['p50_ms']:.1f} | "
        f"{m['p99_ms']:.1f} | {m['requests']} requests, {m['non_2xx']} non-2xx, wrk CPU {m['loadgen_cpu_pct']}% |"
    )
    v, s, c = r["verification"], r["settlement"], r["price_cache"]
    b, u = s["batched"], r["sustained"]
    ch = r["channels"]
    g = ch["gas"] if ch else {}
    lines = [
        f"x402 benchmarks: {r['date']}, commit {r['commit']}, {r['machine']}{' (quick)' if r['quick'] else ''}",
        "",
        *rows,
        "",
        f"- ratios (same run, ASGI as deployed): paid / ungated = **{r['ratios']['paid_vs_ungated']}** "
        f"(target >= 0.9); paid / reference = **{r['ratios']['paid_vs_reference']}** (target >= 6); "
        f"WSGI: paid / ungated = {r['ratios']['paid_vs_ungated_wsgi']}; paid ASGI / paid WSGI = "
        f"{r['ratios']['paid_asgi_vs_wsgi']}",
        f"- verification alone: {v['verify_per_s']} payments/s in one process; raw secp256k1 recovery "
        f"{v['raw_recover_per_s']}/s (ratio {v['ratio']})",
        f"- price lookup on the paid path: {c['cached_us']} us cached, {c['uncached_us']} us from the database",
        *(
            [
                f"- the paid create's chain read (balance, nonce state and head: one JSON-RPC batch to anvil, one "
                f"call at a time): {r['chain_read']['wall_ms']} ms wall, {r['chain_read']['cpu_ms']} ms of our CPU"
            ]
            if "chain_read" in r
            else []
        ),
        *(
            [
                f"- one durable commit on this host's PostgreSQL (a row inserted, idle machine): p50 "
                f"{r['durable_commit']['p50_ms']} ms, p99 {r['durable_commit']['p99_ms']} ms; every create waits for one"
            ]
            if "durable_commit" in r
            else []
        ),
        f"- settlement on anvil, one transaction per payment: {s['sequential_per_s']} payments/s one at a time, "
        f"{s['four_workers_per_s']}/s with 4 workers; {s['gas_per_payment']} gas per payment; "
        f"{s['confirmed']}/{s['payments']} confirmed",
        f"- batched settlement (same run): **{b['per_s']} payments/s** settled and confirmed by {b['workers']} "
        f"batchers on {b['lanes']} relayer lanes ({b['transactions']} transactions, {b['mean_items']} payments each "
        f"on average, at most {b['batch_max']}); {b['gas_per_payment_at_50_plus']} gas per payment in batches of 50+; "
        f"{b['confirmed']}/{b['payments']} confirmed",
        f"- ratios (same run): batched settle / paid accept = **{r['ratios']['batched_settle_vs_paid_accept']}** "
        f"(target >= 1.0); batched / one at a time = **{r['ratios']['batched_vs_one_at_a_time']}**",
        f"- sustained: {u['load']['rate']} paid requests/s offered ({SUSTAINED_FRACTION:.0%} of the saturating "
        f"paid rate of the deployment with its workers running, {u['saturating_rps_deployed']:.0f}/s; "
        f"{u['saturating_rps_without_workers']:.0f}/s with none; end to end, accepted, settled and run: "
        f"{u['saturating_rps_end_to_end']:.0f}/s; open loop, signed as they go) for "
        f"{u['seconds']} s: {u['load']['rps']:.0f}/s accepted, "
        f"{u['load']['requests']} requests, {u['load']['non_2xx']} non-2xx, p50 {u['load']['p50_ms']} ms, "
        f"p99 **{u['load']['p99_ms']} ms** (target <= 150), with Celery workers settling in batches: "
        f"**{u['confirmed_during_load_fraction']:.1%}** of the accepted confirmed during the load (target >= 95%), "
        f"{u['settled_during_load_per_s']} payments/s ({u['runs_ended_during_load_fraction']:.1%} of their predictions "
        f"ended during the load, a prediction worker of 2 processes); oldest unsettled payment during the load at most "
        f"**{u['max_oldest_unsettled_s']} s** (target < 10); ready backlog at most "
        f"{u['max_ready_backlog']}, oldest ready payment at most {u['max_oldest_ready_s']} s old; drained "
        f"{u['drain_seconds_after_load']} s after the load; expired or failed: {u['expired_or_failed']}; ledger "
        f"{u['ledger_atomic']} = pay-to balance change {u['pay_to_balance_change_atomic']}: {u['ledger_equals_chain']} "
        f"(curve: results/sustained.png); p99 by 10 s of the load: "
        f"{', '.join(f'{v:.0f}' for v in u['load']['p99_ms_by_window'])} ms",
        "- host CPU per paid request during the sustained load (and its drain), by component: "
        + ", ".join(f"{k} {v} ms" for k, v in u["cpu_ms_per_request"].items() if k != "host")
        + f"; the host in all {u['cpu_ms_per_request']['host']} ms ({os.cpu_count()} cores: at most "
        f"{os.cpu_count() * 1000 / max(u['cpu_ms_per_request']['host'], 0.01):.0f} paid requests/s)",
        *(
            [
                f"- payment channels (batch-settlement, same run, ASGI): paid create with vouchers "
                f"**{ch['paid']['rps']:.0f} req/s** (p50 {ch['paid']['p50_ms']:.1f} ms, p99 {ch['paid']['p99_ms']:.1f} ms) "
                f"vs exact {r['paid']['rps']:.0f} (voucher / exact = **{r['ratios']['voucher_vs_exact']}**); at half its "
                f"saturating rate ({ch['paid_half_rate']['rate']:.0f}/s) p50 {ch['paid_half_rate']['p50_ms']} ms, p99 "
                f"**{ch['paid_half_rate']['p99_ms']} ms** (exact: {r['paid_half_rate']['p99_ms']} ms); gas of a channel: deposit "
                f"{g['deposit']}, claim of {g['claim_batch']} channels {g['claim']}, settle {g['settle']}, refund {g['refund']}: "
                f"**" + ", ".join(f"{n} requests/channel {gas} gas/request" for n, gas in g["per_request"].items())
                + f"** (exact, batched: {g['exact_batched_per_payment']} gas/payment)"
            ]
            if ch
            else []
        ),
        "- where a paid create's time goes at half rate (py-spy, wall time of request threads): "
        + ", ".join(f"{name} {pct}%" for name, pct in r["profile"].get("share_pct", {}).items()),
    ]
    if r["reconciliation"]:
        lines.append("- reconciliation pass (receipts absent, every row moved):")
    for rec in r["reconciliation"]:
        lines.append(
            f"  - N = {rec['n']}: {rec['seconds']} s ({rec['per_payment_ms']} ms/payment), "
            f"{rec['rpc_http_requests']} RPC HTTP requests carrying {rec['rpc_calls_in_batches']} calls"
        )
    if r["export"]:
        lines.append("- ledger export (a separate process; peak RSS is that process's):")
    for e in r["export"]:
        lines.append(
            f"  - {e['rows']} rows, {e['label']}: {e['seconds']} s, {e['rows_per_s']} rows/s, "
            f"peak RSS {e['peak_rss_mb']} MB, file {e['file_mb']} MB"
        )
    lines.append(f"- suite time: {r['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
