from django.apps import AppConfig


class SiteConfig(AppConfig):
    name = "x402site"
    verbose_name = "x402 site"

    def ready(self) -> None:
        from . import checks

        checks.refuse_unsafe_start()
