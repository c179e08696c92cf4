"""Listening to a prediction without holding a thread: the server-sent-event stream
(``urls.stream``) and ``Prefer: wait``.

Both are Django async code: served by an ASGI server (uvicorn; docs/deploy.md), a listener is a
task on the event loop waiting for :mod:`predictions.events` (Redis pub/sub) and reading the
prediction on each wake-up; no worker waits with it (Django's ASGI handler keeps one idle thread
per request in flight for its sync middleware, but there is no pool to run out of). Under WSGI
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
(``after_success``) is kept back from the stream too.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from payments.exceptions import problem_response

from . import events
from .models import Prediction, PredictionStatus

P = PredictionStatus
#: A comment line this often keeps proxies and clients from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
#: Why a stream ended, in ``done`` (Replicate's words; ``aborted`` is our Cancel-After's).
DONE_REASONS = {P.SUCCEEDED: None, P.FAILED: "error", P.CANCELED: "canceled", P.ABORTED: "aborted"}


def _text(piece: Any) -> str:
    return piece if isinstance(piece, str) else json.dumps(piece)


class StreamCursor:
    """What a stream has sent so far, and the events that bring it up to a prediction's state."""

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

    def advance(self, prediction: Prediction) -> list[bytes]:
        """The events since the last call: new log lines (whole lines, until the end), then new
        output pieces, then ``error``/``done`` once it ended."""
        if self.done:
            return []
        ended = prediction.is_terminal
        frames: list[bytes] = []
        fresh = (prediction.logs or "")[self.logs :]
        ready = fresh if ended else fresh[: fresh.rfind("\n") + 1]
        frames += [self._event("logs", line) for line in ready.splitlines()]
        self.logs += len(ready)
        output = prediction.output if prediction.output_released else None
        if isinstance(output, list):
            frames += [self._event("output", _text(piece)) for piece in output[self.pieces :]]
            self.pieces = max(self.pieces, len(output))
        elif ended and output is not None and self.pieces == 0:
            frames.append(self._event("output", _text(output)))
            self.pieces = 1
        if ended:
            if prediction.status == P.FAILED:
                frames.append(self._event("error", json.dumps({"detail": prediction.error})))
            reason = DONE_REASONS.get(prediction.status)
            frames.append(self._event("done", json.dumps({"reason": reason} if reason else {})))
            self.done = True
        return frames


async def _read(prediction_id: str) -> Prediction | None:
    return await Prediction.objects.filter(pk=prediction_id).afirst()


async def _events(prediction_id: str) -> AsyncIterator[bytes]:
    async with events.subscribed(prediction_id) as wakeups:
        cursor = StreamCursor()
        quiet_since = time.monotonic()
        while True:
            prediction = await _read(prediction_id)
            if prediction is None:
                return
            frames = cursor.advance(prediction)
            for frame in frames:
                yield frame
            if cursor.done:
                return
            if frames:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                yield b": keepalive\n\n"
                quiet_since = time.monotonic()
            await wakeups.wait(events.POLL_SECONDS)


@csrf_exempt  # an API route (no cookies): a POST is answered 405, not refused as a forgery
async def prediction_stream(request: HttpRequest, prediction_id: str) -> HttpResponse:
    """GET /v1/predictions/{id}/stream: the prediction's server-sent events, until ``done``."""
    if request.method != "GET":
        refused = problem_response(405, f"Method {request.method} is not allowed here; GET the stream.")
        refused["Allow"] = "GET"
        return refused
    if not await Prediction.objects.filter(pk=prediction_id).aexists():
        return problem_response(404, "No such prediction.")
    return StreamingHttpResponse(
        _events(prediction_id),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def wait_until_ended(prediction_id: str, seconds: float) -> None:
    """Return once the prediction ended, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    async with events.subscribed(prediction_id) as wakeups:
        while True:
            prediction = await _read(prediction_id)
            remaining = deadline - time.monotonic()
            if prediction is None or prediction.is_terminal or remaining <= 0:
                return
            await wakeups.wait(remaining)


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
        await wait_until_ended(response.prediction_id, response.seconds)
        return await sync_to_async(response.respond)()

    return wrapper
