"""Progress of predictions, published for whoever listens (the server-sent-event streams,
``Prefer: wait``): Redis pub/sub, one channel per prediction.

A message only says *that* something changed (``logs``, ``output``, ``end``); what changed is
in the database, which a listener reads after each wake-up. So a listener that subscribes first
and reads second misses nothing, a burst of messages costs one read, and a message lost (Redis
restarted) costs at most :data:`POLL_SECONDS` of delay: listeners also read on a timer.

Only :mod:`predictions.lifecycle` publishes, after its transaction commits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.db import transaction

log = logging.getLogger("predictions.events")

#: What changed: the logs grew, the output grew, the prediction ended.
LOGS, OUTPUT, END = "logs", "output", "end"
#: A listener reads the prediction at least this often, message or not.
POLL_SECONDS = 2.0

_client: redis.Redis | None = None


def channel(prediction_id: str) -> str:
    return f"x402:prediction:{prediction_id}"


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.X402_EVENTS_URL, socket_timeout=2, socket_connect_timeout=2)
    return _client


def publish(prediction_id: str, what: str) -> None:
    """Once the current transaction commits, tell the prediction's listeners ``what`` changed
    (best effort: a listener also reads on a timer)."""

    def send() -> None:
        try:
            _redis().publish(channel(prediction_id), what)
        except redis.RedisError as exc:
            log.warning("prediction %s: %s not published: %s", prediction_id, what, exc.__class__.__name__)

    transaction.on_commit(send)


class Wakeups:
    """A listener's subscription: :meth:`wait` returns when a message came or time passed."""

    def __init__(self, pubsub: aioredis.client.PubSub | None) -> None:
        self._pubsub = pubsub

    async def wait(self, seconds: float) -> bool:
        """True if the prediction changed (a message came) within ``seconds`` (at most
        :data:`POLL_SECONDS`); all pending messages are taken at once."""
        seconds = max(0.0, min(seconds, POLL_SECONDS))
        if self._pubsub is None:
            await asyncio.sleep(seconds)
            return False
        try:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=seconds)
            if message is None:
                return False
            while await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0):
                pass
            return True
        except (redis.RedisError, OSError) as exc:
            log.warning("event subscription lost (%s); reading on a timer", exc.__class__.__name__)
            self._pubsub = None
            return False


@asynccontextmanager
async def subscribed(prediction_id: str) -> AsyncIterator[Wakeups]:
    """Listen to a prediction's changes (subscribe before reading it, so nothing is missed).
    Without Redis the listener still works, reading every :data:`POLL_SECONDS`."""
    client = aioredis.Redis.from_url(settings.X402_EVENTS_URL, socket_connect_timeout=2)
    pubsub = client.pubsub()
    try:
        try:
            await pubsub.subscribe(channel(prediction_id))
            wakeups = Wakeups(pubsub)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot subscribe to prediction %s (%s); reading on a timer", prediction_id, exc)
            wakeups = Wakeups(None)
        yield wakeups
    finally:
        try:
            await pubsub.aclose()
            await client.aclose()
        except (redis.RedisError, OSError):
            pass
