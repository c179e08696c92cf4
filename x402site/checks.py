"""Safe by default: a production process refuses to start with a development secret.

Every process (gunicorn, Celery, manage.py) passes through ``django.setup()``, whose app
loading calls ``refuse_unsafe_start``: with DEBUG off, a weak SECRET_KEY stops it there
(gunicorn and Celery run no system checks of their own). ``manage.py check --deploy`` reports
the same problem as error ``x402site.E001`` when DEBUG is on. The quick start and the test suite
run with DEBUG on, so they keep the development key.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.core.exceptions import ImproperlyConfigured

MIN_LENGTH = 50
#: Keys and fragments of keys published somewhere: ours, Django's startproject prefix, the
#: placeholders of tutorials. A key containing one was derived from a known default.
KNOWN_DEFAULTS = ("dev-only-insecure", "django-insecure", "change-me", "changeme", "change_me", "secret-key")


def secret_key_problem(key: str) -> str | None:
    """Why ``key`` must not sign anything in production, or None."""
    if key == settings.DEV_SECRET_KEY:
        return "is the development key"
    if len(key) < MIN_LENGTH:
        return f"is shorter than {MIN_LENGTH} characters"
    if len(set(key)) < 5:
        return "has fewer than 5 distinct characters"
    lowered = key.lower()
    for known in KNOWN_DEFAULTS:
        if known in lowered:
            return f"is derived from a known default ({known!r})"
    return None


def _secret_key_errors() -> list[Error]:
    problem = secret_key_problem(settings.SECRET_KEY)
    if problem is None:
        return []
    return [
        Error(
            f"DJANGO_SECRET_KEY {problem}.",
            hint="Set DJANGO_SECRET_KEY to a long random value, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(64))'.",
            id="x402site.E001",
        )
    ]


@register(Tags.security, deploy=True)
def check_secret_key(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    return _secret_key_errors()


def refuse_unsafe_start() -> None:
    """Stop a process with DEBUG off and a weak SECRET_KEY before it serves anything."""
    if settings.DEBUG:
        return
    errors = _secret_key_errors()
    if errors:
        raise ImproperlyConfigured(
            f"{errors[0].id}: {errors[0].msg} Refusing to start with DJANGO_DEBUG off. {errors[0].hint}"
        )
