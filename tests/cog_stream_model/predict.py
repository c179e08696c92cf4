"""A small real Cog predictor that streams (an iterator of strings), served by cog/coglet in the
tests."""

import time
from collections.abc import Iterator

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(
        self, text: str = Input(description="Words to stream"), delay: float = Input(default=0.0)
    ) -> Iterator[str]:
        for word in text.split():
            print(f"streaming {word}", flush=True)
            time.sleep(delay)
            yield word + " "
