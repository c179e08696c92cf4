"""Liveness, readiness and metrics endpoints for operators and orchestrators.

``/healthz`` and ``/readyz`` answer anyone, ``/readyz`` naming only which dependency is down.
``/metrics`` and the details of ``/readyz`` (latest blocks, the kind of failure) are for
operators: a bearer token from ``X402_OPS_TOKENS`` or, with none configured, a client on this
host (loopback, as seen through ``X402_TRUSTED_PROXIES``). Nothing here ever carries an RPC
URL, a token or a key: failures are reported by the exception's class name only.
"""

from __future__ import annotations

import ipaddress
from decimal import Decimal
from typing import Any

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from payments.ratelimit import client_address
from x402site.authentication import OpsToken
from x402site.conf import x402
from x402site.exceptions import problem_response


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process serves requests."""
    return JsonResponse({"status": "ok"})


def is_ops(request: HttpRequest) -> bool:
    """An operator's request: a bearer token of X402_OPS_TOKENS, or (none configured) local."""
    if x402.tokens.ops:
        return OpsToken.holds(request)
    try:
        return ipaddress.ip_address(client_address(request)).is_loopback
    except ValueError:
        return False


class NotReady(RuntimeError):
    """A failure described in our own words (safe to show an operator)."""


class Degraded(NotReady):
    """A failure that leaves the service able to work, less well (some lanes cannot pay)."""


def _check(fn: Any) -> dict[str, Any]:
    try:
        detail = fn()
        return {"ok": True, **(detail or {})}
    except Degraded as exc:
        return {"ok": False, "degraded": True, "error": str(exc)}
    except NotReady as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none raised
        # The class only: messages of transport errors carry URLs (and the keys in them).
        return {"ok": False, "error": exc.__class__.__name__}


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _broker() -> None:
    from x402site.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _chains() -> dict[str, Any]:
    from payments.chain.node import rpc
    from payments.chain.settlement import relayer_account
    from payments.options import configured

    blocks: dict[str, int] = {}
    low = []
    relayer = relayer_account(x402.relayer.key).address if x402.relayer.key else None
    for c in configured():
        blocks[c.option.network] = int(rpc(c.rpc_url, "eth_blockNumber", [], timeout=2), 16)
        if relayer and not c.facilitator_url:
            wei = int(rpc(c.rpc_url, "eth_getBalance", [relayer, "latest"], timeout=2), 16)
            if wei < x402.relayer.min_balance_wei:
                low.append(f"{c.option.network}: {Decimal(wei).scaleb(-18)} ETH")
    if low:
        raise NotReady(f"relayer {relayer} gas balance low ({'; '.join(low)})")
    if not blocks:
        raise NotReady("no payment option is configured")
    return {"latest_blocks": blocks}


def _lanes() -> None:
    """Sending accounts flagged as unable to pay for gas (``RelayerNonce.unfunded_since``): they
    take no new transactions. Degraded while another lane of each network can still send;
    not ready when every configured lane of a network is flagged."""
    from payments.chain.relayer import funded_lanes, relayer_keys
    from payments.models import RelayerNonce
    from payments.options import configured

    flagged = list(RelayerNonce.objects.filter(unfunded_since__isnull=False).order_by("network", "address"))
    if not flagged:
        return
    reasons = "; ".join(
        f"{row.address} on {row.network} cannot pay for gas since {row.unfunded_since:%Y-%m-%d %H:%M:%S} UTC"
        f" ({row.unfunded_reason[:200]})"
        for row in flagged
    )
    networks = {c.option.network for c in configured() if not c.facilitator_url}
    if relayer_keys() and any(not funded_lanes(network) for network in networks):
        raise NotReady(f"no relayer lane can pay: {reasons}")
    raise Degraded(f"lanes that take no new transactions: {reasons}")


def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: database, broker, chain RPC, relayer gas balance, lanes that cannot pay. 503
    if any fails; "degraded" (200) when only some lanes cannot pay and each network still has
    one that can.

    Everyone learns which check failed; operators (``is_ops``) also get the details.
    """
    checks = {
        "database": _check(_database),
        "broker": _check(_broker),
        "chain": _check(_chains),
        "lanes": _check(_lanes),
    }
    ready = all(c["ok"] for c in checks.values())
    degraded = not ready and all(c["ok"] or c.get("degraded") for c in checks.values())
    if not is_ops(request):
        checks = {name: {"ok": c["ok"]} for name, c in checks.items()}
    status = "ready" if ready else "degraded" if degraded else "unavailable"
    return JsonResponse({"status": status, "checks": checks}, status=200 if ready or degraded else 503)


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, for operators only (``is_ops``)."""
    if not is_ops(request):
        return problem_response(403, "Metrics need an operator token (X402_OPS_TOKENS).")
    from prometheus_client import CONTENT_TYPE_LATEST

    from payments.metrics import render

    return HttpResponse(render(), content_type=CONTENT_TYPE_LATEST)
