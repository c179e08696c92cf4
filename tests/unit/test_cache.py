"""The cache backend's process-wide client (x402site.cache)."""

from __future__ import annotations

import contextvars
import multiprocessing
import os

from django.core.cache import caches

from x402site import cache as shared


def _cache_client() -> object:
    caches["default"].get("x402-test-probe")
    return caches["default"]._cache


def test_every_context_gets_the_same_client() -> None:
    """As under uvicorn: each request runs in a fresh copy of the context, with a cache object of
    its own; all of them use the one client (and its pool)."""
    clients = {id(contextvars.Context().run(_cache_client)) for _ in range(5)}
    assert len(clients) == 1


def _child_has_no_client() -> None:
    os._exit(0 if not shared._clients else 1)


def test_a_forked_child_starts_without_its_parents_clients() -> None:
    _cache_client()
    assert shared._clients
    child = multiprocessing.get_context("fork").Process(target=_child_has_no_client)
    child.start()
    child.join(10)
    assert child.exitcode == 0
