"""The in-process runner: a Cog-style predictor class (``setup()`` once, ``predict(**input)``)."""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Protocol


class Predictor(Protocol):
    def setup(self) -> None: ...

    def predict(self, **inputs: Any) -> Any: ...


@lru_cache(maxsize=32)
def load_predictor(dotted_path: str) -> Predictor:
    """Import, instantiate and ``setup()`` a predictor once per worker process."""
    module_name, _, class_name = dotted_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    predictor = cls()
    predictor.setup()
    return predictor


def run_python(dotted_path: str, inputs: dict[str, Any]) -> Any:
    return load_predictor(dotted_path).predict(**inputs)
