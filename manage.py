#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "x402site.settings")
    if sys.argv[1:2] == ["quickstart"]:
        # The quick start is a development stack (and its children inherit this): debug mode,
        # which also allows the development secret key. Everything else defaults to production.
        os.environ.setdefault("DJANGO_DEBUG", "true")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
