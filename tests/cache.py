"""The suite's cache: the project's Redis cache, but clear() empties only this run's keys."""

from __future__ import annotations

from x402site.cache import SharedRedisCache


class RunCache(SharedRedisCache):
    """``clear()`` deletes the keys under this run's KEY_PREFIX, not the whole Redis database:
    the database is shared with the Celery broker and with runs in parallel (``pytest -n``'s
    other workers, other checkouts), whose queued tasks and keys a FLUSHDB would take."""

    def clear(self) -> bool:
        client = self._cache.get_client(write=True)
        keys = list(client.scan_iter(match=f"{self.key_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        return True
