"""Demo predictors that run on the CPU in milliseconds."""

from __future__ import annotations


class EchoText:
    """Returns its text input: the quick start's demo model ``demo/echo-text``."""

    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        return text
