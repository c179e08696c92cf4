from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "payments"
    verbose_name = "Payments ledger"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        # checks registers itself; batching registers the batch settler (settlement.SETTLERS).
        from payments import checks, metrics, options, roles  # noqa: F401
        from payments.chain import batching  # noqa: F401
        from payments.signals import payment_advanced, payments_advanced

        options.connect_signals()
        payment_advanced.connect(metrics.on_payment_advanced, dispatch_uid="payments.metrics")
        payments_advanced.connect(metrics.on_payments_advanced, dispatch_uid="payments.metrics.many")
        post_migrate.connect(roles.ensure_roles, dispatch_uid="payments.roles")
