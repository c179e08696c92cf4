"""Liveness, readiness and metrics endpoints for operators and orchestrators."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process serves requests."""
    return JsonResponse({"status": "ok"})


def _check(fn: Any) -> dict[str, Any]:
    try:
        detail = fn()
        return {"ok": True, **(detail or {})}
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none raised
        return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:300]}


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _broker() -> None:
    from x402site.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _chains() -> dict[str, Any]:
    from payments.chain import rpc
    from payments.options import configured
    from payments.settlement import relayer_account

    blocks: dict[str, int] = {}
    low = []
    relayer = relayer_account(settings.X402_RELAYER_KEY).address if settings.X402_RELAYER_KEY else None
    for c in configured():
        blocks[c.option.network] = int(rpc(c.rpc_url, "eth_blockNumber", [], timeout=2), 16)
        if relayer and not c.facilitator_url:
            wei = int(rpc(c.rpc_url, "eth_getBalance", [relayer, "latest"], timeout=2), 16)
            if wei < settings.X402_RELAYER_MIN_BALANCE_WEI:
                low.append(f"{c.option.network}: {Decimal(wei).scaleb(-18)} ETH")
    if low:
        raise RuntimeError(f"relayer {relayer} gas balance low ({'; '.join(low)})")
    if not blocks:
        raise RuntimeError("no payment option is configured")
    return {"latest_blocks": blocks}


def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: database, broker, chain RPC, relayer gas balance. 503 if any fails."""
    checks = {"database": _check(_database), "broker": _check(_broker), "chain": _check(_chains)}
    ready = all(c["ok"] for c in checks.values())
    return JsonResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


def metrics(request: HttpRequest) -> HttpResponse:
    from prometheus_client import CONTENT_TYPE_LATEST

    from payments.metrics import render

    return HttpResponse(render(), content_type=CONTENT_TYPE_LATEST)
