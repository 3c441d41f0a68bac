"""The model client: one model *role* served by one or more OpenAI-compatible endpoints.

:class:`ModelClient` sends chat completions over HTTP (httpx) and keeps a dead or sick endpoint from
costing its callers time:

* each endpoint has its own :class:`~brownout.policies.breaker.CircuitBreaker`, configured by
  ``BreakerGroupConfig.for_name(role)`` (the server passes its ``circuit_breaker`` section, whose
  default opens the generator role, ``qwen``, earlier: at a failure rate of 0.4);
* each endpoint has its own :class:`~brownout.policies.limiter.AdaptiveLimiter`: at most its
  ``limit`` calls are in flight to it (adapted to its latency, never above the endpoint's
  ``max_concurrency`` -- for a local model server its slots, so nothing queues inside the server);
  further calls wait in the limiter's first-in, first-out queue. Clients of several roles on one
  server (the embedded models' shared local server) share its limiter and its signs of life through
  a :class:`SharedEndpoint`, each role's calls waiting in the queue of the client's ``priority``
  (the generator's first). That wait is *ours*, not the model's:
  the attempt's timeout and the breaker's timing start when the request is sent, and a call whose
  wait runs out leaves with :class:`~brownout.errors.Overloaded` (or
  :class:`~brownout.errors.DeadlineExceeded` when the caller's deadline passed) without anything
  counted against the endpoint -- a busy model is not a failing one;
* a call goes to an endpoint whose breaker permits it, chosen by
  :func:`brownout.policies.balance.pick` -- one with a free slot before one without (then the shorter
  expected wait), then the least expected latency ``(in flight + 1) * recent latency`` (an
  exponentially weighted moving average), then the fewest calls in flight;
* a failed attempt is retried (a :class:`~brownout.policies.retry.Retry`, 2 attempts by default) on
  another available endpoint when there is one;
* each attempt is bounded by the client's timeout, or by the caller's deadline
  (:func:`brownout.policies.deadline.remaining`) when that is sooner. It asks for a stream
  (``stream: true``, the token counts in its last event), so that an attempt given up on -- at its
  timeout, or cancelled by the caller's deadline -- closes the stream, which ends the generation in
  the server: its slot is free at once, not busy writing for nobody (a server asked for a whole answer
  writes it to the end). An endpoint with ``stream: false`` is asked for the whole answer; a server
  that answers whole although asked to stream is read whole. When the caller's deadline was cut
  short by the wait in our queue, a timeout is the caller's (:class:`DeadlineExceeded`), not the
  endpoint's: it is not counted.

What counts against an endpoint (breaker failure, retried): connection errors, timeouts of an
endpoint that shows no sign of life (below), HTTP 5xx, 408, 425 and 429, and 2xx bodies that are not
an OpenAI chat completion. What does not (raised at once, never retried, not recorded): other 4xx
statuses such as 400, 401, 403, 404, 413 and 422 -- the request was wrong, not the endpoint. A
``Retry-After`` header rides on the :class:`~brownout.errors.ModelError` as ``retry_after``, which
the retry honours.

Overload is not failure: slow calls
-----------------------------------

A call that was *sent* and got no answer within its attempt timeout is either a sign that the model
is down (hung, wedged, lost) or that it is saturated and answers slowly under load. The client tells
them apart by whether the endpoint is demonstrably alive:

    A timed-out call is **slow under load, not failed**, when both hold:

    * *under load*: it was not alone -- when it was sent or when it timed out, another call was in
      flight to the endpoint or waiting for one of its slots. A lone call on an idle endpoint that
      gets no answer has no load to blame: that is a failure;
    * *alive*: the endpoint completed a call (a well-formed completion) no longer than
      ``alive_window`` seconds before the timeout (default: three attempt timeouts). That covers "it
      completed other calls while this one waited" (a completion after this call was sent is within
      one timeout of it) and "it answered recently". A passing health probe does not count here: a
      model that answers a four-token probe but no real call within its timeout is too slow for its
      callers, not busy (the probe still keeps the role available and recovery away).

    Otherwise -- an idle endpoint, or nothing completed for ``alive_window`` seconds -- the timeout is
    a failure.

A slow call is recorded by no breaker (neither success nor failure, as resilience4j keeps slow calls
apart from failures; the breaker's own slow-call rate stays off for model endpoints, since a saturated
model is slow by definition), it is not retried (another attempt would only add load to a busy
model), and the caller gets :class:`~brownout.errors.Overloaded` with reason ``"slow"``,
``retry_after`` the limiter's estimate -- or, when it asked with ``salvage``, what the stream had
written. For the endpoint's concurrency limit it is a drop (the limit shrinks) when nothing had been
written; a long answer given up while it was coming is judged like any other call, by its time per
token written (:mod:`brownout.policies.limiter`), since how fast its tokens came says whether the
server is overloaded and its length does not.

A caller may also say when it needs its answer (``finish_by``, its latency target): the attempt is
cut there when that comes before its timeout. A cut more than :data:`EARLY_CUT` seconds early is the
caller's doing -- its time went on waiting before the call -- and is neither counted nor a drop, busy
endpoint or idle one; what was written goes to ``salvage`` as for a slow call, else ``Overloaded``
("slow"). A cut about as long as the timeout is judged as the timeout would be, so a hung model is
still found by a call that did not wait.

Connection errors, 5xx answers and malformed bodies are failures whatever the load: a model that
answers nothing at all still opens its breaker. The per-endpoint counters ``completed`` (well-formed
completions) and ``slow`` are in :meth:`ModelClient.endpoints_status`; ``completed`` is what the
recovery's busy check reads as "making progress".

Errors: :class:`~brownout.errors.ModelUnavailable` when no endpoint can take the call (its
``retry_after`` is the soonest any breaker lets a call through), :class:`~brownout.errors.ModelError`
when the attempts failed (the last failure, as the retry re-raises it),
:class:`~brownout.errors.Overloaded` when no slot came free in time (reason ``"queue_timeout"`` or
``"queue_full"``; ``"deadline"`` at once when the expected wait already exceeds the caller's
``queue_timeout``) or a sent call was slow under load (reason ``"slow"``; ``retry_after`` estimated
from the measured service time), and :class:`~brownout.errors.DeadlineExceeded` when the caller's
deadline cut the call short.

Health probes (:meth:`ModelClient.probe`) measure the model, not the queue: a probe takes a free slot
when there is one; when every slot is busy and the endpoint answered a call successfully within
``busy_window``, it is reported healthy and ``busy`` without sending anything; otherwise the probe
waits for a slot with its own budget and reports that wait (``queued``) apart from the inference time.

Whether the *text* is what was asked for (valid JSON, schema) is the JSON guard's business, not the
client's: a completion whose content is prose is a success here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Final

import httpx
from opentelemetry.util.types import AttributeValue
from pydantic import BaseModel, Field, ValidationError

from brownout import telemetry
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import (
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    ModelError,
    ModelUnavailable,
    Overloaded,
)
from brownout.events import DEFAULT_BUS, EventBus
from brownout.llm.sse import BrokenStream, EventReader
from brownout.llm.types import CUT_SHORT, ChatResult, EndpointConfig, Message, ProbeResult
from brownout.policies.balance import EndpointLoad, pick
from brownout.policies.breaker import BreakerConfig, BreakerGroupConfig, CircuitBreaker
from brownout.policies.deadline import remaining
from brownout.policies.limiter import AdaptiveLimiter, LimiterConfig, Permit
from brownout.policies.retry import Retry, RetryConfig

__all__ = [
    "DEFAULT_LIMITER",
    "DEFAULT_RETRY",
    "EARLY_CUT",
    "PROBE_PROMPT",
    "ModelClient",
    "SharedEndpoint",
    "is_caller_fault",
]

DEFAULT_RETRY: Final = RetryConfig(max_attempts=2, backoff_base=0.2)
"""The retry of a client given none: one more attempt (on another endpoint if there is one)."""

PROBE_PROMPT: Final = "Reply with OK."
"""The test inference of :meth:`ModelClient.probe` (with ``max_tokens=4``)."""

# 4xx statuses that say "not now" rather than "wrong request": the endpoint is to blame.
_SERVER_SIDE_4XX: Final = frozenset({408, 425, 429})

# Statuses by which a server says it has more work than it can take: the concurrency limit shrinks.
_OVERLOAD_STATUSES: Final = frozenset({429, 503})

# Asked of a streaming endpoint: the token counts in a last event (OpenAI's form; llama.cpp's too).
_INCLUDE_USAGE: Final = {"include_usage": True}

# A stream may send up to twice max_tokens content events, plus this many, before it counts as a
# server that ignores max_tokens (an event is about a token; some servers split one in two).
_TOKEN_SLACK: Final = 64

DEFAULT_LIMITER: Final = LimiterConfig(initial_limit=1)
"""The limiter settings of a client given none (``max_limit`` comes from each endpoint).

The limit starts at one call (a slow start, as TCP's): a model server's slots share its cores, so a
fresh server sent as many calls as it has slots may answer none of them within the timeout -- and
with nothing ever completed, those timeouts would read as a dead model. From one call the limit
grows a round at a time while the answers say the server keeps up (:mod:`brownout.policies.limiter`)."""


def is_caller_fault(status: int | None) -> bool:
    """True for an HTTP status that blames the request (most 4xx), not the endpoint.

    Such failures are neither retried nor counted by the endpoint's breaker: a malformed prompt
    must not take a healthy model out of service.
    """
    return status is not None and 400 <= status < 500 and status not in _SERVER_SIDE_4XX


KEEPALIVE_EXPIRY: Final = 4.0
"""Seconds an idle pooled connection is kept for reuse (the client made when none is given).

Below the 5 s after which llama.cpp, uvicorn and Node close an idle keep-alive connection (llama.cpp
says ``Keep-Alive: timeout=5``): with httpx's own 5 s the pool could hand out a connection the server
was closing at that moment, and the call failed at once with "Server disconnected without sending a
response". (A call that meets a connection closed under it anyway is sent again on a new one, see
:meth:`ModelClient._exchange`.)"""


EARLY_CUT: Final = 1.0
"""Seconds before an attempt's own timeout by which a cut at the caller's finish time
(``ModelClient.chat(finish_by=...)``) is the caller's doing, never counted against the endpoint.

A request that waited for its turn has less than the model's whole time limit left; cutting its call
at its finish time says nothing about the model. One that did not wait is cut about when its own
timeout would have cut it, and that is judged as a timeout: a hung model must still be found
(a request with a 10 s target sending its call at once is cut at 9.99 s, its timeout being 10 s)."""


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message
    finish_reason: str | None = None


class _Completion(BaseModel):
    """The part of an OpenAI chat completion the client reads; other fields are ignored."""

    choices: list[_Choice] = Field(min_length=1)
    usage: dict[str, Any] | None = None
    model: str | None = None


class _NotCounted(Exception):
    """Carries a caller-fault :class:`ModelError` through the breaker, which ignores this type."""

    def __init__(self, error: ModelError) -> None:
        super().__init__(str(error))
        self.error = error


class _SlowCall(_NotCounted):
    """A sent call timed out while its endpoint was demonstrably alive: slow under load, not failed.

    ``written`` is what its stream had brought when it was given up (empty for a whole answer)."""

    def __init__(self, error: ModelError, written: str = "", tokens: int = 0) -> None:
        super().__init__(error)
        self.written = written
        self.tokens = tokens


class _CutShort(httpx.ReadTimeout):
    """The attempt's timeout ran out while its stream was coming: what it had brought so far."""

    def __init__(self, message: str, written: str, tokens: int) -> None:
        super().__init__(message)
        self.written = written
        self.tokens = tokens


class SharedEndpoint:
    """One server that the clients of several roles call: a local model server shared by the brief's
    roles, say. They share its concurrency limiter -- so the calls in flight to it, of every role,
    never exceed its slots, and each role's calls wait in the queue of its client's ``priority`` --
    and its signs of life: a call completed for one role shows the server alive to the others, so a
    call of another role that times out while it works is slow under load, not failed.

    Give the same object to each client, by the endpoint's URL (``ModelClient(shared=...)``).
    """

    __slots__ = ("last_success", "limiter")

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self.limiter = limiter
        """The one concurrency limiter of the server."""
        self.last_success: float | None = None
        """Clock time of the server's last well-formed completion, whichever role's call it was."""


class _Endpoint:
    """One endpoint's runtime state."""

    __slots__ = (
        "breaker",
        "chat_url",
        "completed",
        "config",
        "headers",
        "host",
        "limiter",
        "load",
        "port",
        "sending",
        "share",
        "shared",
        "slow",
        "tokens",
        "url",
    )

    def __init__(
        self,
        config: EndpointConfig,
        breaker: CircuitBreaker,
        share: SharedEndpoint,
        priority: int = 0,
        shared: bool = False,
    ) -> None:
        self.config = config
        self.url = config.url.rstrip("/")
        self.chat_url = f"{self.url}/v1/chat/completions"
        parsed = httpx.URL(self.url)
        self.host = parsed.host
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
        self.breaker = breaker
        self.share = share
        self.shared = shared  # other clients call it too (their calls share its limiter)
        self.limiter = share.limiter
        # What the picker ranks by: the limiter's wait and permits, and the latency average.
        self.load = EndpointLoad(share.limiter, priority=priority)
        # HTTP requests being sent or answered (probes aside): whether a timed-out call was "under
        # load" (see _SlowCall). Not the picker's count, which starts when a call gets its slot.
        self.sending = 0
        self.completed = 0  # well-formed completions of this role's calls (probes not included)
        self.slow = 0  # sent calls that timed out while the endpoint was alive (see _SlowCall)
        self.tokens = 0  # completion tokens of those completions, as the endpoint reported them

    @property
    def last_success(self) -> float | None:
        """Clock time of the endpoint's last well-formed completion (of any role sharing it)."""
        return self.share.last_success

    @property
    def available(self) -> bool:
        """True when the endpoint's breaker would let a call through now."""
        return self.breaker.available

    def body(
        self,
        messages: list[Message],
        max_tokens: int,
        temperature: float,
        response_format: dict[str, Any] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if response_format is not None and (
            self.config.json_schema or response_format.get("type") != "json_schema"
        ):
            # An endpoint without grammar support may reject json_schema outright; it gets the
            # prompt alone and the JSON guard judges the text.
            body["response_format"] = response_format
        if self.config.stream:
            body["stream"] = True
            body["stream_options"] = _INCLUDE_USAGE
        return body


class ModelClient:
    """Chat completions for one model role over one or more endpoints (see the module docstring).

    ``breakers`` configures the per-endpoint breakers (``for_name(role)``; default: the toolkit's
    defaults for every role, with no per-role override), ``retry`` the attempts
    (default :data:`DEFAULT_RETRY`), ``timeout`` the seconds one attempt may take. ``http`` lets the
    caller share an ``httpx.AsyncClient``; without one the client makes its own (ignoring proxy
    environment variables: model servers are local or on the private network), whose idle
    connections are reused for ``keepalive_expiry`` seconds (:data:`KEEPALIVE_EXPIRY`), and
    :meth:`aclose` closes it. ``breaker_factory(name, config)`` makes the endpoint breakers instead
    (for instance :meth:`brownout.state.breaker.RedisBreakers.breaker`, to share their state across
    replicas).
    ``limiter`` configures the per-endpoint concurrency limiters (default :data:`DEFAULT_LIMITER`);
    each endpoint's limiter's ``max_limit`` is its ``max_concurrency``, or the given ``max_limit``
    when that is lower. ``alive_window`` is how recent a sign of life must be for a timed-out call to
    count as slow rather than failed (default: three times ``timeout``; see the module docstring).

    ``shared`` maps endpoint URLs to :class:`SharedEndpoint` objects that other clients use too: such
    an endpoint takes the shared limiter (``limiter`` does not apply to it) and signs of life.
    ``priority`` is the queue this client's calls wait in on a shared limiter (lower first; default
    0). ``learns_limit=False`` keeps this client's calls out of the limiters' latency rounds: a
    limiter shared by roles whose calls take different times learns the server's knee from one
    role's calls, whose length is steady (the service-time average behind the expected waits still
    takes every call).
    """

    __slots__ = (
        "_clock",
        "_endpoints",
        "_http",
        "_learns",
        "_own_http",
        "_priority",
        "_retry",
        "alive_window",
        "role",
        "timeout",
    )

    def __init__(
        self,
        role: str,
        endpoints: Sequence[EndpointConfig],
        *,
        breakers: BreakerGroupConfig | None = None,
        retry: RetryConfig | None = None,
        timeout: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        http: httpx.AsyncClient | None = None,
        breaker_factory: Callable[[str, BreakerConfig], CircuitBreaker] | None = None,
        limiter: LimiterConfig | None = None,
        alive_window: float | None = None,
        shared: Mapping[str, SharedEndpoint] | None = None,
        priority: int = 0,
        learns_limit: bool = True,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        if not endpoints:
            raise ConfigError("endpoints", f"model role {role!r} needs at least one endpoint")
        if not timeout > 0 or math.isinf(timeout):
            raise ConfigError("timeout", f"must be a positive number of seconds, got {timeout!r}")
        self.role = role
        """The model role served (also the breaker name, or its prefix with several endpoints)."""
        self.timeout = float(timeout)
        """Seconds one attempt may take when the call gives none."""
        window = 3.0 * self.timeout if alive_window is None else alive_window
        if not window > 0 or math.isinf(window):
            raise ConfigError("alive_window", f"must be a positive number of seconds, got {alive_window!r}")
        self.alive_window = float(window)
        """A timed-out call under load is slow, not failed, when the endpoint completed a call this
        recently (seconds)."""
        self._clock = clock
        self._priority = priority
        self._learns = learns_limit
        shares = {url.rstrip("/"): share for url, share in (shared or {}).items()}
        base = (breakers or BreakerGroupConfig()).for_name(role)
        breaker_config = base.model_copy(update={"ignore_exceptions": (*base.ignore_exceptions, _NotCounted)})
        eps: list[_Endpoint] = []
        seen: set[str] = set()
        for i, cfg in enumerate(endpoints):
            url = cfg.url.rstrip("/")
            try:
                scheme = httpx.URL(url).scheme
            except httpx.InvalidURL as e:
                raise ConfigError(f"endpoints[{i}].url", f"{url!r} is not a URL: {e}") from e
            if scheme not in ("http", "https"):
                raise ConfigError(f"endpoints[{i}].url", f"{url!r} must be an http:// or https:// URL")
            if url in seen:
                raise ConfigError(f"endpoints[{i}].url", f"{url!r} is listed twice for role {role!r}")
            seen.add(url)
            name = role if len(endpoints) == 1 else f"{role}@{url}"
            breaker = (
                breaker_factory(name, breaker_config)
                if breaker_factory is not None
                else CircuitBreaker(name, breaker_config, clock=clock, events=events)
            )
            share = shares.get(url)
            on_shared = share is not None
            if share is None:
                # The endpoint's slots are a hard ceiling; a configured max_limit may only lower it
                # (the default settings' max_limit is no ceiling of the endpoint's).
                limiter_config = (
                    DEFAULT_LIMITER.model_copy(update={"max_limit": cfg.max_concurrency})
                    if limiter is None
                    else limiter
                ).capped(cfg.max_concurrency)
                share = SharedEndpoint(AdaptiveLimiter(name, limiter_config, clock=clock, events=events))
            eps.append(_Endpoint(cfg, breaker, share, priority, on_shared))
        self._endpoints: tuple[_Endpoint, ...] = tuple(eps)
        retry_config = retry or DEFAULT_RETRY
        user_if = retry_config.retry_if

        def retriable(error: BaseException) -> bool:
            # Retry only the endpoint's failures, and only when some endpoint could take the retry:
            # waiting out a backoff to meet an open breaker helps nobody.
            return (
                isinstance(error, ModelError)
                and not is_caller_fault(error.status)
                and self.available
                and (user_if is None or user_if(error))
            )

        self._retry = Retry(
            role, retry_config.model_copy(update={"retry_if": retriable}), clock=clock, events=events
        )
        self._own_http = http is None
        self._http = (
            http
            if http is not None
            else httpx.AsyncClient(trust_env=False, limits=httpx.Limits(keepalive_expiry=keepalive_expiry))
        )

    # ------------------------------------------------------------------ state

    @property
    def endpoints(self) -> tuple[EndpointConfig, ...]:
        """The endpoint configs, in the order given."""
        return tuple(ep.config for ep in self._endpoints)

    @property
    def available(self) -> bool:
        """True when some endpoint's breaker would let a call through now."""
        return any(ep.breaker.available for ep in self._endpoints)

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """Each endpoint's breaker by name (``role``, or ``role@url`` with several endpoints)."""
        return {ep.breaker.name: ep.breaker for ep in self._endpoints}

    @property
    def limiters(self) -> dict[str, AdaptiveLimiter]:
        """Each endpoint's concurrency limiter, by the same names as :attr:`breakers`."""
        return {ep.breaker.name: ep.limiter for ep in self._endpoints}

    def share_of(self, url: str) -> SharedEndpoint | None:
        """The concurrency limiter and signs of life of the endpoint at ``url`` (None when none is
        there), for another caller of the same server to share: the gateway's group of the local model."""
        url = url.rstrip("/")
        return next((ep.share for ep in self._endpoints if ep.url == url), None)

    def estimated_wait(self, ahead: int = 0) -> float:
        """Seconds a call arriving now would expect to wait for a slot on the best available endpoint
        (0 when one has a free slot; the lowest estimate over endpoints whose breaker allows calls).
        ``ahead``: callers not queued here yet that will come first (see
        :meth:`~brownout.policies.limiter.AdaptiveLimiter.estimated_wait`)."""
        waits = [
            ep.limiter.estimated_wait(ahead, priority=self._priority)
            for ep in self._endpoints
            if ep.breaker.available
        ]
        return min(waits) if waits else 0.0

    def service_time(self, quantile: float | None = None) -> float | None:
        """The expected seconds one call holds a slot, from the fastest available endpoint that has
        measured one (None before any call finished); with ``quantile`` (0..1), that quantile of the
        role's recent calls there instead of the average -- how long the long ones take.

        On an endpoint shared with other roles it is this role's own calls' latency average: the
        shared limiter's average mixes in the other roles' calls and the probes, which are shorter,
        and a request given a start deadline from it would finish past its target."""
        times = [
            t
            for ep in self._endpoints
            if ep.breaker.available
            and (
                t := (
                    ep.load.quantile(quantile)
                    if quantile is not None
                    else (ep.load.ewma if ep.shared else ep.limiter.service_time)
                )
            )
            is not None
        ]
        return min(times) if times else None

    @property
    def priority(self) -> int:
        """The queue this client's calls wait in on a shared limiter (lower first)."""
        return self._priority

    @property
    def retry(self) -> Retry:
        """The retry policy (its ``stats`` count the attempts)."""
        return self._retry

    def retry_after(self) -> float:
        """Seconds until some endpoint may take a call (0 when one can now)."""
        return min(ep.breaker.retry_after() for ep in self._endpoints)

    def endpoints_status(self) -> list[dict[str, Any]]:
        """One dict per endpoint: url, model, breaker name and state, availability, the concurrency
        limit, its ceiling, the latency ceiling below that (None: none) and the calls that held a
        slot for the latency budget or longer (``late``), calls in flight and waiting for a slot, the
        expected wait for a newcomer in seconds, the latency average in ms (None before the first
        answer), the breaker's retry_after, the well-formed completions so far (``completed``), the
        completion tokens they held as the endpoint reported them (``completion_tokens``: the model's
        work rate, steadier than a count of answers) and the calls that were slow under load
        (``slow``, see the module docstring)."""
        out = []
        for ep in self._endpoints:
            b = ep.breaker
            lim = ep.limiter
            out.append(
                {
                    "url": ep.url,
                    "model": ep.config.model,
                    "breaker": b.name,
                    "state": b.state.value,
                    "available": b.available,
                    "limit": lim.limit,
                    "max_limit": lim.config.max_limit,
                    "latency_ceiling": lim.ceiling,
                    "late": lim.stats.late,
                    "in_flight": lim.in_flight,
                    "queued": lim.queued,
                    "estimated_wait": round(lim.estimated_wait(priority=self._priority), 3),
                    "ewma_latency_ms": None if (ewma := ep.load.ewma) is None else round(ewma * 1000.0, 3),
                    "retry_after": b.retry_after(),
                    "completed": ep.completed,
                    "completion_tokens": ep.tokens,
                    "slow": ep.slow,
                }
            )
        return out

    # ------------------------------------------------------------------ calls

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 512,
        temperature: float = 0.7,
        response_format: dict[str, Any] | None = None,
        timeout: float | None = None,
        queue_timeout: float | None = None,
        salvage: Callable[[str], str | None] | None = None,
        finish_by: float | None = None,
    ) -> ChatResult:
        """One chat completion from some healthy endpoint of this role.

        ``timeout`` bounds each attempt once its request is sent (default: the client's), tightened by
        the caller's deadline. ``queue_timeout`` bounds the wait for a free slot before that (default:
        the limiter's ``max_wait``), also tightened by the caller's deadline.

        ``salvage`` says what to make of an answer cut short: when an attempt is *slow* (its timeout
        ran out on a live, busy endpoint, see the module docstring) while its stream was coming,
        ``salvage(written)`` gets what the stream had brought. The text it returns is the result's
        ``content``, with ``finish_reason`` :data:`CUT_SHORT`; None (or nothing written) raises the
        slow call's :class:`Overloaded` as without it. Either way the call counts as slow (module
        docstring): nothing against the breaker.

        ``finish_by`` (this client's clock) is when the caller needs its answer, its latency target:
        an attempt still running then is cut there, as at its timeout. Cut more than
        :data:`EARLY_CUT` seconds before its own timeout, the cut is the caller's doing (its time went
        on waiting elsewhere) and never counts against the endpoint, busy or not: what the stream had
        brought goes to ``salvage`` as above, else the caller gets :class:`Overloaded` (reason
        ``"slow"``). Only a cut about as long as the timeout is judged as a timeout. A call whose
        permit comes after ``finish_by`` is not sent (:class:`Overloaded`, reason
        ``"queue_timeout"``).

        Raises :class:`ModelUnavailable`, :class:`ModelError`, :class:`Overloaded` or
        :class:`DeadlineExceeded`.
        """
        limit = self.timeout if timeout is None else timeout
        if not limit > 0:
            raise ConfigError("timeout", f"must be a positive number of seconds, got {timeout!r}")
        if queue_timeout is not None and not queue_timeout >= 0:
            raise ConfigError("queue_timeout", f"must be a number of seconds >= 0, got {queue_timeout!r}")
        if telemetry.SWITCH.tracer is None:
            return await self._chat(
                messages, max_tokens, temperature, response_format, limit, queue_timeout, salvage, finish_by
            )
        # Traced: one GenAI span for the call, its retries' waits and the breakers' refusals as its
        # events, and a child span per attempt (each carries its traceparent to the model server).
        model = self._endpoints[0].config.model
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": GEN_AI_PROVIDER,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": temperature,
            "brownout.role": self.role,
            "brownout.breaker.state": ",".join(ep.breaker.state.value for ep in self._endpoints),
        }
        with telemetry.span(f"chat {model}", kind=telemetry.CLIENT, attributes=attributes) as span:
            result = await self._chat(
                messages,
                max_tokens,
                temperature,
                response_format,
                limit,
                queue_timeout,
                salvage,
                finish_by,
                traced=True,
            )
            if span is not None:
                span.set_attributes(_usage(result))
            return result

    async def _chat(
        self,
        messages: list[Message],
        max_tokens: int,
        temperature: float,
        response_format: dict[str, Any] | None,
        limit: float,
        queue_timeout: float | None,
        salvage: Callable[[str], str | None] | None = None,
        finish_by: float | None = None,
        *,
        traced: bool = False,
    ) -> ChatResult:
        tried: list[_Endpoint] | None = None
        ep: _Endpoint | None = None
        n = 0
        async for attempt in self._retry.attempts():
            with attempt:
                if ep is not None:
                    tried = [ep] if tried is None else [*tried, ep]
                ep = self._pick(tried)
                body = ep.body(messages, max_tokens, temperature, response_format)
                if not traced:
                    return await self._attempt(ep, body, limit, queue_timeout, salvage, finish_by)
                n += 1
                with telemetry.span(
                    f"attempt {n} {ep.config.model}",
                    kind=telemetry.CLIENT,
                    attributes={
                        "gen_ai.operation.name": "chat",
                        "gen_ai.provider.name": GEN_AI_PROVIDER,
                        "gen_ai.request.model": ep.config.model,
                        "server.address": ep.host,
                        "server.port": ep.port,
                        "brownout.attempt": n,
                        "brownout.endpoint": ep.url,
                        "brownout.breaker": ep.breaker.name,
                        "brownout.breaker.state": ep.breaker.state.value,
                    },
                ) as span:
                    result = await self._attempt(ep, body, limit, queue_timeout, salvage, finish_by)
                    if span is not None:
                        span.set_attributes(_usage(result))
                    return result
        raise AssertionError("unreachable: the retry loop returns or raises")  # pragma: no cover

    def _pick(self, tried: list[_Endpoint] | None) -> _Endpoint:
        """The endpoint for the next attempt (see :func:`brownout.policies.balance.pick`), or raise
        ModelUnavailable."""
        best = pick(self._endpoints, tried)
        if best is None:
            raise self._unavailable()
        return best

    def _unavailable(self) -> ModelUnavailable:
        n = len(self._endpoints)
        reason = "circuit breaker open" if n == 1 else f"the circuit breakers of all {n} endpoints are open"
        return ModelUnavailable(self.role, retry_after=self.retry_after(), reason=reason)

    async def _attempt(
        self,
        ep: _Endpoint,
        body: dict[str, Any],
        limit: float,
        queue_timeout: float | None,
        salvage: Callable[[str], str | None] | None = None,
        finish_by: float | None = None,
    ) -> ChatResult:
        left = remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded(0.0, policy=self.role)
        wait = (
            left if queue_timeout is None else (queue_timeout if left is None else min(left, queue_timeout))
        )
        # Waiting for a slot is not the model's time: nothing here reaches the breaker. A caller that
        # said how long it may wait is told at once when the expected wait is longer (it would only
        # wait to fail); one that gave no bound waits up to its deadline or the limiter's max_wait.
        permit = await ep.limiter.acquire(
            timeout=wait, shed_late=queue_timeout is not None, priority=self._priority
        )
        written: list[int] = []  # tokens a slow call's stream had brought when it was given up
        clock = self._clock
        own = limit
        early = False
        if finish_by is not None:
            until = finish_by - clock.now()
            if until <= 0:
                # The slot came after the caller's finish time: nothing left to send it for.
                permit.release(sample=False)
                raise self._busy(ep, "queue_timeout")
            if until < limit:
                limit, early = until, until < limit - EARLY_CUT
        sent = clock.now()
        try:
            result = await self._attempt_with(ep, body, limit, permit, salvage, written, early)
        except ModelError as e:
            cause = e.__cause__
            permit.release(
                dropped=isinstance(cause, httpx.TimeoutException) or e.status in _OVERLOAD_STATUSES,
                sample=False,
            )
            raise
        except Overloaded as e:
            if e.reason == "slow" and written:
                # A long answer given up at its timeout while it was being written: how fast it came
                # says whether the server is overloaded, not that it ran out of time.
                permit.release(sample=self._learns, work=written[0])
            else:
                # Slow with nothing written for half its own time limit or more: the server has more
                # work than it can do in time -- shrink. One its caller cut sooner says nothing of it.
                permit.release(dropped=e.reason == "slow" and clock.now() - sent >= own / 2, sample=False)
            raise
        except BaseException:
            permit.release(sample=False)
            raise
        produced = result.usage.get("completion_tokens")
        # Judged by its time per token written: an answer's length is the prompt's doing, not load's.
        permit.release(sample=self._learns, work=produced if type(produced) is int and produced > 0 else None)
        return result

    async def _attempt_with(
        self,
        ep: _Endpoint,
        body: dict[str, Any],
        limit: float,
        permit: Permit,
        salvage: Callable[[str], str | None] | None = None,
        written: list[int] | None = None,
        early: bool = False,
    ) -> ChatResult:
        """One attempt on its permit; ``early``: ``limit`` is the caller's finish time, well before
        the attempt's own timeout (see :meth:`chat`)."""
        timeout = limit
        capped = False
        left = remaining()
        if left is not None and left < timeout:
            if left <= 0:
                raise DeadlineExceeded(0.0, policy=self.role)
            timeout, capped = left, True
        # The caller's budget was cut short by the wait in our queue: a timeout then is the caller's
        # deadline, not the endpoint's slowness, and is not counted against it.
        excused = (capped and permit.waited > 0) or (early and not capped)
        try:
            result: ChatResult = await ep.breaker.call(self._send, ep, body, timeout, excused)
        except _SlowCall as e:
            # Sent, timed out, but the endpoint is alive: busy, not failed (see the module docstring).
            if capped:
                # ...and the time it had was what was left of the caller's deadline: say so.
                raise DeadlineExceeded(timeout, policy=self.role) from e.error
            return self._cut(ep, e.error, e.written, e.tokens, timeout, salvage, written)
        except _NotCounted as e:
            cause = e.error.__cause__
            if excused and isinstance(cause, httpx.TimeoutException):
                if not capped:
                    # Cut at the caller's finish time, long before its own timeout: the caller's doing.
                    cut = cause if isinstance(cause, _CutShort) else None
                    tokens = cut.tokens if cut is not None else 0
                    return self._cut(
                        ep, e.error, cut.written if cut else "", tokens, timeout, salvage, written
                    )
                raise DeadlineExceeded(timeout, policy=self.role) from e.error
            raise e.error from None
        except CircuitOpen as e:
            # The breaker opened while this call waited for a slot.
            raise ModelUnavailable(self.role, retry_after=e.retry_after, reason="circuit breaker open") from e
        except ModelError as e:
            if capped and isinstance(e.__cause__, httpx.TimeoutException):
                # The endpoint was given only what was left of the caller's deadline. It still counts
                # as a timeout against the endpoint (a model slower than its callers' budgets is sick),
                # but the caller hears that its deadline passed.
                raise DeadlineExceeded(timeout, policy=self.role) from e
            raise
        return result

    def _cut(
        self,
        ep: _Endpoint,
        error: ModelError,
        text: str,
        tokens: int,
        timeout: float,
        salvage: Callable[[str], str | None] | None,
        written: list[int] | None,
    ) -> ChatResult:
        """An attempt given up on at ``timeout`` with ``text`` (``tokens`` tokens) written, through no
        fault of the endpoint: what ``salvage`` keeps of it, else raise :class:`Overloaded` ("slow")."""
        if written is not None and tokens > 0:
            written.append(tokens)
        kept = salvage(text) if salvage is not None and text else None
        if kept is not None:
            if tokens > 0:
                ep.tokens += tokens  # written, and served after all
            return ChatResult(
                content=kept,
                role=self.role,
                endpoint=ep.url,
                latency=timeout,
                finish_reason=CUT_SHORT,
                usage={"completion_tokens": tokens} if tokens > 0 else {},
            )
        raise self._busy(ep, "slow") from error

    def _busy(self, ep: _Endpoint, reason: str) -> Overloaded:
        """``Overloaded`` for a call of ``ep`` given up for load (``reason``), with its limiter's state."""
        lim = ep.limiter
        return Overloaded(
            ep.breaker.name,
            reason,
            retry_after=lim.retry_after(self._priority),
            queue_size=lim.queued,
            in_flight=lim.in_flight,
        )

    async def _send(
        self, ep: _Endpoint, body: dict[str, Any], timeout: float, excused: bool = False
    ) -> ChatResult:
        """One HTTP attempt on ``ep``; raises ModelError for anything but a well-formed completion.

        ``excused``: a timeout is not the endpoint's fault (raised as _NotCounted, which the breaker
        ignores)."""
        clock = self._clock
        start = clock.now()
        # Under load when sent: another call in flight or waiting for a slot of this endpoint (the
        # permits held count the calls of other roles on a shared server, and probes).
        crowded = ep.sending > 0 or ep.limiter.in_flight > 1 or ep.limiter.queued > 0
        ep.sending += 1
        try:
            headers = ep.headers
            if telemetry.SWITCH.tracer is not None:
                # The attempt's span is current: the model server may join the trace.
                headers = telemetry.inject(dict(headers or {}))
            response, raw, reader = await self._exchange(ep.chat_url, body, headers, timeout)
        except httpx.TimeoutException as e:
            error = ModelError(
                f"{ep.url}: no answer within {timeout:.3g}s ({type(e).__name__})", endpoint=ep.url
            )
            error.__cause__ = e
            now = clock.now()
            # Cut or timed out, the call held its slot this long at least: the latency it plans with
            # must not forget the long calls because they were cut.
            ep.load.observe(now - start)
            if excused:
                raise _NotCounted(error) from e
            alive = ep.last_success
            # sending still counts this call here (the finally below has not run yet).
            loaded = crowded or ep.sending > 1 or ep.limiter.in_flight > 1 or ep.limiter.queued > 0
            if loaded and alive is not None and now - alive <= self.alive_window:
                ep.slow += 1
                if isinstance(e, _CutShort):
                    raise _SlowCall(error, e.written, e.tokens) from e
                raise _SlowCall(error) from e
            raise error from e
        except httpx.HTTPError as e:
            raise ModelError(f"{ep.url}: {type(e).__name__}: {e}", endpoint=ep.url) from e
        except BrokenStream as e:
            raise ModelError(f"{ep.url}: the stream broke: {e}", endpoint=ep.url) from e
        finally:
            ep.sending -= 1
        latency = clock.now() - start
        status = response.status_code
        if not 200 <= status < 300:
            error = ModelError(
                f"{ep.url}: HTTP {status}: {_snippet(raw.decode('utf-8', 'replace'))}",
                endpoint=ep.url,
                status=status,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
            if is_caller_fault(status):
                raise _NotCounted(error)
            raise error
        if reader is None:
            content, finish_reason, usage, model = _parse(ep.url, raw, status)
        else:
            content, finish_reason, usage, model = _streamed(ep.url, reader, status)
        ep.load.observe(latency)
        ep.share.last_success = clock.now()
        ep.completed += 1
        produced = usage.get("completion_tokens") if usage else None
        if type(produced) is int and produced > 0:
            ep.tokens += produced
        return ChatResult(
            content=content,
            role=self.role,
            endpoint=ep.url,
            latency=latency,
            finish_reason=finish_reason,
            usage=usage,
            model=model,
        )

    async def _exchange(
        self, url: str, body: dict[str, Any], headers: dict[str, str] | None, timeout: float
    ) -> tuple[httpx.Response, bytes, EventReader[_HttpxPieces] | None]:
        """POST ``body`` and read the answer to its end: the response (status, headers), and its body
        when it came whole or the reader that read it when it came as a stream.

        ``timeout`` bounds the whole exchange, as for an answer asked whole (raising
        :class:`httpx.ReadTimeout`). A request that went out on a kept-alive connection and got no
        answer at all because the server had closed it is sent again, once, on a new connection. A
        stream is read so that giving it up -- at the timeout, or when the caller's deadline cancels
        the call -- closes it, and closing ends the generation: the server stops writing for nobody
        and its slot is free for the next call at once.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        connected = False

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            nonlocal connected
            if event.startswith(("connection.connect_tcp.", "connection.connect_unix_socket.")):
                connected = True

        def request() -> httpx.Request:
            return self._http.build_request(
                "POST", url, json=body, headers=headers, timeout=timeout, extensions={"trace": trace}
            )

        try:
            response = await self._http.send(request(), stream=True)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            if connected:
                raise
            # Sent on a kept-alive connection that the server had closed, with no answer at all:
            # llama.cpp closes the connection after every streamed answer although it says
            # Keep-Alive, and a call sent on it in the moment before the close arrives fails at
            # once. Sent again, once, on a new connection -- as keep-alive clients do.
            response = await self._http.send(request(), stream=True)
        readers: list[EventReader[_HttpxPieces]] = []
        try:
            # The latency target of a request counts on a call's timeout as its longest: a long
            # answer that kept coming past it would keep its caller, and the callers queued behind
            # its slot, past their targets too.
            async with asyncio.timeout(max(0.0, until - loop.time())):
                return await self._read(response, body, timeout, readers)
        except TimeoutError as e:
            message = f"no whole answer within {timeout:g}s"
            if readers and readers[0].text:
                # What the stream brought is kept with the error, for a caller that can use it.
                raise _CutShort(message, "".join(readers[0].text), readers[0].tokens) from e
            raise httpx.ReadTimeout(message) from e
        finally:
            await response.aclose()

    async def _read(
        self,
        response: httpx.Response,
        body: dict[str, Any],
        timeout: float,
        readers: list[EventReader[_HttpxPieces]],
    ) -> tuple[httpx.Response, bytes, EventReader[_HttpxPieces] | None]:
        """The rest of :meth:`_exchange`: the answer read, as a stream when it came as one (its reader
        also put in ``readers``, for what it read should the read be given up)."""
        if (
            body.get("stream") is True
            and 200 <= response.status_code < 300
            and response.headers.get("content-type", "").startswith("text/event-stream")
        ):
            reader = EventReader(_HttpxPieces(response))
            readers.append(reader)
            # A server that ignores max_tokens and keeps sending is broken, not slow: without
            # this bound its stream would hold the call (and memory) to the end of its timeout.
            most = 2 * int(body.get("max_tokens") or 0) + _TOKEN_SLACK
            while await reader.read(timeout) is not None:
                if reader.tokens > most:
                    asked = body.get("max_tokens")
                    raise BrokenStream(f"{reader.tokens} pieces of answer already, for max_tokens {asked}")
            return response, b"", reader
        # An error, or a server that answered whole although asked to stream: read it all.
        return response, await response.aread(), None

    async def probe(self, timeout: float = 5.0, *, busy_window: float | None = None) -> list[ProbeResult]:
        """A tiny test inference on every endpoint at once, under ``timeout`` (and the caller's deadline).

        Probes bypass the retry and are not recorded by the breakers: one slow probe must not take an
        endpoint out of service. A probe is healthy when a well-formed completion with some text came
        back in time.

        A probe measures the model, not the queue. It takes a free slot of the endpoint's limiter when
        there is one. When every slot is busy and a call on the endpoint succeeded within
        ``busy_window`` seconds (default: the client's attempt timeout), the endpoint is answering:
        the probe reports it healthy and ``busy`` without sending anything. Otherwise the probe waits
        for a slot for up to ``timeout`` -- reported as ``queued``, apart from the inference's
        ``latency`` -- and, if none comes free, reports ``busy`` too: the calls holding the slots are
        bounded by their own timeouts, which the breaker judges.
        """
        window = self.timeout if busy_window is None else busy_window
        results = await asyncio.gather(*(self._probe(ep, timeout, window) for ep in self._endpoints))
        return list(results)

    async def _probe(self, ep: _Endpoint, timeout: float, busy_window: float) -> ProbeResult:
        left = remaining()
        if left is not None:
            timeout = min(timeout, left)
        if timeout <= 0:
            return ProbeResult(self.role, ep.url, False, 0.0, "no time left before the deadline")
        clock = self._clock
        permit = ep.limiter.try_acquire()
        if permit is None:
            last = ep.last_success
            if last is not None and clock.now() - last <= busy_window:
                return ProbeResult(self.role, ep.url, True, 0.0, None, busy=True)
            try:
                permit = await ep.limiter.acquire(timeout=timeout, priority=self._priority)
            except Overloaded:
                return ProbeResult(self.role, ep.url, True, 0.0, None, busy=True, queued=timeout)
        try:
            # The wait for a slot is not the model's time: the inference gets the whole budget.
            result = await self._probe_send(ep, timeout)
        finally:
            # A four-token probe says nothing about the latency of real calls.
            permit.release(sample=False)
        if permit.waited > 0:
            result = dataclasses.replace(result, queued=permit.waited)
        return result

    async def _probe_send(self, ep: _Endpoint, timeout: float) -> ProbeResult:
        body = {
            "model": ep.config.model,
            "messages": [{"role": "user", "content": PROBE_PROMPT}],
            "max_tokens": 4,
            "temperature": 0.0,
        }
        clock = self._clock
        start = clock.now()
        error: str | None = None
        try:
            response = await self._http.post(ep.chat_url, json=body, headers=ep.headers, timeout=timeout)
        except httpx.TimeoutException:
            error = f"timeout: no answer within {timeout:.3g}s"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        else:
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
            else:
                try:
                    content, _, _, _ = _parse(ep.url, response.content, response.status_code)
                except ModelError as e:
                    error = str(e)
                else:
                    if not content.strip():
                        error = "empty answer"
        latency = clock.now() - start
        return ProbeResult(self.role, ep.url, error is None, latency, error)

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Close the HTTP client if this client made it (a shared one is the caller's to close)."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> ModelClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        states = ", ".join(f"{ep.url}: {ep.breaker.state.value}" for ep in self._endpoints)
        return f"ModelClient({self.role!r}, [{states}])"


GEN_AI_PROVIDER: Final = "openai"
"""``gen_ai.provider.name`` of model calls: the API they speak (OpenAI's chat completions), which is how
the GenAI conventions tell trace viewers to read them; ``server.address`` says which server answered."""


def _usage(result: ChatResult) -> dict[str, AttributeValue]:
    """The GenAI attributes of an answer: finish reason and token counts, where the server gave them."""
    out: dict[str, AttributeValue] = {}
    if result.finish_reason is not None:
        out["gen_ai.response.finish_reasons"] = (result.finish_reason,)
    for ours, theirs in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        value = result.usage.get(theirs)
        if isinstance(value, int) and not isinstance(value, bool):
            out[f"gen_ai.usage.{ours}"] = value
    if result.model is not None:
        out["gen_ai.response.model"] = result.model
    return out


def _parse(url: str, raw: bytes, status: int) -> tuple[str, str | None, dict[str, Any], str | None]:
    """(content, finish_reason, usage, model) of a completion body, or ModelError if it is not one."""
    try:
        completion = _Completion.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        body = _snippet(raw.decode("utf-8", "replace"))
        raise ModelError(
            f"{url}: malformed completion ({where}: {first['msg']}): {body}",
            endpoint=url,
            status=status,
        ) from e
    choice = completion.choices[0]
    content = choice.message.content
    if content is None:
        raise ModelError(f"{url}: completion has no message content", endpoint=url, status=status)
    return content, choice.finish_reason, completion.usage or {}, completion.model


def _streamed(
    url: str, reader: EventReader[_HttpxPieces], status: int
) -> tuple[str, str | None, dict[str, Any], str | None]:
    """(content, finish_reason, usage, model) of a streamed completion read to its end, or ModelError
    if the stream ended before its final event (a server that stopped mid-answer)."""
    if not reader.finished:
        raise ModelError(
            f"{url}: the stream ended before its final event ({reader.tokens} tokens)",
            endpoint=url,
            status=status,
        )
    return "".join(reader.text), reader.finish_reason, reader.usage or {}, reader.model


class _HttpxPieces:
    """An httpx response read as it arrives, as an :class:`~brownout.llm.sse.PieceSource`.

    The response's own read timeout -- the attempt's, set when it was sent -- already bounds the
    wait for each piece (raising :class:`httpx.ReadTimeout`), so ``timeout`` is not applied twice.
    """

    __slots__ = ("_pieces",)

    def __init__(self, response: httpx.Response) -> None:
        self._pieces = response.aiter_bytes()

    async def next_piece(self, timeout: float) -> bytes | None:
        return await anext(self._pieces, None)


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(raw: str | None) -> float | None:
    """A ``Retry-After`` header in seconds: delay-seconds or an HTTP-date; None if absent or unreadable."""
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        # An HTTP-date is wall-clock time by definition, so only the wall clock can read it.
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
