"""Predictors used by tests only."""


class Boom:
    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        raise RuntimeError(f"cannot handle {text!r}")


class Slow:
    """Sleeps, and records each run in the file named by SLOW_RUNS_FILE (to count runs)."""

    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        import os
        import time

        with open(os.environ["SLOW_RUNS_FILE"], "a") as f:
            f.write(text + "\n")
        time.sleep(30)
        return text


class Units:
    """Returns the ``n`` it was given, with its own default of 10 (not the schema's)."""

    def setup(self) -> None:
        pass

    def predict(self, text: str, n: int = 10) -> int:
        return n
