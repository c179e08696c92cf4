"""The ASGI server (as deployed: uvicorn, docs/deploy.md) takes its database connections from a
pool of its own: requests reuse a bounded set of connections, none is opened per request."""

import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from django.conf import settings
from django.db import connection

from payments.chain import devchain
from tests.conftest import start_asgi_server

POOL_MAX = 4


def backends(application_name: str) -> set[tuple[int, str]]:
    """The server's open PostgreSQL backends (pid, start time)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, backend_start::text FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        return {(pid, start) for pid, start in cursor.fetchall()}


def burst(base: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: requests.get(f"{base}/v1/models", timeout=10).status_code, range(40)))
    assert set(codes) == {200}


def test_asgi_requests_reuse_a_bounded_pool_of_connections(chain, db, tmp_path: Path) -> None:
    name = f"x402-pool-{secrets.token_hex(3)}"
    d = settings.DATABASES["default"]
    url = f"postgres://{d['USER']}@{d['HOST'] or '127.0.0.1'}:{d['PORT'] or 5432}/{d['NAME']}?application_name={name}"
    proc, base = start_asgi_server(
        chain, tmp_path / "uvicorn.log", env={"DATABASE_URL": url, "DATABASE_POOL_MAX_SIZE": str(POOL_MAX)}
    )
    try:
        burst(base)
        first = backends(name)
        burst(base)
        second = backends(name)
    finally:
        devchain.stop(proc)
    assert first, "no connection outlived its request: each request opened its own"
    assert len(first | second) <= POOL_MAX, (first, second)
    assert first & second, "the second burst was served by new connections"
