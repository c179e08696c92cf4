"""Runners execute predictions. Each kind is one registered implementation of :class:`Runner`.

The built-in kinds are ``python`` (a Cog-style predictor class loaded in the Celery worker,
``runners/python.py``) and ``cog`` (a Cog model server over HTTP that reports back through a
callback, ``runners/cog.py``). Adding a kind is one module that defines a class with the
methods below and calls :func:`register` with an instance, plus its import in
:data:`BUILTIN`. Models, tasks and the lifecycle never branch on the kind: they look the runner
up with :func:`get`, and the kind choices of ``ModelVersion.runner`` come from :func:`choices`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..models import ModelVersion, Prediction

#: The modules that register the built-in runners (imported on first use of the registry).
BUILTIN = ("predictions.runners.python", "predictions.runners.cog")

#: What a runner's ``health`` answers when it can take a run now (Cog's own word).
READY = "READY"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended, as its runner reported it."""

    succeeded: bool
    output: Any = None
    error: str = ""
    #: The run's logs, when the runner reports them with its outcome (None: unchanged).
    logs: str | None = None
    predict_time: float | None = None
    #: The runner stopped the run at its time limit (a pay-per-second run is charged its seconds).
    timed_out: bool = False


class RunnerBusy(Exception):
    """The runner did not start the run and can take it later (busy, unreachable, not ready)."""


class RunnerRefused(Exception):
    """The runner will never run this input (e.g. Cog's 422): the run fails."""


class Runner(Protocol):
    """One kind of runner. Implementations are stateless singletons."""

    #: The value stored in ``ModelVersion.runner``.
    kind: str
    #: Shown to operators in the admin.
    label: str

    def validate(self, version: ModelVersion) -> None:
        """Raise ``django.core.exceptions.ValidationError`` (by field) when ``version`` is not
        configured for this runner, or the runner cannot be reached to check it."""

    def health(self, version: ModelVersion) -> str:
        """:data:`READY` when a run can start now; otherwise a word for why not (asked before
        any payment is taken)."""

    def task_options(self, prediction: Prediction) -> dict[str, Any]:
        """Extra ``apply_async`` options of the task that runs ``prediction`` (time limits)."""

    def ready(self, version: ModelVersion) -> bool:
        """Whether a run of ``version`` starts in this process the moment it is claimed, with
        nothing to load or reach: its run clock then starts with the claim (``lifecycle.claim``),
        and :meth:`start` gets it started."""

    def start(self, prediction: Prediction) -> Outcome | None:
        """Run ``prediction`` (claimed: PROCESSING). Returns its outcome when the run happened
        in the call, None when the runner reports later through :meth:`handle_callback`.
        Raises :class:`RunnerBusy` (retry later) or :class:`RunnerRefused` (the run fails).
        Once the runner has the run it says so (``lifecycle.run_started``: the run clock and
        the watchdog start there; it answers the time limit, or None: do not run it), unless
        the claim started it (``run_started_at`` is set: see :meth:`ready`)."""

    def cancel(self, prediction: Prediction) -> None:
        """Stop the run if the runner can (best effort: the prediction has already ended)."""

    def alive(self, prediction: Prediction) -> bool:
        """The runner's own word, asked by the time-limit watchdog, that the run is going on
        now; False when it cannot tell (the signs of life it records, ``lifecycle.record_alive``,
        are the other evidence)."""

    def handle_callback(self, prediction_id: str, body: dict[str, Any]) -> None:
        """A report the runner's server sent about a run (authenticated by the caller)."""


_registry: dict[str, Runner] = {}
_loaded = False


def register(runner: Runner) -> Runner:
    """Register ``runner`` under its kind; one implementation per kind."""
    existing = _registry.get(runner.kind)
    if existing is not None and type(existing) is not type(runner):
        raise ValueError(f"runner kind {runner.kind!r} is already registered by {type(existing).__name__}")
    _registry[runner.kind] = runner
    return runner


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN:
            importlib.import_module(module)
        _loaded = True


def get(kind: str) -> Runner:
    """The runner registered for ``kind`` (KeyError for an unknown kind)."""
    _load()
    return _registry[kind]


def choices() -> list[tuple[str, str]]:
    """The registered kinds, as choices of ``ModelVersion.runner``."""
    _load()
    return [(kind, runner.label) for kind, runner in sorted(_registry.items())]
