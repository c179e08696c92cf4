"""The cache backend: Django's Redis cache with one client, and so one connection pool, per
process and location.

Django keeps a cache object per context (``caches`` is an asgiref ``Local``). Under uvicorn
every request runs in a fresh copy of the event loop's context (a2wsgi's worker threads and
Django's ASGI handler both copy it), so each request that touched the cache built a new client,
a new pool and a new TCP connection to Redis (connect, ``HELLO``, ``CLIENT SETINFO``), and left
the connection for the garbage collector: about 1.4 ms of a paid create under load (the batcher
kick) and of every throttled 402. redis-py's pool is thread-safe, so one per process serves
every thread; a forked child (a prefork Celery worker) starts with none of its parent's.
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_clients: dict[tuple[str, ...], RedisCacheClient] = {}
_lock = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child builds clients of its own (redis-py would reset an inherited pool anyway)
    and inherits no lock held at the fork."""
    global _lock
    _clients.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


class SharedRedisCache(RedisCache):
    """``RedisCache`` whose client is shared by every instance with the same servers and options."""

    @cached_property
    def _cache(self) -> Any:
        key = (*self._servers, repr(sorted(self._options.items())))
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = self._class(self._servers, **self._options)
        return client
