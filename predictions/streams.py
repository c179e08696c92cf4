"""Listening to a prediction without holding a thread: the server-sent-event stream
(``urls.stream``) and ``Prefer: wait``.

Both are Django async code: served by an ASGI server (uvicorn; docs/deploy.md), a listener is a
task on the event loop fed by :mod:`predictions.events` (Redis pub/sub messages carrying the new
logs and pieces); it reads the database only when it starts, when a message does not follow on
from what it has, at the end, and every ``events.POLL_SECONDS`` without news, each time in the
event loop's shared thread pool with a connection closed after the read. So a listener holds
neither a worker nor a database connection (Django's ASGI handler keeps one idle thread per
request in flight for its sync middleware, but there is no pool to run out of). Under WSGI
``Prefer: wait`` still works, holding its request's thread, and a stream is delivered only
once the prediction ended (Django reads an async iterator to its end under WSGI): serve
streams with ASGI.

The stream speaks Replicate's format: ``output`` events (plain text; a piece that is not a
string is sent as JSON), ``logs`` events (one per line), ``error`` (JSON ``{"detail": ...}``)
and ``done`` (JSON: ``{}``, or ``{"reason": "error" | "canceled" | "aborted"}``); every event
has an ``id`` (``{unix time}:{sequence}``). A model whose output is a list streams its pieces
as they come; any other output is sent as one ``output`` event when the prediction ends.

Who may listen is who may read the prediction: its 160-bit random id is the capability, as
for ``GET /v1/predictions/{id}``. A paid output kept back until its payment confirms
(``after_success``, ``upto``) is kept back from the stream too, and so are its logs.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from django import db
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from x402site.exceptions import problem_response

from . import events
from .models import TERMINAL, Prediction, PredictionStatus

P = PredictionStatus
#: A comment line this often keeps proxies and clients from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
#: Why a stream ended, in ``done`` (Replicate's words; ``aborted`` is our Cancel-After's).
DONE_REASONS = {P.SUCCEEDED: None, P.FAILED: "error", P.CANCELED: "canceled", P.ABORTED: "aborted"}


def _text(piece: Any) -> str:
    return piece if isinstance(piece, str) else json.dumps(piece)


@dataclass(slots=True)
class Snapshot:
    """What a listener knows of a prediction: as read from the database (the output only if
    it may be shown), then extended by the messages that follow on from it."""

    status: str
    logs: str
    output: Any
    error: str

    @classmethod
    def of(cls, prediction: Prediction) -> Snapshot:
        output = prediction.output if prediction.output_released else None
        logs = prediction.logs if prediction.logs_released else ""
        return cls(prediction.status, logs or "", output, prediction.error)

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def apply(self, message: dict[str, Any]) -> bool:
        """Take in a message; False when it does not follow on from what is known (or says
        the prediction ended): read the database."""
        kind, at = message.get("kind"), message.get("at")
        if kind == events.LOGS and isinstance(at, int) and isinstance(message.get("text"), str):
            text = message["text"]
            if at + len(text) <= len(self.logs):
                return True  # already known
            if at == len(self.logs):
                self.logs += text
                return True
        if kind == events.OUTPUT and isinstance(at, int) and isinstance(message.get("pieces"), list):
            known = self.output if isinstance(self.output, list) else [] if self.output is None else None
            if known is not None:
                if at + len(message["pieces"]) <= len(known):
                    return True
                if at == len(known):
                    self.output = known + message["pieces"]
                    return True
        return False


class StreamCursor:
    """What a stream has sent so far, and the events that bring it up to a snapshot."""

    def __init__(self) -> None:
        self.pieces = 0
        self.logs = 0
        self.sequence = 0
        self.done = False

    def _event(self, event: str, data: str) -> bytes:
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.sequence += 1
        head = f"event: {event}\nid: {int(time.time())}:{self.sequence}\n"
        return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()

    def advance(self, snapshot: Snapshot) -> list[bytes]:
        """The events since the last call: new log lines (whole lines, until the end), then new
        output pieces, then ``error``/``done`` once it ended."""
        if self.done:
            return []
        ended = snapshot.ended
        frames: list[bytes] = []
        fresh = snapshot.logs[self.logs :]
        ready = fresh if ended else fresh[: fresh.rfind("\n") + 1]
        frames += [self._event("logs", line) for line in ready.splitlines()]
        self.logs += len(ready)
        output = snapshot.output
        if isinstance(output, list):
            frames += [self._event("output", _text(piece)) for piece in output[self.pieces :]]
            self.pieces = max(self.pieces, len(output))
        elif ended and output is not None and self.pieces == 0:
            frames.append(self._event("output", _text(output)))
            self.pieces = 1
        if ended:
            if snapshot.status == P.FAILED:
                frames.append(self._event("error", json.dumps({"detail": snapshot.error})))
            reason = DONE_REASONS.get(snapshot.status)
            frames.append(self._event("done", json.dumps({"reason": reason} if reason else {})))
            self.done = True
        return frames


def _read_now(prediction_id: str) -> Snapshot | None:
    """The prediction as it stands (in a pooled thread, whose connection is closed after)."""
    try:
        prediction = Prediction.objects.filter(pk=prediction_id).first()
        return None if prediction is None else Snapshot.of(prediction)
    finally:
        db.connection.close()


_read = sync_to_async(_read_now, thread_sensitive=False)


async def _events(prediction_id: str) -> AsyncIterator[bytes]:
    async with events.subscribed(prediction_id) as subscription:  # before the first read
        snapshot = await _read(prediction_id)
        cursor = StreamCursor()
        quiet_since = time.monotonic()
        while snapshot is not None:
            frames = cursor.advance(snapshot)
            for frame in frames:
                yield frame
            if cursor.done:
                return
            if frames:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                yield b": keepalive\n\n"
                quiet_since = time.monotonic()
            messages = await subscription.receive(min(KEEPALIVE_SECONDS, events.POLL_SECONDS))
            if not messages or not all([snapshot.apply(m) for m in messages]):
                snapshot = await _read(prediction_id)


@csrf_exempt  # an API route (no cookies): a POST is answered 405, not refused as a forgery
async def prediction_stream(request: HttpRequest, prediction_id: str) -> HttpResponse:
    """GET /v1/predictions/{id}/stream: the prediction's server-sent events, until ``done``."""
    if request.method != "GET":
        refused = problem_response(405, f"Method {request.method} is not allowed here; GET the stream.")
        refused["Allow"] = "GET"
        return refused
    if await _read(prediction_id) is None:
        return problem_response(404, "No such prediction.")
    return StreamingHttpResponse(
        _events(prediction_id),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def wait_until_ended(prediction_id: str, seconds: float) -> None:
    """Return once the prediction ended, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    async with events.subscribed(prediction_id) as subscription:
        snapshot = await _read(prediction_id)
        while snapshot is not None and not snapshot.ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            messages = await subscription.receive(remaining)
            if not messages or any(m.get("kind") == events.END for m in messages):
                snapshot = await _read(prediction_id)


def _release_connection() -> None:
    """Close the request thread's connection before a long wait (not inside a transaction:
    a test's, whose connection is the test's own)."""
    if not db.connection.in_atomic_block:
        db.connection.close()


class WaitThenRespond(HttpResponse):
    """What a create view answers when it should wait for the prediction (``Prefer: wait``):
    :func:`waits_asynchronously` waits without a thread, then calls ``respond`` (in a thread)
    for the real answer."""

    def __init__(self, prediction_id: str, seconds: float, respond: Callable[[], HttpResponse]) -> None:
        super().__init__(status=202)
        self.prediction_id = prediction_id
        self.seconds = seconds
        self.respond = respond


def waits_asynchronously(view: Callable[..., HttpResponse]) -> Callable[..., Any]:
    """Wrap a (sync) create view so that its ``Prefer: wait`` happens on the event loop."""

    @wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = await sync_to_async(view)(request, *args, **kwargs)
        if not isinstance(response, WaitThenRespond):
            return response
        await sync_to_async(_release_connection)()  # no connection held while it waits
        await wait_until_ended(response.prediction_id, response.seconds)
        return await sync_to_async(response.respond)()

    # Async only for Prefer: wait: x402site.asgi answers other requests on a worker thread with
    # the view itself.
    wrapper.sync_view = view  # type: ignore[attr-defined]
    return wrapper
