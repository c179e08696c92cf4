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


class Chatty:
    """Prints (its logs) and returns its text."""

    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        print(f"chatting about {text!r}")
        return text


class Sleepy:
    """Sleeps ``seconds`` (to overrun a time limit), then returns its text."""

    def setup(self) -> None:
        pass

    def predict(self, text: str, seconds: float = 0) -> str:
        import time

        time.sleep(seconds)
        return text


class FlipPolicy:
    """Sets every model's settlement policy to its input while it runs: an operator editing the
    model in the middle of a paid run."""

    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        from predictions.models import Model

        Model.objects.update(settlement_policy=text)
        return text


class Talkative:
    """Prints and logs (a warning, and an info its logger lets through), and a thread it starts
    prints too (not the run's); waits for ``seconds`` so its logs are seen while it runs."""

    def setup(self) -> None:
        import logging

        self.log = logging.getLogger("tests.predictors.talkative")
        self.log.setLevel(logging.INFO)

    def predict(self, text: str, seconds: float = 0) -> str:
        import sys
        import threading
        import time

        print(f"printed {text}")
        self.log.info("info about %s", text)
        self.log.warning("warning about %s", text)
        print("to stderr", file=sys.stderr)
        other = threading.Thread(target=lambda: print("from another thread"))
        other.start()
        other.join()
        time.sleep(seconds)
        print("done")
        return text


class Countdown:
    """A generator: yields ``n`` numbers (a streaming model), printing before each, ``seconds``
    apart; raises after the second one if asked to."""

    def setup(self) -> None:
        pass

    def predict(self, n: int = 3, seconds: float = 0, fail: bool = False):  # noqa: ANN201
        import time

        for i in range(n, 0, -1):
            print(f"counting {i}")
            time.sleep(seconds)
            if fail and i == n - 2:
                raise ValueError("lost count")
            yield i


class SlowSetup:
    """Takes 2 s to load (``setup``), longer than its model's time limit; runs in 0.2 s."""

    def setup(self) -> None:
        import time

        time.sleep(2)

    def predict(self, text: str) -> str:
        import time

        time.sleep(0.2)
        return text


class Stubborn:
    """Swallows every exception, the stop at its time limit included, and runs on for
    ``seconds`` (a predictor that catches ``Exception`` around a long loop)."""

    def setup(self) -> None:
        pass

    def predict(self, text: str, seconds: float = 4) -> str:
        import contextlib
        import time

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(Exception):  # the point of this predictor
                time.sleep(0.05)
        return text



class Backend:
    """Returns ``text`` with the worker process it ran in and the PostgreSQL server process of
    that worker's connection (to tell a connection kept across tasks from one opened per task)."""

    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        import os

        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return f"{text}:{os.getpid()}:{cursor.fetchone()[0]}"
