"""Shared fixtures: a real anvil chain with the test USDC, settings pointing at it, payers.

Unit tests need none of this; chain and end-to-end tests start anvil once per session on a
free port, so they never collide with a running quick start.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.test import override_settings

from payments.chain import devchain
from payments.chain.devchain import DevChain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Tests publish to their own Redis database and queue, so a running quick start's worker never
#: takes their tasks; set before any task is sent (Celery caches its queues on first use).
TEST_BROKER_URL = os.environ.get("TEST_CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
TEST_QUEUE = f"test-{secrets.token_hex(4)}"


@pytest.fixture(scope="session", autouse=True)
def celery_test_broker() -> None:
    from x402site.celery import app

    app.conf.update(broker_url=TEST_BROKER_URL, task_default_queue=TEST_QUEUE)


def _table_rows(tables: list[str]) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Each non-empty table's columns and rows."""
    from django.db import connection

    found = {}
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            rows = cursor.fetchall()
            if rows:
                found[table] = ([c.name for c in cursor.description], rows)
    return found


def _restore(tables: list[str], snapshot: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> None:
    """Empty every table, then put back the rows of ``snapshot``, in one transaction (Django's
    foreign keys are deferrable, so the order does not matter)."""
    from django.contrib.contenttypes.models import ContentType
    from django.db import OperationalError, connection, transaction
    from psycopg.errors import LockNotAvailable

    quote = connection.ops.quote_name
    deadline = time.monotonic() + 30
    while True:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                # As TRUNCATE does, keep every other writer (a module's worker process) out until
                # the end; readers go on. EXCLUSIVE also keeps out row locks (SELECT ... FOR
                # UPDATE), and NOWAIT takes every table at once or none: the flush never waits
                # while holding a lock, so it cannot deadlock with a worker's transaction.
                cursor.execute(f"LOCK TABLE {', '.join(quote(t) for t in tables)} IN EXCLUSIVE MODE NOWAIT")
                cursor.execute("SET CONSTRAINTS ALL DEFERRED")
                cursor.execute("".join(f"DELETE FROM {quote(table)};" for table in tables))
                for table, (columns, rows) in snapshot.items():
                    names = ", ".join(quote(c) for c in columns)
                    marks = ", ".join(["%s"] * len(columns))
                    cursor.executemany(f"INSERT INTO {quote(table)} ({names}) VALUES ({marks})", rows)
            break
        except OperationalError as exc:
            if not isinstance(exc.__cause__, LockNotAvailable) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # a worker's transaction holds a table: try again when it ends
    ContentType.objects.clear_cache()


@pytest.fixture(scope="session", autouse=True)
def fast_flush() -> Iterator[None]:
    """The flush after each transactional test, to the same state in a fraction of the time.

    Django's flush TRUNCATEs every table (PostgreSQL makes new files for each: ~0.2 s), then
    emits post_migrate, which recreates the content types, the permissions and our roles (~0.3
    s): half a second after each of ~300 tests. The first flush is Django's own; what it leaves
    (exactly what post_migrate made) is kept, and each later flush DELETEs every row and puts
    those rows back, with the same ids. A flush with other options is Django's own.

    Transactional tests also flush while a module's worker process (its beat reconciling and
    sweeping every second) may be using the tables: the flush takes them all at once when no
    transaction holds them (``_restore``); a database error of another kind is tried again
    rather than failing the test's teardown."""
    from django.core.management.commands import flush
    from django.db import DEFAULT_DB_ALIAS, OperationalError, connection

    real = flush.Command.handle
    snapshot: dict[str, tuple[list[str], list[tuple[Any, ...]]]] | None = None

    def once(self: Any, *args: Any, **options: Any) -> Any:
        nonlocal snapshot
        plain = (
            options.get("database", DEFAULT_DB_ALIAS) == DEFAULT_DB_ALIAS
            and not options.get("reset_sequences")
            and not options.get("inhibit_post_migrate")
            and not options.get("allow_cascade")
        )
        tables = connection.introspection.django_table_names(only_existing=True, include_views=False)
        if not plain or snapshot is None:
            result = real(self, *args, **options)
            if plain:
                snapshot = _table_rows(tables)
            return result
        _restore(tables, snapshot)
        return None

    def handle(self: Any, *args: Any, **options: Any) -> Any:
        for attempt in range(5):
            try:
                return once(self, *args, **options)
            except Exception as exc:  # flush wraps the database error in a CommandError
                deadlock = "deadlock detected" in str(exc) or any(
                    isinstance(e, OperationalError) for e in (exc, exc.__cause__)
                )
                if not deadlock or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        return None

    flush.Command.handle = handle
    try:
        yield
    finally:
        flush.Command.handle = real


@pytest.fixture(scope="session", autouse=True)
def short_db_connections() -> None:
    """The live server starts a thread per connection: close each one's database connection at
    the end of its request, or a hundred concurrent requests exhaust PostgreSQL's slots."""
    from django.db import connections

    connections["default"].settings_dict["CONN_MAX_AGE"] = 0


@pytest.fixture(scope="session", autouse=True)
def test_cache() -> Iterator[None]:
    """A cache of this session's own (Redis database 14, a fresh key prefix; clearing it leaves
    other keys alone: tests.cache)."""
    location = os.environ.get("TEST_CACHE_URL", "redis://127.0.0.1:6379/14")
    backend = "tests.cache.RunCache"
    with override_settings(
        CACHES={"default": {"BACKEND": backend, "LOCATION": location, "KEY_PREFIX": TEST_QUEUE}}
    ):
        yield


@pytest.fixture(autouse=True)
def _clear_cache() -> None:
    """Every test starts with an empty cache, and so does what each process keeps in memory
    (the honoured price rules, the batcher kicks it knows of): the flush gives rows the same ids."""
    from django.core.cache import cache

    from payments.chain import batching
    from payments.pricing import honoured_cache

    cache.clear()
    honoured_cache.clear()
    batching._scheduled_until.clear()


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that needs the chain (the ``chain`` fixture, itself or through another fixture) is
    marked ``chain``: ``-m "not chain"`` runs exactly the tests that start no anvil.

    schemathesis names each operation's test ``test_no_server_errors[GET /v1/...]`` but gives
    them all one node id; pytest-xdist schedules by node id and would run one of them: each gets
    its name as its id."""
    if "chain" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.chain)
    if item.parent is not None and not item.nodeid.endswith(f"::{item.name}"):
        item._id = item.parent.id.child(item.name)  # pytest 9 derives nodeid from it


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChain]:
    """anvil + test USDC ("USD Coin"/"2"), 8 funded payers; the file other processes read."""
    yield from new_chain(tmp_path_factory)


def new_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChain]:
    """A chain of its own (the ``chain`` fixture's); a module whose tests need the chain's clock
    to agree with ours (no earlier test moved its timestamps ahead) overrides ``chain`` with
    one of these."""
    port = free_port()
    root = tmp_path_factory.mktemp("chain")
    proc, config = devchain.start_anvil(port, accounts=12, log_path=root / "anvil.log")
    try:
        dev = devchain.deploy(f"http://127.0.0.1:{port}", config, payer_count=8)
        # Accounts 10 and 11 are left for other relayers (the SDK's facilitator, a second server).
        dev.spare_keys = config["private_keys"][10:]  # type: ignore[attr-defined]
        dev.write(root / "devchain.json")
        dev.path = root / "devchain.json"  # type: ignore[attr-defined]
        yield dev
    finally:
        devchain.stop(proc)


@pytest.fixture(autouse=True)
def _ledger_agrees_with_chain(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test on the chain with a database: the reconciler finishes what it can, then
    no ledger row may be contradicted by the chain (tests/invariants.py)."""
    yield
    if "chain" not in request.fixturenames or request.node.get_closest_marker("django_db") is None:
        return
    from tests.invariants import assert_ledger_agrees_with_chain

    chain = request.getfixturevalue("chain")
    with override_settings(**option_settings(chain)):  # the test's own settings are gone by now
        assert_ledger_agrees_with_chain(chain.rpc_url)


@pytest.fixture(scope="session")
def second_token(chain: DevChain) -> DevChain:
    """A second EIP-3009 token on the same chain, with Base Sepolia's domain ("USDC"/"2")."""
    accounts = [p["address"] for p in chain.payers]
    config = {
        "available_accounts": [chain.relayer_address, chain.pay_to, *accounts],
        "private_keys": [chain.relayer_private_key, "", *[p["private_key"] for p in chain.payers]],
    }
    return devchain.deploy(chain.rpc_url, config, asset_name="USDC", asset_version="2")


def option_settings(dev: DevChain, **extra: Any) -> dict[str, Any]:
    option = {
        "network": dev.network,
        "rpc_url": dev.rpc_url,
        "asset": dev.asset,
        "asset_name": dev.asset_name,
        "asset_version": dev.asset_version,
        "pay_to": dev.pay_to,
        "batch_settler": dev.batch_settler,
        **extra,
    }
    return {
        "X402_PAYMENT_OPTIONS": [option],
        "X402_RELAYER_KEY": dev.relayer_private_key,
        "X402_RELAYER_KEYS": [dev.relayer_private_key],
        "X402_REFUND_KEY": dev.refund_private_key,
    }


@pytest.fixture
def chain_settings(chain: DevChain) -> Iterator[DevChain]:
    with override_settings(**option_settings(chain)):
        yield chain


def _offline_chain() -> DevChain:
    """The test chain's network and token domain, made-up keys, and no node behind the URL."""
    from eth_account import Account

    relayer, refund, pay_to = (Account.from_key("0x" + byte * 32) for byte in ("11", "22", "33"))
    return DevChain(
        rpc_url="http://127.0.0.1:9",  # discard: nothing answers
        chain_id=31337,
        network="eip155:31337",
        asset="0x5FbDB2315678afecb367f032d93F642f64180aa3",  # where anvil's first deployment lands
        asset_name="USD Coin",
        asset_version="2",
        pay_to=pay_to.address,
        relayer_address=relayer.address,
        relayer_private_key="0x" + relayer.key.hex().removeprefix("0x"),
        refund_address=refund.address,
        refund_private_key="0x" + refund.key.hex().removeprefix("0x"),
    )


@pytest.fixture
def offline_options() -> Iterator[DevChain]:
    """Payment options as on the test chain, without a chain: for tests of what a 402 says
    (prices, the challenge, listings), which read nothing from the chain. A test that verifies
    or settles a payment uses ``chain_settings``."""
    offline = _offline_chain()
    with override_settings(**option_settings(offline)):
        yield offline


@pytest.fixture
def eager_celery() -> Iterator[None]:
    """Run tasks inline (settlement and the prediction run) in the test process."""
    from x402site.celery import app

    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    try:
        yield
    finally:
        app.conf.task_always_eager = False


@pytest.fixture
def demo_model(db: None) -> Any:
    from predictions.demo import seed

    return seed()[0]


def rpc(url: str, method: str, params: list[Any]) -> Any:
    r = requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, timeout=10)
    body = r.json()
    if "error" in body:
        raise RuntimeError(body["error"])
    return body["result"]


def token_balance(dev: DevChain, address: str) -> int:
    data = "0x70a08231" + address[2:].lower().rjust(64, "0")
    return int(rpc(dev.rpc_url, "eth_call", [{"to": dev.asset, "data": data}, "latest"]), 16)


def transfer_count(dev: DevChain, to: str) -> int:
    """Token Transfer events to ``to`` over the whole chain."""
    from payments.chain.abi import TRANSFER_TOPIC

    logs = rpc(
        dev.rpc_url,
        "eth_getLogs",
        [
            {
                "address": dev.asset,
                "fromBlock": "0x0",
                "toBlock": "latest",
                "topics": [TRANSFER_TOPIC, None, "0x" + to[2:].lower().rjust(64, "0")],
            }
        ],
    )
    return len(logs)


def wait_mined(rpc_url: str, tx_hash: str, timeout: float = 10) -> dict:
    """The receipt of ``tx_hash`` once it exists: anvil answers a send (automine on) before the
    block holding it is there, so a read straight after may see nothing yet."""
    deadline = time.monotonic() + timeout
    while (receipt := rpc(rpc_url, "eth_getTransactionReceipt", [tx_hash])) is None:
        assert time.monotonic() < deadline, f"{tx_hash} was not mined within {timeout} s"
        time.sleep(0.02)
    return receipt


def send_as_mint(dev: DevChain, to: str, amount: int) -> None:
    """Mint test USDC to ``to`` (the deployer owns the token) and wait for it."""
    data = "0x40c10f19" + to[2:].lower().rjust(64, "0") + hex(amount)[2:].rjust(64, "0")
    tx = rpc(
        dev.rpc_url, "eth_sendTransaction", [{"from": dev.relayer_address, "to": dev.asset, "data": data}]
    )
    wait_mined(dev.rpc_url, tx)


def fresh_payer(dev: DevChain, amount: int = 10**9) -> dict[str, str]:
    """A new account holding ``amount`` test USDC (tests that drain or spend one use their own)."""
    from eth_account import Account

    account = Account.create()
    send_as_mint(dev, account.address, amount)
    # Unlocked, with gas money, so a test can also send from it (eth_sendTransaction).
    rpc(dev.rpc_url, "anvil_impersonateAccount", [account.address])
    rpc(dev.rpc_url, "anvil_setBalance", [account.address, hex(10**18)])
    return {"address": account.address, "private_key": "0x" + account.key.hex().removeprefix("0x")}


def start_worker(
    chain: DevChain,
    log_path: Path,
    queue: str,
    *,
    beat: bool,
    env: dict[str, str] | None = None,
    settlement: bool = True,
):
    """Start a real Celery worker process against the test database, broker and chain; it also
    takes ``queue``'s settlement tasks unless ``settlement`` is false (x402site.celery.route_task)."""
    import subprocess
    import sys

    from django.conf import settings

    db = settings.DATABASES["default"]
    full_env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "CELERY_TASK_DEFAULT_QUEUE": TEST_QUEUE,
        # The cache the web side uses, as in production (a python run's cancel mark travels
        # through it); the events channel stays where it was (it defaults to the cache's URL).
        "CACHE_URL": settings.CACHES["default"]["LOCATION"],
        "CACHE_KEY_PREFIX": settings.CACHES["default"].get("KEY_PREFIX", ""),
        "X402_EVENTS_URL": settings.X402_EVENTS_URL,
        "X402_DEVCHAIN_FILE": str(chain.path),  # type: ignore[attr-defined]
        "X402_RECONCILE_INTERVAL": "1",
        **(env or {}),
    }
    full_env.pop("X402_ASSET", None)
    # A worker as deployed has no connection pool: x402site.asgi turns DATABASE_POOL on in the
    # environment of a process that imports it (this one, after an ASGI test), and a worker that
    # inherited it gave its connection back to a pool after every task.
    if "DATABASE_POOL" not in (env or {}):
        full_env.pop("DATABASE_POOL", None)
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "x402site",
        "worker",
        "-l",
        "info",
        "-Q",
        f"{queue},{queue}-settlement" if settlement else queue,
        "--concurrency",
        "2",
        "-n",
        f"{queue}@%h",
    ]
    if beat:
        command += ["-B", "-s", str(log_path.with_suffix(".beat"))]
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=devchain.die_with_parent,
    )
    deadline = time.monotonic() + 30
    while b"ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            devchain.stop(proc)
            raise RuntimeError("celery worker did not start:\n" + log_path.read_text())
        time.sleep(0.1)
    return proc


@pytest.fixture(scope="module")
def celery_worker_process(
    chain: DevChain,
    django_db_setup: None,
    django_db_blocker: Any,
    live_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """A real Celery worker process (with beat) on this session's queue, for one test module:
    its reconciler must not act on other modules' payments, which run with other settings."""
    from x402site.celery import app

    assert app.amqp.default_queue.name == TEST_QUEUE, "a task was sent before the test broker was set"
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(chain, log_path, TEST_QUEUE, beat=True, env={"X402_PUBLIC_URL": live_server.url})
    try:
        yield {"queue": TEST_QUEUE, "log": str(log_path)}
    finally:
        devchain.stop(proc)


def _serve_cog(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real Cog model server (cog + coglet from PyPI, no Docker) running tests/<model_dir>."""
    import subprocess
    import sys

    port = free_port()
    log_path = tmp_path_factory.mktemp("cog") / "cog.log"
    env = {
        **os.environ,
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "PORT": str(port),
        # coglet starts its worker with the `python` on PATH: make it this environment's.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=Path(__file__).resolve().parent / model_dir,
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=devchain.die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health-check", timeout=1).json().get("status") == "READY":
                    break
            except (requests.RequestException, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cog server did not become READY:\n" + log_path.read_text())
            time.sleep(0.1)
        yield {"url": url, "log": log_path}
    finally:
        devchain.stop(proc)


@pytest.fixture(scope="session")
def cog_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real Cog model server running tests/cog_model (a plain string output)."""
    yield from _serve_cog("cog_model", tmp_path_factory)


@pytest.fixture(scope="session")
def cog_stream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real Cog model server running tests/cog_stream_model (an iterator of strings)."""
    yield from _serve_cog("cog_stream_model", tmp_path_factory)


@pytest.fixture
def staff(db: None) -> dict[str, Any]:
    """Logged-in clients: an operator, a finance user (in their groups), and an anonymous one."""
    from django.contrib.auth.models import Group, User
    from django.test import Client

    from payments.roles import FINANCE, OPERATORS, ensure_roles

    ensure_roles()

    def make(name: str, group: str) -> Client:
        user = User.objects.create_user(name, password="pw", is_staff=True)
        user.groups.add(Group.objects.get(name=group))
        client = Client()
        client.force_login(user)
        return client

    return {"operator": make("olga", OPERATORS), "finance": make("finn", FINANCE), "anonymous": Client()}


def poll_until_done(url: str, timeout: float = 20.0) -> dict[str, Any]:
    """GET a prediction until it is terminal (or the time is up); its last JSON."""
    from predictions.models import TERMINAL

    deadline = time.monotonic() + timeout
    while True:
        body = requests.get(url, timeout=5).json()
        if body["status"] in TERMINAL or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def start_asgi_server(chain: DevChain, log_path: Path, env: dict[str, str] | None = None):
    """Serve the project with uvicorn (the ASGI application, as deployed: docs/deploy.md) against
    the test database, broker, cache and chain. Returns (process, base URL)."""
    import subprocess
    import sys

    from django.conf import settings

    db = settings.DATABASES["default"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cache = settings.CACHES["default"]
    full_env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "CELERY_TASK_DEFAULT_QUEUE": TEST_QUEUE,
        "CACHE_URL": cache["LOCATION"],
        "CACHE_KEY_PREFIX": cache.get("KEY_PREFIX", ""),
        "X402_DEVCHAIN_FILE": str(chain.path),  # type: ignore[attr-defined]
        "X402_PUBLIC_URL": url,
        **(env or {}),
    }
    full_env.pop("X402_ASSET", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "x402site.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env=full_env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=devchain.die_with_parent,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{url}/healthz", timeout=1)
            return proc, url
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                devchain.stop(proc)
                raise RuntimeError("uvicorn did not start:\n" + log_path.read_text()) from None
            time.sleep(0.1)
