from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "payments"
    verbose_name = "Payments ledger"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from . import checks, options, roles  # noqa: F401  (checks registers itself)

        options.connect_signals()
        post_migrate.connect(roles.ensure_roles, dispatch_uid="payments.roles")
