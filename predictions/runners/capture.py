"""What one run prints and logs, captured for that run alone.

``sys.stdout``, ``sys.stderr`` and the root logger are shared by every thread of a worker, so
``contextlib.redirect_stdout`` would also take other threads' output (and lose it for them). A
run instead opens a :class:`Capture` in a context variable; a dispatcher installed once in
place of ``sys.stdout``/``sys.stderr``, and a handler on the root logger, send what is written
from that context to the run's buffer and everything else where it went before. A thread the
predictor starts runs in a fresh context: its output is not the run's (as with ``print`` in a
thread under Cog, whose order would be undefined anyway).

Logging records are captured at the level their logger lets through (the root logger's
WARNING unless the predictor sets its logger's level): a record the logger drops never
reaches a handler.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_current: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("x402_run_capture", default=None)
_install_lock = threading.Lock()
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class Capture:
    """The text one run wrote so far (thread-safe: a reporter thread reads it while it grows)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._lock = threading.Lock()
        self.changed = threading.Event()

    def write(self, text: str) -> None:
        if text:
            with self._lock:
                self._parts.append(text)
            self.changed.set()

    def text(self) -> str:
        with self._lock:
            joined = "".join(self._parts)
            self._parts = [joined]
            return joined


class _Dispatcher:
    """Stands in for a standard stream: writes from a capturing context go to its capture."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        capture = _current.get()
        if capture is None:
            return self._stream.write(text)
        capture.write(text)
        return len(text)

    def flush(self) -> None:
        if _current.get() is None:
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty...: the real stream's
        return getattr(self._stream, name)


def _handled_elsewhere(record: logging.LogRecord, handler: logging.Handler) -> bool:
    """Some handler besides ``handler`` takes the record on its way up (logging's own walk)."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not handler for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        capture = _current.get()
        if capture is None:
            # Being on the root logger, this handler hides logging's last resort (stderr for a
            # warning nobody handles): stand in for it outside runs.
            last = logging.lastResort
            if last is not None and record.levelno >= last.level and not _handled_elsewhere(record, self):
                last.handle(record)
            return
        try:
            capture.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise into the predictor
            self.handleError(record)


_handler = _Handler()
_handler.setFormatter(logging.Formatter(LOG_FORMAT))


def _install() -> None:
    """Put the dispatchers and the handler in place (again if something replaced them)."""
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _Dispatcher):
                setattr(sys, name, _Dispatcher(stream))
        root = logging.getLogger()
        if _handler not in root.handlers:
            root.addHandler(_handler)


@contextmanager
def capturing(capture: Capture) -> Iterator[Capture]:
    """Within the block, this context's prints and log records go to ``capture``."""
    _install()
    token = _current.set(capture)
    try:
        yield capture
    finally:
        _current.reset(token)
