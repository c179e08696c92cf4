"""Settings, read from the environment (django-environ) with an embedded local default.

With nothing set, the service runs against the local PostgreSQL and Redis and the dev chain
described by ``var/devchain.json`` (written by ``manage.py devchain`` / ``make run``).
Keys come only from the environment or a file it names; never from the database.
"""

import json
import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
#: django-environ's convention: a ``.env`` beside manage.py (the quick start writes one for its
#: checkout, git-ignored) sets what the environment does not. ``DJANGO_ENV_FILE`` names another
#: file; empty reads none (the test suite: a developer's .env must not change what it tests).
ENV_FILE = os.environ.get("DJANGO_ENV_FILE", str(BASE_DIR / ".env"))
if ENV_FILE and Path(ENV_FILE).is_file():
    env.read_env(ENV_FILE)

#: Off unless asked for: the quick start (manage.py quickstart) and the tests turn it on.
DEBUG = env.bool("DJANGO_DEBUG", default=False)
#: The development key: with DEBUG off, the service refuses to start with it, with a key
#: shorter than 50 characters, or one derived from a known default (x402site.checks).
DEV_SECRET_KEY = "dev-only-insecure-key-change-me-in-production-0123456789"
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default=DEV_SECRET_KEY)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "x402site",
    "payments",
    "predictions",
]

MIDDLEWARE = [
    "x402site.logging.RequestIdMiddleware",
    "x402site.inputs.RefuseUnsafeInput",
    "django.middleware.security.SecurityMiddleware",
    "x402site.cors.X402CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

if not DEBUG:  # static files (admin, API docs) from STATIC_ROOT; runserver serves them in debug
    MIDDLEWARE.insert(MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1, "x402site.staticfiles.StaticFilesMiddleware")

ROOT_URLCONF = "x402site.urls"
WSGI_APPLICATION = "x402site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/x402")}
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
# A pool of connections per process (psycopg_pool, Django 5.1+): the ASGI server turns it on
# (x402site/asgi.py), where each request's sync code runs in a thread of its own and a
# persistent connection would be left behind with every thread. A pooled connection goes back
# to the pool at the end of the request instead of being closed (docs/deploy.md sizes it).
if env.bool("DATABASE_POOL", default=False):
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # Django refuses persistent connections with a pool
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=20),
        # How long a request waits for a free connection before it fails (seconds).
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
    }
DATABASES["default"]["TEST"] = {"NAME": env.str("DATABASE_TEST_NAME", default="test_x402")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Shared by every process: rate limits, sign-in nonces, the batcher's kicks, export progress
# (prices are read with the model's row and cached per process: payments.pricing).
CACHES = {
    "default": {
        "BACKEND": "x402site.cache.SharedRedisCache",
        "LOCATION": env.str("CACHE_URL", default="redis://127.0.0.1:6379/1"),
        "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="x402"),
    }
}

#: Redis for the progress events of predictions (pub/sub: server-sent-event streams and
#: Prefer: wait listen there; predictions.events). Channels span Redis databases.
X402_EVENTS_URL = env.str("X402_EVENTS_URL", default=CACHES["default"]["LOCATION"])

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
#: No uploads are served; a prefix all the same, or Django's test server takes every path for media.
MEDIA_URL = "media/"
#: `manage.py collectstatic` writes here; WhiteNoise serves it with DEBUG off.
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "var" / "static")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
#: The paywall page's script and style (served by us: no CDN).
STATICFILES_DIRS = [BASE_DIR / "static"]

REST_FRAMEWORK = {
    # Operators' bearer tokens (x402site.authentication); agents are not authenticated: they pay.
    "DEFAULT_AUTHENTICATION_CLASSES": ["x402site.authentication.OperatorToken"],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["x402site.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "x402site.exceptions.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # The client address (rate limits, /metrics access) is the X-Forwarded-For entry this many
    # trusted proxies from the right; 0: REMOTE_ADDR, the header ignored (its left is forgeable).
    "NUM_PROXIES": env.int("X402_TRUSTED_PROXIES", default=0),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "x402 predictions",
    "DESCRIPTION": "Machine-learning predictions sold per run to AI agents, paid in USDC with x402 "
    "(HTTP 402). Replicate-compatible shapes.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/v1",
}

# --- Celery ------------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_TASK_DEFAULT_QUEUE", default="x402")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fix-up closes every database connection before and after every task unless
# this is set: a new PostgreSQL connection (and server process) per task, the largest cost of a
# short task. Kept instead, recycled every this many tasks; x402site.celery closes one that is
# unusable or older than CONN_MAX_AGE before each task, as Django does before each request.
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1000)
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_BEAT_SCHEDULE = {
    "reconcile-payments": {
        "task": "payments.tasks.reconcile",
        "schedule": env.float("X402_RECONCILE_INTERVAL", default=5.0),
    },
    "sweep-predictions": {"task": "predictions.tasks.sweep", "schedule": 15.0},
    "remove-expired-prediction-data": {"task": "predictions.tasks.remove_expired_data", "schedule": 3600.0},
    "expire-exports": {"task": "payments.tasks.expire_exports", "schedule": 600.0},
    "sweep-channels": {
        "task": "payments.tasks.sweep_channels",
        "schedule": env.float("X402_CHANNEL_SWEEP_INTERVAL", default=30.0),
    },
}

# --- x402 payments -----------------------------------------------------------------------------
X402_DEVCHAIN_FILE = Path(env.str("X402_DEVCHAIN_FILE", default=str(BASE_DIR / "var" / "devchain.json")))


def relayer_keys_from_env() -> list[str]:
    """The relayer keys (one lane each): X402_RELAYER_KEYS (comma-separated), else
    X402_RELAYER_KEY_FILE (one key per line), else X402_RELAYER_KEY."""
    keys = env.list("X402_RELAYER_KEYS", default=[])
    key_file = env.str("X402_RELAYER_KEY_FILE", default="")
    if not keys and key_file:
        keys = [line.strip() for line in Path(key_file).read_text().splitlines() if line.strip()]
    if not keys and env.str("X402_RELAYER_KEY", default=""):
        keys = [env.str("X402_RELAYER_KEY")]
    return keys


def _payment_options() -> tuple[list[dict], list[str]]:
    """The accepted payment options and the relayer keys: from the environment, else the dev chain."""
    relayer_keys = relayer_keys_from_env()
    if env.str("X402_PAYMENT_OPTIONS", default=""):
        # Several options at once: a JSON list of objects with the keys below, or @path to one.
        raw = env.str("X402_PAYMENT_OPTIONS")
        text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
        return json.loads(text), relayer_keys
    if env.str("X402_ASSET", default=""):
        option = {
            "network": env.str("X402_NETWORK"),
            "rpc_url": env.str("X402_RPC_URL"),
            "asset": env.str("X402_ASSET"),
            "asset_name": env.str("X402_ASSET_NAME", default="USD Coin"),
            "asset_version": env.str("X402_ASSET_VERSION", default="2"),
            "pay_to": env.str("X402_PAY_TO"),
            "decimals": env.int("X402_ASSET_DECIMALS", default=6),
            # Unset: a safe depth for the network (payments.x402.networks.DEFAULT_CONFIRMATIONS).
            "confirmations": env.int("X402_CONFIRMATIONS", default=None),
            "max_timeout_seconds": env.int("X402_MAX_TIMEOUT_SECONDS", default=300),
            "batch_settler": env.str("X402_BATCH_SETTLER", default=""),
        }
        return [option], relayer_keys
    if X402_DEVCHAIN_FILE.exists():
        dev = json.loads(X402_DEVCHAIN_FILE.read_text())
        option = {k: dev[k] for k in ("network", "rpc_url", "asset", "asset_name", "asset_version", "pay_to")}
        option["batch_settler"] = dev.get("batch_settler", "")
        return [option], relayer_keys or dev.get("relayer_private_keys") or [dev.get("relayer_private_key", "")]
    return [], relayer_keys


def _from_devchain(key: str) -> str:
    """A key of the dev chain's file, when the payment options come from it (else "")."""
    if not X402_DEVCHAIN_FILE.exists() or env.str("X402_PAYMENT_OPTIONS", default="") or env.str("X402_ASSET", default=""):
        return ""
    return json.loads(X402_DEVCHAIN_FILE.read_text()).get(key, "")


X402_PAYMENT_OPTIONS, X402_RELAYER_KEYS = _payment_options()
#: The refund wallet's key (it sends refunds back to payers; keep it funded with the token and
#: gas). Never stored in the database. The dev chain's own when the options come from it.
X402_REFUND_KEY = env.str("X402_REFUND_KEY", default="") or _from_devchain("refund_private_key")


#: Refunds owed (a run that failed on our side, a prediction that ended before its run) up to
#: this amount, in the token's base units, are approved without a human, through the same
#: service finance uses; above it finance approves them. 0: every refund waits for finance.
X402_REFUND_AUTO_APPROVE_MAX = env.int("X402_REFUND_AUTO_APPROVE_MAX", default=50_000)
#: At most this many refunds an hour are approved by the policy; the rest wait for finance.
X402_REFUND_AUTO_APPROVE_PER_HOUR = env.int("X402_REFUND_AUTO_APPROVE_PER_HOUR", default=20)
#: The first lane's key (what one-relayer deployments and older settings name).
X402_RELAYER_KEY = X402_RELAYER_KEYS[0] if X402_RELAYER_KEYS else ""

#: Settle many payments per transaction where an option has a ``batch_settler`` (BatchSettler
#: contract): a batch closes at X402_BATCH_MAX payments, or when its oldest payment has waited
#: X402_BATCH_MAX_AGE seconds. Off: one transaction per payment (as for contract-wallet
#: signatures and facilitator options always).
X402_BATCH_SETTLEMENT = env.bool("X402_BATCH_SETTLEMENT", default=True)
X402_BATCH_MAX = env.int("X402_BATCH_MAX", default=100)
X402_BATCH_MAX_AGE = env.float("X402_BATCH_MAX_AGE", default=1.0)
#: Backpressure: paid requests get 503 + Retry-After while the oldest unsettled payment is older
#: than this fraction of the shortest maxTimeoutSeconds (its authorization would lapse unsettled).
X402_BACKPRESSURE_FRACTION = env.float("X402_BACKPRESSURE_FRACTION", default=0.5)
X402_BACKPRESSURE_RETRY_AFTER = env.int("X402_BACKPRESSURE_RETRY_AFTER", default=10)
#: Seconds validBefore must still leave when we accept a payment (the reference facilitator uses 6).
X402_SETTLE_MARGIN_SECONDS = env.int("X402_SETTLE_MARGIN_SECONDS", default=6)
#: Tolerance for the payer's clock.
X402_CLOCK_SKEW_SECONDS = env.int("X402_CLOCK_SKEW_SECONDS", default=30)
#: Timeout for each JSON-RPC call made while a request waits.
X402_RPC_TIMEOUT_SECONDS = env.float("X402_RPC_TIMEOUT_SECONDS", default=5.0)

#: Where to look for an authorization's use when its first block is unknown, and the widest
#: eth_getLogs span to ask for (providers cap it).
X402_LOG_LOOKBACK_BLOCKS = env.int("X402_LOG_LOOKBACK_BLOCKS", default=50_000)
X402_LOG_SPAN_BLOCKS = env.int("X402_LOG_SPAN_BLOCKS", default=2_000)

#: A settlement not mined this long after it was signed is re-signed with higher fees.
X402_STUCK_AFTER_SECONDS = env.int("X402_STUCK_AFTER_SECONDS", default=120)
#: The highest maxFeePerGas (wei) a re-signed transaction (settlement or refund) may offer: each
#: re-sign raises the fees by 12.5% or to what the chain asks, never past this. 50 gwei.
X402_MAX_FEE_PER_GAS = env.int("X402_MAX_FEE_PER_GAS", default=50 * 10**9)

#: Tests only: seconds a worker sleeps between storing a signed settlement and broadcasting it.
X402_FAULT_PAUSE_AFTER_SIGN = env.float("X402_FAULT_PAUSE_AFTER_SIGN", default=0.0)

#: Where this service is reached from outside (webhook bodies carry absolute URLs).
#: Ledger export files (background jobs) are kept here, and deleted this many hours after they are made.
X402_EXPORT_DIR = Path(env.str("X402_EXPORT_DIR", default=str(BASE_DIR / "var" / "exports")))
X402_EXPORT_TTL_HOURS = env.float("X402_EXPORT_TTL_HOURS", default=24.0)
X402_PUBLIC_URL = env.str("X402_PUBLIC_URL", default="http://127.0.0.1:8000").rstrip("/")
#: Webhook signing secret (whsec_...); derived from DJANGO_SECRET_KEY when unset.
X402_WEBHOOK_SECRET = env.str("X402_WEBHOOK_SECRET", default="")
#: Allow webhooks to loopback and private addresses (development and tests only).
X402_WEBHOOK_ALLOW_PRIVATE = env.bool("X402_WEBHOOK_ALLOW_PRIVATE", default=False)
#: Seconds a prediction may run before it is failed (also the Celery soft time limit).
X402_PREDICTION_TIME_LIMIT = env.int("X402_PREDICTION_TIME_LIMIT", default=600)
#: Per-second models: a run may take at most this multiple of the expected seconds it was priced
#: for (its time limit follows from what was paid), and never more than X402_PREDICTION_TIME_LIMIT.
X402_PER_SECOND_OVERRUN_FACTOR = env.float("X402_PER_SECOND_OVERRUN_FACTOR", default=2.0)
#: Days a finished prediction keeps its input, output and logs; then they are removed and it
#: reads ``data_removed: true`` (Replicate removes an API prediction's data after an hour).
#: 0 keeps them for ever.
X402_DATA_RETENTION_DAYS = env.float("X402_DATA_RETENTION_DAYS", default=7.0)
#: A run with no result this long past its own time limit is lost: the sweep fails it (and cancels
#: it on its runner), never reruns it.
X402_PREDICTION_LOST_GRACE = env.int("X402_PREDICTION_LOST_GRACE", default=60)
#: A claimed run's runner must confirm it has the run (Cog accepted the PUT, the python runner
#: loaded its predictor and entered ``predict``) within this many seconds, busy retries and
#: model loading included; otherwise the run ended on our side (failed: refunded, released, or
#: charged only its failure charge). The run clock and its time limit start at that confirmation.
X402_RUN_START_TIMEOUT = env.int("X402_RUN_START_TIMEOUT", default=120)
#: Seconds to wait for a Cog server's answer to a request (a PUT whose answer is lost may still
#: have started the run: it is not sent again; the callback brings the result).
X402_COG_TIMEOUT = env.float("X402_COG_TIMEOUT", default=10.0)
#: How long a paid MCP tool call waits for its prediction's output before answering with where
#: it stands (the agent then reads it with the get_prediction tool).
X402_MCP_WAIT_SECONDS = env.int("X402_MCP_WAIT_SECONDS", default=60)

#: ``batch-settlement`` channels (payments.channels). Our receiverAuthorizer: signs claim batches
#: and refunds, sends nothing (no gas); never a relayer key. Unset: channels cannot be claimed.
X402_CHANNEL_AUTHORIZER_KEY = env.str("X402_CHANNEL_AUTHORIZER_KEY", default="") or _from_devchain(
    "channel_authorizer_private_key"
)
#: Offer ``batch-settlement`` in 402s (on models that offer it, ``Model.offers_channels``).
#: Unset: offered whenever an authorizer key is set.
X402_CHANNELS = env.bool("X402_CHANNELS", default=bool(X402_CHANNEL_AUTHORIZER_KEY))
#: The channel's ``withdrawDelay`` we require (seconds; the spec allows 15 min to 30 days): how
#: long a payer's timed withdrawal waits, i.e. our time to claim what we charged.
X402_CHANNEL_WITHDRAW_DELAY = env.int("X402_CHANNEL_WITHDRAW_DELAY", default=86_400)
#: ``extra.minDeposit`` of the offer: the smallest first deposit we suggest (base units; 1 USDC).
X402_CHANNEL_MIN_DEPOSIT = env.int("X402_CHANNEL_MIN_DEPOSIT", default=1_000_000)
#: How long the gate waits for a relayed deposit (or a cooperative refund) to be mined.
X402_CHANNEL_TX_WAIT = env.float("X402_CHANNEL_TX_WAIT", default=30.0)
#: Claim a channel once its unclaimed charges reach this (token base units; 1 USDC)...
X402_CHANNEL_CLAIM_UNCLAIMED_MAX = env.int("X402_CHANNEL_CLAIM_UNCLAIMED_MAX", default=1_000_000)
#: ...every channel with unclaimed charges once all of them together reach this (10 USDC)...
X402_CHANNEL_CLAIM_TOTAL_MAX = env.int("X402_CHANNEL_CLAIM_TOTAL_MAX", default=10_000_000)
#: ...and a channel whose oldest unclaimed charge is this old (seconds). A timed withdrawal
#: started on a channel has it claimed at once.
X402_CHANNEL_CLAIM_MAX_AGE = env.int("X402_CHANNEL_CLAIM_MAX_AGE", default=6 * 3600)
#: At most this many channels per claim transaction.
X402_CHANNEL_CLAIM_BATCH_MAX = env.int("X402_CHANNEL_CLAIM_BATCH_MAX", default=50)

#: Readiness fails when the relayer holds less gas money than this (wei; default 0.001 ETH).
X402_RELAYER_MIN_BALANCE_WEI = env.int("X402_RELAYER_MIN_BALANCE_WEI", default=10**15)

#: Per-client limits, "count/seconds" ("" turns one off): 402 challenges, refused payments,
#: and webhook URL checks (each resolves a host name).
X402_RATE_LIMITS = {
    "challenge": env.str("X402_RATE_CHALLENGES", default="600/60"),
    "failed": env.str("X402_RATE_FAILED_PAYMENTS", default="60/60"),
    "webhook": env.str("X402_RATE_WEBHOOK_CHECKS", default="600/60"),
}

#: Bearer tokens that run predictions without payment (operators, integrations).
X402_OPERATOR_TOKENS = env.list("X402_OPERATOR_TOKENS", default=[])

#: Bearer tokens that may read /metrics and the details of /readyz; with none, only clients on
#: this host (loopback, counted through X402_TRUSTED_PROXIES) may.
X402_OPS_TOKENS = env.list("X402_OPS_TOKENS", default=[])

#: Bearer tokens allowed to use our facilitator API (/facilitator/...); empty turns it off.
X402_FACILITATOR_TOKENS = env.list("X402_FACILITATOR_TOKENS", default=[])
#: Timeout of each call to a remote facilitator (verify, settle), retried twice.
X402_FACILITATOR_TIMEOUT_SECONDS = env.float("X402_FACILITATOR_TIMEOUT_SECONDS", default=10.0)
#: Seconds /facilitator/settle waits for the receipt before answering settlement_pending.
X402_FACILITATOR_SETTLE_WAIT = env.float("X402_FACILITATOR_SETTLE_WAIT", default=20.0)

LOG_LEVEL = env.str("X402_LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "x402site.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if env.bool("X402_LOG_JSON", default=not DEBUG) else "plain",
        }
    },
    "loggers": {
        "payments": {"handlers": ["console"], "level": LOG_LEVEL},
        "predictions": {"handlers": ["console"], "level": LOG_LEVEL},
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
    },
}

# --- production hardening (all on when DJANGO_DEBUG is false; `manage.py check --deploy` clean) ---
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = not DEBUG
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_PRELOAD = not DEBUG
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# --- queues: settlement on its own queue (a slow prediction never delays it), GPU tiers on GPU workers
#: The settlement queue (payments.tasks.*); empty: the default queue's name + "-settlement".
X402_SETTLEMENT_QUEUE = env.str("X402_SETTLEMENT_QUEUE", default="")
#: Hardware tier slug prefix -> queue, e.g. "gpu=gpu"; predictions of other tiers use the default queue.
X402_TIER_QUEUES = env.dict("X402_TIER_QUEUES", default={})
CELERY_TASK_ROUTES = ("x402site.celery.route_task",)
