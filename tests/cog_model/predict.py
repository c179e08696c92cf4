"""A small real Cog predictor, served by cog/coglet in the tests."""

import time

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        self.prefix = ""

    def predict(
        self, text: str = Input(description="Text to shout"), seconds: float = Input(default=0.0)
    ) -> str:
        print(f"shouting {text!r}")
        time.sleep(seconds)
        return self.prefix + text.upper()
