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

# Nor the quick start's dev chain (var/devchain.json, left by `make run` and by CI's quick-start
# stage before `make test`): it is another chain, whose extra lanes (anvil accounts 10-13) and
# refund wallet hold no gas money on the suite's anvil (12 accounts), so a test that named only
# X402_RELAYER_KEY settled on a random one of them and its broadcast was refused ("Insufficient
# funds for gas * price + value"). Tests name their chain (tests/conftest.py option_settings);
# the suite's subprocesses are given theirs (X402_DEVCHAIN_FILE in their environment).
if not {"X402_DEVCHAIN_FILE", "X402_PAYMENT_OPTIONS", "X402_ASSET"} & {k for k, v in os.environ.items() if v}:
    from x402site.settings import relayer_keys_from_env  # noqa: E402

    X402_PAYMENT_OPTIONS, X402_RELAYER_KEYS = [], relayer_keys_from_env()
    X402_RELAYER_KEY = X402_RELAYER_KEYS[0] if X402_RELAYER_KEYS else ""
    X402_REFUND_KEY = os.environ.get("X402_REFUND_KEY", "")
    # Channels (batch-settlement) are offered where a test turns them on with its authorizer.
    X402_CHANNEL_AUTHORIZER_KEY = os.environ.get("X402_CHANNEL_AUTHORIZER_KEY", "")
    X402_CHANNELS = bool(X402_CHANNEL_AUTHORIZER_KEY)
