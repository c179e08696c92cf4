"""The service's own settings, typed and grouped: ``from x402site.conf import x402``, then
``x402.refunds.auto_approve_max``.

The Django settings stay flat ``X402_*`` names, given their defaults (from the environment) in
x402site/settings.py: the environment, docs/deploy.md and the tests' overrides all name them so.
Code reads them here instead: this module reads every ``X402_*`` setting once into frozen
dataclasses, one per concern, refusing a value of the wrong type with ImproperlyConfigured (at
start, x402site.apps, and after an override), and keeps the result until an ``X402_*`` setting
changes (``setting_changed``: ``override_settings`` and pytest-django's ``settings`` fixture),
so a read is an attribute access. A direct assignment to ``django.conf.settings`` sends no
signal: use ``override_settings``.

To add a setting: define ``X402_NAME`` in x402site/settings.py (its default, from the
environment), a field in the namespace it belongs to below, and its read in :func:`build`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

PREFIX = "X402_"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` events per client in each window of ``seconds``."""

    count: int
    seconds: int


@dataclass(frozen=True, slots=True)
class ChainSettings:
    """The chains we are paid on, and our transactions there."""

    #: X402_PAYMENT_OPTIONS: the accepted options as configured (payments.options types them).
    payment_options: tuple[Mapping[str, Any], ...]
    #: X402_DEVCHAIN_FILE: the dev chain's description (manage.py devchain / quickstart).
    devchain_file: Path
    #: X402_RPC_TIMEOUT_SECONDS: each JSON-RPC call made while a request waits.
    rpc_timeout_seconds: float
    #: X402_LOG_LOOKBACK_BLOCKS, X402_LOG_SPAN_BLOCKS: where to look for an authorization's use
    #: when its first block is unknown, and the widest eth_getLogs span to ask for.
    log_lookback_blocks: int
    log_span_blocks: int
    #: X402_STUCK_AFTER_SECONDS: a transaction (settlement, refund) unmined this long is re-signed.
    stuck_after_seconds: int
    #: X402_MAX_FEE_PER_GAS: the highest maxFeePerGas (wei) a re-signed transaction may offer.
    max_fee_per_gas: int


@dataclass(frozen=True, slots=True)
class RelayerSettings:
    """The relayer lanes (the wallets that send settlements)."""

    #: X402_RELAYER_KEYS: one key per lane.
    keys: tuple[str, ...] = field(repr=False)
    #: X402_RELAYER_KEY: the first lane's key (what one-relayer deployments and overrides name).
    key: str = field(repr=False)
    #: X402_RELAYER_MIN_BALANCE_WEI: readiness fails below this much gas money.
    min_balance_wei: int


@dataclass(frozen=True, slots=True)
class VerificationSettings:
    """What an authorization (a payment, a sign-in-with-x proof) must leave us."""

    #: X402_SETTLE_MARGIN_SECONDS: seconds validBefore must still leave when we accept a payment.
    settle_margin_seconds: int
    #: X402_CLOCK_SKEW_SECONDS: tolerance for the payer's clock.
    clock_skew_seconds: int


@dataclass(frozen=True, slots=True)
class SettlementSettings:
    """How payments are settled, and how paid requests wait when settlement falls behind."""

    #: X402_BATCH_SETTLEMENT: many payments per transaction where an option has a batch_settler.
    batch: bool
    #: X402_BATCH_MAX, X402_BATCH_MAX_AGE: a batch closes at this many payments, or when its
    #: oldest has waited this long.
    batch_max: int
    batch_max_age_seconds: float
    #: X402_BACKPRESSURE_FRACTION, X402_BACKPRESSURE_RETRY_AFTER: paid requests get 503 with
    #: this Retry-After while the oldest unsettled payment is older than this fraction of the
    #: shortest maxTimeoutSeconds.
    backpressure_fraction: float
    backpressure_retry_after_seconds: int
    #: X402_SETTLEMENT_QUEUE: the settlement tasks' queue ("": the default queue + "-settlement").
    queue: str
    #: X402_FAULT_PAUSE_AFTER_SIGN: tests only, a pause between signing and broadcasting.
    fault_pause_after_sign_seconds: float


@dataclass(frozen=True, slots=True)
class RefundSettings:
    """The refund wallet and the refund policy."""

    #: X402_REFUND_KEY: the refund wallet's key ("": refunds cannot be sent).
    key: str = field(repr=False)
    #: X402_REFUND_AUTO_APPROVE_MAX: refunds up to this (base units) are approved without a human.
    auto_approve_max: int
    #: X402_REFUND_AUTO_APPROVE_PER_HOUR: at most this many such approvals an hour.
    auto_approve_per_hour: int


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """``batch-settlement`` channels (payments.channels): our authorizer, and when claims are due."""

    #: X402_CHANNEL_AUTHORIZER_KEY: our receiverAuthorizer ("": channels cannot be claimed).
    authorizer_key: str = field(repr=False)
    #: X402_CHANNEL_CLAIM_UNCLAIMED_MAX, X402_CHANNEL_CLAIM_TOTAL_MAX, X402_CHANNEL_CLAIM_MAX_AGE:
    #: a channel is claimed once its unclaimed charges reach the first (base units), every one
    #: once all together reach the second, and one whose oldest unclaimed charge is this old.
    claim_unclaimed_max: int
    claim_total_max: int
    claim_max_age_seconds: int
    #: X402_CHANNEL_CLAIM_BATCH_MAX: at most this many channels per claim transaction.
    claim_batch_max: int
    #: X402_CHANNELS: 402s offer ``batch-settlement`` (on models that offer it).
    enabled: bool = False
    #: X402_CHANNEL_WITHDRAW_DELAY: the channels' withdrawDelay we require (seconds).
    withdraw_delay_seconds: int = 86_400
    #: X402_CHANNEL_MIN_DEPOSIT: the offer's ``minDeposit`` (base units).
    min_deposit: int = 1_000_000
    #: X402_CHANNEL_TX_WAIT: how long the gate waits for a relayed deposit or refund to be mined.
    tx_wait_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How predictions run, and how long their data is kept."""

    #: X402_PREDICTION_TIME_LIMIT: the longest a prediction may run.
    time_limit_seconds: int
    #: X402_PER_SECOND_OVERRUN_FACTOR: a per-second run may take this multiple of what it paid for.
    per_second_overrun_factor: float
    #: X402_RUN_START_TIMEOUT: a claimed run's runner must confirm it within this.
    start_timeout_seconds: int
    #: X402_PREDICTION_LOST_GRACE: a run with no result this long past its time limit is lost.
    lost_grace_seconds: int
    #: X402_COG_TIMEOUT: the wait for a Cog server's answer.
    cog_timeout_seconds: float
    #: X402_DATA_RETENTION_DAYS: a finished prediction's data is removed after this (0: never).
    data_retention_days: float
    #: X402_TIER_QUEUES: hardware tier slug prefix -> queue, in order.
    tier_queues: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RateLimits:
    """X402_RATE_LIMITS: per-client limits by kind (None: no limit)."""

    challenge: RateLimit | None
    failed: RateLimit | None
    webhook: RateLimit | None


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """This deployment as its clients reach it."""

    #: X402_PUBLIC_URL: where this service is reached from outside (absolute URLs we hand out).
    public_url: str
    #: X402_EVENTS_URL: Redis for predictions' progress events.
    events_url: str
    rate_limits: RateLimits
    #: X402_MCP_WAIT_SECONDS: how long a paid MCP tool call waits for its output.
    mcp_wait_seconds: int


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    #: X402_WEBHOOK_SECRET: the signing secret ("": derived from SECRET_KEY).
    secret: str = field(repr=False)
    #: X402_WEBHOOK_ALLOW_PRIVATE: webhooks to loopback and private addresses (development).
    allow_private: bool


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """Bearer tokens by role (x402site.authentication)."""

    #: X402_OPERATOR_TOKENS: run predictions without payment, list everything.
    operator: tuple[str, ...] = field(repr=False)
    #: X402_FACILITATOR_TOKENS: use our facilitator API (none: it is off).
    facilitator: tuple[str, ...] = field(repr=False)
    #: X402_OPS_TOKENS: read /metrics and /readyz's details (none: this host only).
    ops: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class FacilitatorSettings:
    #: X402_FACILITATOR_TIMEOUT_SECONDS: each call to a remote facilitator.
    timeout_seconds: float
    #: X402_FACILITATOR_SETTLE_WAIT: how long /facilitator/settle waits for the receipt.
    settle_wait_seconds: float


@dataclass(frozen=True, slots=True)
class FinanceSettings:
    #: X402_EXPORT_DIR, X402_EXPORT_TTL_HOURS: where ledger exports are kept, and for how long.
    export_dir: Path
    export_ttl_hours: float


@dataclass(frozen=True, slots=True)
class X402Settings:
    chain: ChainSettings
    relayer: RelayerSettings
    verification: VerificationSettings
    settlement: SettlementSettings
    refunds: RefundSettings
    channels: ChannelSettings
    runs: RunSettings
    http: HttpSettings
    webhooks: WebhookSettings
    tokens: TokenSettings
    facilitator: FacilitatorSettings
    finance: FinanceSettings


# --- reading and checking one setting ----------------------------------------------------------


def _refuse(name: str, expected: str, value: object) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"{name} must be {expected}, not {value!r}")


def _int(name: str, minimum: int | None = 0) -> int:
    value = getattr(settings, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse(name, "an integer", value)
    if minimum is not None and value < minimum:
        raise _refuse(name, f"at least {minimum}", value)
    return value


def _float(name: str, minimum: float | None = 0.0) -> float:
    value = getattr(settings, name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _refuse(name, "a number", value)
    if minimum is not None and value < minimum:
        raise _refuse(name, f"at least {minimum}", value)
    return float(value)


def _bool(name: str) -> bool:
    value = getattr(settings, name)
    if not isinstance(value, bool):
        raise _refuse(name, "true or false", value)
    return value


def _str(name: str) -> str:
    value = getattr(settings, name)
    if not isinstance(value, str):
        raise _refuse(name, "a string", value)
    return value


def _strs(name: str) -> tuple[str, ...]:
    value = getattr(settings, name)
    if isinstance(value, str) or not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _refuse(name, "a list of strings", value)
    return tuple(value)


def _path(name: str) -> Path:
    value = getattr(settings, name)
    if not isinstance(value, str | Path):
        raise _refuse(name, "a path", value)
    return Path(value)


def _str_mapping(name: str) -> Mapping[str, str]:
    value = getattr(settings, name)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _refuse(name, "a mapping of strings to strings", value)
    return MappingProxyType(dict(value))


def _payment_options(name: str) -> tuple[Mapping[str, Any], ...]:
    value = getattr(settings, name)
    if not isinstance(value, list | tuple) or not all(isinstance(o, Mapping) for o in value):
        raise _refuse(name, "a list of payment options (objects)", value)
    return tuple(MappingProxyType(dict(o)) for o in value)


def _rate_limit(name: str, kind: str, limit: object) -> RateLimit | None:
    """``"count/seconds"`` (seconds default to 60); ``""`` is no limit."""
    if not isinstance(limit, str):
        raise _refuse(f"{name}[{kind!r}]", '"count/seconds" or ""', limit)
    if not limit:
        return None
    count, _, seconds = limit.partition("/")
    try:
        rule = RateLimit(int(count), int(seconds or 60))
    except ValueError:
        raise _refuse(f"{name}[{kind!r}]", '"count/seconds" or ""', limit) from None
    if rule.count < 0 or rule.seconds < 1:
        raise _refuse(f"{name}[{kind!r}]", "a count of at least 0 per at least 1 second", limit)
    return rule


def _rate_limits(name: str) -> RateLimits:
    value = getattr(settings, name)
    kinds = [f.name for f in fields(RateLimits)]
    if not isinstance(value, Mapping) or set(value) - set(kinds):
        raise _refuse(name, f"a mapping with keys among {kinds}", value)
    return RateLimits(**{kind: _rate_limit(name, kind, value.get(kind, "")) for kind in kinds})


def build() -> X402Settings:
    """Every ``X402_*`` setting, read from django.conf.settings and checked."""
    return X402Settings(
        chain=ChainSettings(
            payment_options=_payment_options("X402_PAYMENT_OPTIONS"),
            devchain_file=_path("X402_DEVCHAIN_FILE"),
            rpc_timeout_seconds=_float("X402_RPC_TIMEOUT_SECONDS"),
            log_lookback_blocks=_int("X402_LOG_LOOKBACK_BLOCKS"),
            log_span_blocks=_int("X402_LOG_SPAN_BLOCKS"),
            stuck_after_seconds=_int("X402_STUCK_AFTER_SECONDS"),
            max_fee_per_gas=_int("X402_MAX_FEE_PER_GAS"),
        ),
        relayer=RelayerSettings(
            keys=_strs("X402_RELAYER_KEYS"),
            key=_str("X402_RELAYER_KEY"),
            min_balance_wei=_int("X402_RELAYER_MIN_BALANCE_WEI"),
        ),
        verification=VerificationSettings(
            settle_margin_seconds=_int("X402_SETTLE_MARGIN_SECONDS"),
            clock_skew_seconds=_int("X402_CLOCK_SKEW_SECONDS"),
        ),
        settlement=SettlementSettings(
            batch=_bool("X402_BATCH_SETTLEMENT"),
            batch_max=_int("X402_BATCH_MAX", minimum=1),
            batch_max_age_seconds=_float("X402_BATCH_MAX_AGE"),
            backpressure_fraction=_float("X402_BACKPRESSURE_FRACTION", minimum=None),  # <= 0: off
            backpressure_retry_after_seconds=_int("X402_BACKPRESSURE_RETRY_AFTER"),
            queue=_str("X402_SETTLEMENT_QUEUE"),
            fault_pause_after_sign_seconds=_float("X402_FAULT_PAUSE_AFTER_SIGN"),
        ),
        refunds=RefundSettings(
            key=_str("X402_REFUND_KEY"),
            auto_approve_max=_int("X402_REFUND_AUTO_APPROVE_MAX"),
            auto_approve_per_hour=_int("X402_REFUND_AUTO_APPROVE_PER_HOUR"),
        ),
        channels=ChannelSettings(
            authorizer_key=_str("X402_CHANNEL_AUTHORIZER_KEY"),
            claim_unclaimed_max=_int("X402_CHANNEL_CLAIM_UNCLAIMED_MAX"),
            claim_total_max=_int("X402_CHANNEL_CLAIM_TOTAL_MAX"),
            claim_max_age_seconds=_int("X402_CHANNEL_CLAIM_MAX_AGE"),
            claim_batch_max=_int("X402_CHANNEL_CLAIM_BATCH_MAX", minimum=1),
            enabled=_bool("X402_CHANNELS"),
            withdraw_delay_seconds=_int("X402_CHANNEL_WITHDRAW_DELAY", minimum=15 * 60),
            min_deposit=_int("X402_CHANNEL_MIN_DEPOSIT", minimum=1),
            tx_wait_seconds=_float("X402_CHANNEL_TX_WAIT"),
        ),
        runs=RunSettings(
            time_limit_seconds=_int("X402_PREDICTION_TIME_LIMIT", minimum=1),
            per_second_overrun_factor=_float("X402_PER_SECOND_OVERRUN_FACTOR"),
            start_timeout_seconds=_int("X402_RUN_START_TIMEOUT"),
            lost_grace_seconds=_int("X402_PREDICTION_LOST_GRACE"),
            cog_timeout_seconds=_float("X402_COG_TIMEOUT"),
            data_retention_days=_float("X402_DATA_RETENTION_DAYS"),
            tier_queues=_str_mapping("X402_TIER_QUEUES"),
        ),
        http=HttpSettings(
            public_url=_str("X402_PUBLIC_URL"),
            events_url=_str("X402_EVENTS_URL"),
            rate_limits=_rate_limits("X402_RATE_LIMITS"),
            mcp_wait_seconds=_int("X402_MCP_WAIT_SECONDS"),
        ),
        webhooks=WebhookSettings(
            secret=_str("X402_WEBHOOK_SECRET"),
            allow_private=_bool("X402_WEBHOOK_ALLOW_PRIVATE"),
        ),
        tokens=TokenSettings(
            operator=_strs("X402_OPERATOR_TOKENS"),
            facilitator=_strs("X402_FACILITATOR_TOKENS"),
            ops=_strs("X402_OPS_TOKENS"),
        ),
        facilitator=FacilitatorSettings(
            timeout_seconds=_float("X402_FACILITATOR_TIMEOUT_SECONDS"),
            settle_wait_seconds=_float("X402_FACILITATOR_SETTLE_WAIT"),
        ),
        finance=FinanceSettings(
            export_dir=_path("X402_EXPORT_DIR"),
            export_ttl_hours=_float("X402_EXPORT_TTL_HOURS"),
        ),
    )


NAMESPACES = frozenset(f.name for f in fields(X402Settings))


class _Current:
    """The settings built last: the first read builds them all and keeps each namespace as an
    attribute of this object (later reads are plain attribute reads); ``reload`` drops them."""

    def __getattr__(self, name: str) -> Any:
        if name not in NAMESPACES:
            raise AttributeError(f"no X402 settings namespace {name!r}")
        self.load()
        return self.__dict__[name]

    def load(self) -> None:
        """Read and check the settings now (ImproperlyConfigured for a bad value)."""
        built = build()
        self.__dict__.update({name: getattr(built, name) for name in NAMESPACES})

    def reload(self) -> None:
        self.__dict__.clear()


_current = _Current()
#: The settings, typed as what they read as (an :class:`X402Settings`).
x402 = cast(X402Settings, _current)
#: At start (x402site.apps): a process with a bad value refuses to start.
load = _current.load


def _on_setting_changed(setting: str, **kwargs: object) -> None:
    if setting.startswith(PREFIX):
        _current.reload()


setting_changed.connect(_on_setting_changed, dispatch_uid="x402site.conf")
