"""Progress of predictions, published for whoever listens (the server-sent-event streams,
``Prefer: wait``): Redis pub/sub, one channel per prediction.

A message carries what changed: new log text and where it starts (``logs``), new output pieces
and where they start (``output``), or that the prediction ended (``end``). A listener applies
what follows on from what it has and reads the prediction from the database when a message
does not (it subscribed late, or missed one), at the end, and every :data:`POLL_SECONDS`
without a message (Redis restarted): a stream of many pieces costs its listeners no database
reads, and a lost message costs a delay, never a piece.

Only :mod:`predictions.lifecycle` publishes, after its transaction commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio as aioredis
from django.db import transaction

from x402site.conf import x402

log = logging.getLogger("predictions.events")

#: What changed: the logs grew, the output grew, the prediction ended.
LOGS, OUTPUT, END = "logs", "output", "end"
#: A listener with no message reads the prediction this often (a safety net: messages can be lost).
POLL_SECONDS = 10.0

_client: redis.Redis | None = None


def channel(prediction_id: str) -> str:
    return f"x402:prediction:{prediction_id}"


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(x402.http.events_url, socket_timeout=2, socket_connect_timeout=2)
    return _client


def publish(prediction_id: str, message: dict[str, Any]) -> None:
    """Once the current transaction commits, send ``message`` to the prediction's listeners
    (best effort: a listener also reads the database)."""
    payload = json.dumps(message)

    def send() -> None:
        try:
            _redis().publish(channel(prediction_id), payload)
        except redis.RedisError as exc:
            log.warning("prediction %s: %s not published: %s", prediction_id, message["kind"], exc.__class__.__name__)

    transaction.on_commit(send)


def logs_grew(prediction_id: str, before: str, after: str) -> None:
    """The logs went from ``before`` to ``after`` (a rewrite, not an extension, says only that)."""
    if after.startswith(before):
        publish(prediction_id, {"kind": LOGS, "at": len(before), "text": after[len(before) :]})
    else:
        publish(prediction_id, {"kind": LOGS})


def output_grew(prediction_id: str, before: list[Any], after: list[Any]) -> None:
    publish(prediction_id, {"kind": OUTPUT, "at": len(before), "pieces": after[len(before) :]})


def ended(prediction_id: str) -> None:
    publish(prediction_id, {"kind": END})


class Subscription:
    """A listener's subscription: :meth:`receive` returns the messages that came (none when
    the time passed first)."""

    def __init__(self, pubsub: aioredis.client.PubSub | None) -> None:
        self._pubsub = pubsub

    async def receive(self, seconds: float) -> list[dict[str, Any]]:
        """The messages of the next ``seconds`` (at most :data:`POLL_SECONDS`): as soon as one
        came, with every other one already waiting."""
        seconds = max(0.0, min(seconds, POLL_SECONDS))
        if self._pubsub is None:
            await asyncio.sleep(seconds)
            return []
        messages = []
        try:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=seconds)
            while message is not None:
                messages.append(message)
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
        except (redis.RedisError, OSError) as exc:
            log.warning("event subscription lost (%s); reading on a timer", exc.__class__.__name__)
            self._pubsub = None
        decoded = []
        for message in messages:
            try:
                body = json.loads(message["data"])
            except (TypeError, ValueError):
                body = None
            # Anything unreadable counts as "something changed": the listener reads the database.
            decoded.append(body if isinstance(body, dict) else {"kind": END})
        return decoded


@asynccontextmanager
async def subscribed(prediction_id: str) -> AsyncIterator[Subscription]:
    """Listen to a prediction's changes (subscribe before reading it, so nothing is missed).
    Without Redis the listener still works, reading every :data:`POLL_SECONDS`."""
    client = aioredis.Redis.from_url(x402.http.events_url, socket_connect_timeout=2)
    pubsub = client.pubsub()
    try:
        try:
            await pubsub.subscribe(channel(prediction_id))
            subscription = Subscription(pubsub)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot subscribe to prediction %s (%s); reading on a timer", prediction_id, exc)
            subscription = Subscription(None)
        yield subscription
    finally:
        try:
            await pubsub.aclose()
            await client.aclose()
        except (redis.RedisError, OSError):
            pass
