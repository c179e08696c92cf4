"""Predictors used by tests only."""


class Boom:
    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        raise RuntimeError(f"cannot handle {text!r}")
