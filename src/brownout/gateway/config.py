"""The ``gateway`` section of the configuration: model groups of OpenAI-compatible endpoints.

A client asks for a *model group* by name (the ``model`` field of its request); the group's endpoints
are replicas serving the same model, each behind its own circuit breaker. When a group cannot answer,
its ``fallbacks`` are tried in order (one level: a fallback group's own fallbacks are not followed)::

    gateway:
      groups:
        chat:
          endpoints:
            - {url: "http://10.0.0.5:8000", model: "Qwen2.5-7B-Instruct"}
            - {url: "http://10.0.0.6:8000", model: "Qwen2.5-7B-Instruct"}
          fallbacks: [small]
        small:
          endpoints: [{url: "http://127.0.0.1:8081"}]

Out of the box the gateway also offers the embedded model -- the generator role's local llama.cpp
server, started by ``brownout serve`` -- as the group ``local`` (:class:`LocalGroupSection`), so an
OpenAI client works against a fresh install with no configuration. Configured groups are added to it;
a configured group named ``local`` replaces it, and ``gateway.local.enabled: false`` turns it off.
It exists only while the generator runs on the embedded model (not when ``models.roles.qwen`` lists
endpoints). With no group at all the gateway's routes still answer: ``GET /v1/models`` lists nothing
and ``POST /v1/chat/completions`` answers 404 ``model_not_found`` naming the configured groups.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from brownout.llm.breaker_settings import BreakerSettings
from brownout.policies.admission import AdmissionConfig
from brownout.policies.cache import CacheConfig

__all__ = [
    "GatewayAdmissionSection",
    "GatewayBreakerSection",
    "GatewayCacheSection",
    "GatewayEndpoint",
    "GatewayHedgeSection",
    "GatewaySection",
    "LocalGroupSection",
    "ModelGroup",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayEndpoint(_Section):
    """One replica of a model group: an OpenAI-compatible server (vLLM, llama.cpp, Ollama, a hosted API)."""

    url: str = Field(description="base URL, e.g. http://10.0.0.5:8000 (the gateway appends /v1/...)")
    model: str | None = Field(
        default=None,
        description="the 'model' sent upstream instead of the group name; null: the client's is kept",
    )
    name: str | None = Field(
        default=None, description="label in headers and metrics; default: host:port of the url"
    )
    api_key: SecretStr | None = Field(
        default=None, description="sent upstream as a bearer token (client credentials never are)"
    )
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers sent upstream")
    prefill: bool | None = Field(
        default=None,
        description="whether the endpoint continues a trailing assistant message (prefill) when a "
        "stream broken elsewhere is continued here; null: try it and remember a refusal",
    )

    @model_validator(mode="after")
    def _no_line_breaks(self) -> GatewayEndpoint:
        # Header values go into the request head as they are: a line break would split it.
        values = [*self.headers, *self.headers.values()]
        if self.api_key is not None:
            values.append(self.api_key.get_secret_value())
        if any("\r" in v or "\n" in v for v in values):
            raise ValueError("header names and values (api_key included) cannot contain line breaks")
        return self

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = value.rstrip("/")
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"{value!r} must be an http:// or https:// URL")
        # The gateway appends /v1/chat/completions; a base URL ending in /v1 would double it.
        return url.removesuffix("/v1")

    @property
    def label(self) -> str:
        """The endpoint's name in headers and metrics."""
        if self.name:
            return self.name
        return self.url.split("://", 1)[1].split("/", 1)[0]


class GatewayBreakerSection(BreakerSettings):
    """Each endpoint's circuit breaker: the keys and translation of the ``circuit_breaker`` section
    (:class:`~brownout.llm.breaker_settings.BreakerSettings`), without its per-model map.

    Its defaults differ where a gateway's replicas differ from a brief's model: a healed provider
    should get its traffic back within seconds, since a fallback group (often dearer or weaker) serves
    meanwhile. So the first open wait is short (2 s), doubles on each re-open without a close (a
    provider that stays down is probed ever more rarely, up to once a minute), and two good probes
    close the breaker.
    """

    timeout: float = Field(default=2.0, gt=0, description="seconds open before probing (first open)")
    timeout_multiplier: float = Field(
        default=2.0, ge=1, description="the open wait grows by this factor on each re-open without a close"
    )
    max_timeout: float | None = Field(default=60.0, gt=0, description="longest grown open wait, seconds")
    success_threshold: int = Field(default=2, ge=1, description="successful probes that close")


class GatewayAdmissionSection(_Section):
    """Admission control of one group: requests served at once and waiting (500 may wait by default)."""

    max_concurrent: int = Field(default=100, ge=1, description="requests of this group served at once")
    max_queue: int = Field(default=500, ge=0, description="requests waiting for a slot before 429")
    max_wait: float = Field(default=30.0, gt=0, description="longest wait for a slot, seconds")
    retry_after: float = Field(
        default=30.0, ge=1, description="Retry-After on a 429 before a service time is known"
    )

    def policy(self) -> AdmissionConfig:
        """The settings as an :class:`~brownout.policies.admission.AdmissionConfig`."""
        return AdmissionConfig(
            max_concurrent=self.max_concurrent,
            max_queue=self.max_queue,
            max_wait=self.max_wait,
            default_retry_after=self.retry_after,
            max_retry_after=max(300.0, self.retry_after),
        )


class GatewayCacheSection(_Section):
    """Exact-match response cache of one group, for deterministic requests (temperature 0, no stream)."""

    enabled: bool = Field(default=False, description="cache answers to temperature-0 requests")
    max_entries: int = Field(default=1000, ge=1, description="answers kept")
    ttl: float = Field(default=600.0, gt=0, description="seconds an answer is served")

    def policy(self) -> CacheConfig:
        """The settings as a :class:`~brownout.policies.cache.CacheConfig` (no early refresh: an LLM
        call is too dear to make before anyone asks)."""
        return CacheConfig(max_entries=self.max_entries, ttl=self.ttl, early_refresh_beta=0.0)


class GatewayHedgeSection(_Section):
    """Hedged requests of one group (off by default): a second attempt when the first is slow.

    When a request has waited ``delay`` seconds -- by default the group's observed p95 latency (of a
    whole answer, or of a stream's first token) once 20 answers are known -- without an answer, the
    same request is sent again, to the least loaded endpoint; the first answer wins and the other is
    cancelled. At most ``budget_ratio`` of the group's requests are hedged over the last 10 s, so the
    extra load on the upstreams stays bounded (5 % by default).
    """

    enabled: bool = Field(default=False, description="send a second attempt when the first is slow")
    delay: float | None = Field(
        default=None, gt=0, description="seconds before the hedge; null: the group's observed p95 latency"
    )
    budget_ratio: float = Field(
        default=0.05, gt=0, le=1, description="hedged requests allowed per request over the last 10 s"
    )


class ModelGroup(_Section):
    """A model group: replicas of one model, how they are called, and where to go when they fail."""

    endpoints: list[GatewayEndpoint] = Field(min_length=1, description="the replicas (at least one)")
    fallbacks: list[str] = Field(
        default_factory=list, description="groups tried in order when this one cannot answer"
    )
    budget: float = Field(
        default=100.0,
        gt=0,
        le=86_400,
        description="seconds a request may take in all -- waits, attempts, retries, fallbacks, a "
        "continued stream -- counted from its arrival; a request's x-brownout-budget header may set "
        "its own",
    )
    timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds without a byte from upstream before a whole (not streamed) answer's "
        "attempt fails; never more than what is left of the budget",
    )
    first_token_timeout: float = Field(
        default=15.0,
        gt=0,
        description="seconds a streamed attempt may take to send its first token before the next "
        "endpoint is tried",
    )
    stall_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a stream may go silent between tokens before it is continued elsewhere",
    )
    max_retry_after: float = Field(
        default=10.0,
        ge=0,
        description="longest upstream Retry-After (429/503) worth waiting for to retry the same "
        "endpoint, when no other replica can take the call and the budget allows; longer: fail over",
    )
    context_window: int | None = Field(
        default=None,
        ge=1,
        description="tokens of context the group's model takes; a request refused for its length "
        "goes to the first fallback with a larger one",
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds to open a connection")
    max_attempts: int = Field(
        default=2, ge=1, le=10, description="attempts within the group, on different replicas first"
    )
    retry_backoff: float = Field(
        default=0.1, ge=0, description="most seconds (full jitter) before retrying a replica already tried"
    )
    retry_budget_ratio: float = Field(
        default=0.2, ge=0, le=1, description="retries allowed per request over the last 10 s"
    )
    retry_budget_min_per_second: float = Field(
        default=10.0, ge=0, description="retries per second always allowed"
    )
    admission: GatewayAdmissionSection = Field(default_factory=GatewayAdmissionSection)
    breaker: GatewayBreakerSection = Field(default_factory=GatewayBreakerSection)
    cache: GatewayCacheSection = Field(default_factory=GatewayCacheSection)
    hedge: GatewayHedgeSection = Field(default_factory=GatewayHedgeSection)
    json_guard: bool = Field(
        default=True,
        description="validate answers to response_format json_schema requests; re-ask once if invalid",
    )

    @model_validator(mode="after")
    def _unique_endpoints(self) -> ModelGroup:
        seen: set[str] = set()
        for i, ep in enumerate(self.endpoints):
            if ep.label in seen:
                raise ValueError(
                    f"endpoints[{i}]: {ep.label!r} is listed twice; give replicas on one host a 'name'"
                )
            seen.add(ep.label)
        return self


class LocalGroupSection(_Section):
    """The embedded model (the generator role's local llama.cpp server) offered as a gateway group.

    The defaults fit a 135M-parameter model on a CPU: an answer of 512 tokens takes about 10 s at
    ~60 tokens/s, and a long one several times that, so ``timeout`` (seconds without a byte) is
    generous; the server has few slots and serves the brief pipeline too, so few requests are let
    through at once and the rest wait in a bounded queue -- and those let through wait for a slot of
    the server in the queue the pipeline's calls wait in (``brownout serve`` shares it:
    :meth:`~brownout.gateway.router.Gateway.share_slots`); there is one replica, so a failed attempt
    is not repeated on it (a crashed server is restarted meanwhile).
    """

    enabled: bool = Field(
        default=True,
        description="offer the embedded model as a group while the generator runs on it",
    )
    name: str = Field(default="local", description="the group's name: what clients send as 'model'")
    timeout: float = Field(
        default=120.0, gt=0, description="seconds without a byte from the model before a call fails"
    )
    budget: float = Field(
        default=300.0, gt=0, le=86_400, description="seconds a request may take in all, queue included"
    )
    max_attempts: int = Field(default=1, ge=1, le=10, description="attempts per request")
    max_concurrent: int = Field(default=2, ge=1, description="requests sent to the model at once")
    max_queue: int = Field(default=32, ge=0, description="requests waiting for a slot before 429")
    max_wait: float = Field(default=120.0, gt=0, description="longest wait for a slot, seconds")

    @field_validator("name")
    @classmethod
    def _usable_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} is not a usable model name")
        return value

    def group(self, url: str, model: str | None = None) -> ModelGroup:
        """The group: one endpoint at ``url`` (the local server's base URL), ``model`` sent upstream."""
        return ModelGroup(
            endpoints=[GatewayEndpoint(url=url, model=model, name=self.name)],
            timeout=self.timeout,
            # A request may wait behind others in the one-slot server: its first token comes late.
            first_token_timeout=self.timeout,
            stall_timeout=self.timeout,
            budget=self.budget,
            max_attempts=self.max_attempts,
            admission=GatewayAdmissionSection(
                max_concurrent=self.max_concurrent, max_queue=self.max_queue, max_wait=self.max_wait
            ),
        )


class GatewaySection(_Section):
    """The OpenAI-compatible gateway: ``POST /v1/chat/completions`` and ``GET /v1/models``."""

    groups: dict[str, ModelGroup] = Field(
        default_factory=dict, description="model groups by the name clients send as 'model'"
    )
    local: LocalGroupSection = Field(
        default_factory=LocalGroupSection,
        description="the embedded model as a group ('local'), added to the configured groups",
    )
    max_body_bytes: int = Field(
        default=4_194_304, ge=1024, description="largest accepted chat request, in bytes (413 beyond)"
    )
    max_keepalive: int = Field(
        default=256, ge=0, description="idle connections kept open for reuse, per endpoint"
    )
    keepalive_timeout: float = Field(
        default=30.0, gt=0, description="seconds an idle upstream connection is kept for reuse"
    )

    @property
    def offers_local(self) -> bool:
        """True when the embedded model is to be offered as a group (no configured group has its name)."""
        return self.local.enabled and self.local.name not in self.groups

    def with_local(self, url: str, model: str | None = None) -> GatewaySection:
        """This section with the embedded model's group at ``url`` added (when :attr:`offers_local`)."""
        if not self.offers_local:
            return self
        return self.model_copy(
            update={"groups": {**self.groups, self.local.name: self.local.group(url, model)}}
        )

    @model_validator(mode="after")
    def _check_groups(self) -> GatewaySection:
        # A configured group may fall back to the embedded model's group, which is added at start.
        known = set(self.groups) | ({self.local.name} if self.offers_local else set())
        for name, group in self.groups.items():
            if not _NAME.match(name):
                raise ValueError(f"groups: {name!r} is not a usable model name")
            for i, fallback in enumerate(group.fallbacks):
                if fallback == name:
                    raise ValueError(f"groups.{name}.fallbacks[{i}]: a group cannot fall back to itself")
                if fallback not in known:
                    raise ValueError(
                        f"groups.{name}.fallbacks[{i}]: unknown group {fallback!r}; known: {sorted(known)}"
                    )
            if len(set(group.fallbacks)) != len(group.fallbacks):
                raise ValueError(f"groups.{name}.fallbacks: a group is listed twice")
        return self
