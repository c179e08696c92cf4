from django.apps import AppConfig


class PredictionsConfig(AppConfig):
    name = "predictions"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (connects the payment signal)
