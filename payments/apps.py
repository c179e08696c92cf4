from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "payments"
    verbose_name = "Payments ledger"

    def ready(self) -> None:
        from . import options

        options.connect_signals()
