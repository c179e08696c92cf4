"""Settings of the test suite: the project's own, in debug mode (the development secret key is
accepted, no HTTPS redirect), as the quick start runs. The suite's subprocesses (workers, a
second server) inherit DJANGO_DEBUG from this process's environment."""

import os

os.environ.setdefault("DJANGO_DEBUG", "true")
# The quick start's .env (debug on, dev values) must not change what the suite tests.
os.environ["DJANGO_ENV_FILE"] = ""
# Refunds wait for finance in the suite (the tests of finance's approval), unless a test turns
# automatic approval on (its settings, its worker's environment).
os.environ.setdefault("X402_REFUND_AUTO_APPROVE_MAX", "0")

from x402site.settings import *  # noqa: E402, F403

# Users made by tests (the admin's, finance's) need no slow key stretching.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
