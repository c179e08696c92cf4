"""Settings of the test suite: the project's own, in debug mode (the development secret key is
accepted, no HTTPS redirect), as the quick start runs. The suite's subprocesses (workers, a
second server) inherit DJANGO_DEBUG from this process's environment."""

import os

os.environ.setdefault("DJANGO_DEBUG", "true")

from x402site.settings import *  # noqa: E402, F403
