from django.apps import AppConfig


class SiteConfig(AppConfig):
    name = "x402site"
    verbose_name = "x402 site"

    def ready(self) -> None:
        from . import checks, conf

        checks.refuse_unsafe_start()
        conf.load()  # a bad X402_* value stops the process here, named
