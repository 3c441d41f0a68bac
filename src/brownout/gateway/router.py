"""The gateway's engine: model groups of endpoints, and how a chat request finds one that answers.

A request names a model group. The gateway tries the group, then its fallback groups in order; in
each group it makes up to ``max_attempts`` attempts, all within the request's **budget**:

* **The budget** -- ``budget`` seconds from the request's arrival (the group's setting, or the
  request's ``x-brownout-budget`` header) for everything: the wait for admission, every attempt,
  retries, Retry-After waits, fallbacks and a continued stream. Each attempt's timeouts are carved
  from what is left, so no request outlives its budget, whatever fails; when it is spent the client
  gets 504 ``budget_exhausted``.
* **Choice of endpoint** -- :func:`brownout.policies.balance.pick`: among endpoints whose breaker
  permits a call, one not yet tried in this request, then the least expected latency
  ``(in_flight + 1) * latency`` (an exponentially weighted moving average of recent answers), then
  the fewest in flight. So replicas share the load, a slower one gets less of it, and a retry goes to
  another replica when there is one. (Gateway endpoints have no concurrency limiter of their own,
  so the picker's wait for a slot is always 0 here.)
* **A model server shared with the brief pipeline** -- the embedded model's group in ``brownout
  serve`` (:meth:`Gateway.share_slots`): an attempt first waits for one of the server's slots in the
  queue the pipeline's calls wait in, at its priority, until the request's deadline at the latest;
  one that gets none fails as busy -- nothing sent, nothing counted by the breaker.
* **Classify before acting.** What fails an attempt (counted by the endpoint's breaker): connection
  errors, timeouts, HTTP 5xx, 408, 425 and 429, and a stream that breaks before its first token.
  Then:

  - a **timeout** leaves that endpoint for the rest of the request (a silent provider is not asked
    twice), as does a **429 without a hint** (asking again at once only adds to its load);
  - a **429 or 503 with Retry-After** holds the endpoint's breaker open for that long (at most 10
    minutes), so no request hammers it; when no other replica of the group can take the call, the
    hint is at most ``max_retry_after`` and the budget allows, the request waits the hint and tries
    the same endpoint again, else it fails over;
  - other failures may be retried on the same endpoint after a random ``[0, retry_backoff)`` pause.

  What does not fail an attempt -- the other 4xx (400, 401, 403, 404, 413, 422), which blame the
  request -- is passed back as the upstream sent it, not retried, ignored by the breaker: a
  content-policy refusal reaches the caller with the provider's reason. One exception: a request
  refused for its **length** (``context_length_exceeded``) goes to the first fallback group whose
  declared ``context_window`` is larger than the refusing group's, when there is one.
* **Retries** after the first attempt spend the group's retry budget (20 % of the requests of the last
  10 s, plus 10 per second); a spent budget moves on to the fallback groups.
* **Admission** is per requested group: at most ``max_concurrent`` requests served at once, up to
  ``max_queue`` waiting (:class:`~brownout.errors.Overloaded` -> 429 with ``Retry-After``). A fallback
  group serves under the requesting group's admission, so fallback traffic stays bounded by it.

When nothing answered, :class:`GatewayUnavailable` (-> 503, or 504 once the budget is spent) carries
``retry_after``: the soonest any breaker on the path lets a call through (at least 1 s).

The request body is parsed once (by the route) and forwarded as received, or re-serialised only when
an endpoint's ``model`` replaces the group name. Unknown fields pass through untouched; so do the
upstream's response body and headers (hop-by-hop ones aside).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, NoReturn, Protocol, TypeVar

import brownout.gateway.tracing as tracing
from brownout import telemetry
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import CircuitOpen, Overloaded, ServiceUnavailable
from brownout.events import DEFAULT_BUS, EventBus, FallbackServed
from brownout.gateway.cache import cache_key, deterministic
from brownout.gateway.config import GatewayEndpoint, GatewayHedgeSection, GatewaySection, ModelGroup
from brownout.gateway.guard import GuardOutcome, SchemaGuard, requested_schema
from brownout.gateway.stats import EndpointStats, GroupStats
from brownout.gateway.upstream import Pool, Response, UpstreamError, UpstreamTimeout
from brownout.llm.client import SharedEndpoint, is_caller_fault
from brownout.llm.client import _retry_after as parse_retry_after
from brownout.policies.admission import Admission
from brownout.policies.balance import EndpointLoad, pick
from brownout.policies.breaker import BreakerConfig, CircuitBreaker
from brownout.policies.cache import Cache
from brownout.policies.limiter import Permit
from brownout.policies.retry import RetryBudget

__all__ = [
    "MAX_HOLD",
    "Answer",
    "Endpoint",
    "Gateway",
    "GatewayUnavailable",
    "Group",
    "Hedge",
    "Passthrough",
    "Routed",
    "UpstreamFailed",
    "context_overflow",
    "forwarded",
    "retry_after_header",
    "snippet",
]


class Routed(Protocol):
    """What an attempt returns: :meth:`Gateway.route` fills in how it was served."""

    served_by: bytes
    path: bytes
    attempts: int
    upstream: float


R = TypeVar("R", bound=Routed)

MAX_HOLD: Final = 600.0
"""Longest an upstream's ``Retry-After`` may keep its endpoint's breaker open, in seconds."""

_BUDGET_WINDOW: Final = 10.0

# Response headers that describe one hop, not the answer: never forwarded. The body is forwarded as
# it came (so content-encoding, should an upstream compress despite "accept-encoding: identity", is).
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"date",
        b"server",
    }
)


class UpstreamFailed(Exception):
    """One attempt failed in a way that counts against its endpoint (and may be retried elsewhere).

    ``retry_after`` is the upstream's own hint on a 429 or 503, in seconds; ``elapsed`` the time the
    attempt took; ``timed_out`` True when the endpoint said nothing for the time allowed (it is then
    not asked again by the same request).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        elapsed: float,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.elapsed = elapsed
        self.timed_out = timed_out


class Passthrough(Exception):
    """An upstream answer to give the client as it is: the breaker ignores it, nothing retries it."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"upstream answered HTTP {answer.status}")
        self.answer = answer


class GatewayUnavailable(ServiceUnavailable):
    """No endpoint of the group or its fallbacks answered; an HTTP layer answers 503 + ``Retry-After``
    (504 when ``budget_spent``: the request's budget ran out first).

    ``path`` lists the groups tried, ``attempts`` how many upstream calls were made.
    """

    def __init__(
        self,
        group: str,
        message: str,
        *,
        retry_after: float,
        path: list[str],
        attempts: int,
        budget_spent: bool = False,
    ) -> None:
        super().__init__(message, retry_after=retry_after, policy=group)
        self.path = path
        self.attempts = attempts
        self.budget_spent = budget_spent


@dataclass(slots=True)
class Answer:
    """A whole (not streamed) upstream answer, with how it was served."""

    status: int
    headers: list[tuple[bytes, bytes]]
    """The upstream's response headers, hop-by-hop ones removed."""
    body: bytes
    served_by: bytes = b""
    """``group/endpoint`` that answered."""
    path: bytes = b""
    """Groups tried, in order, joined by ``>``; empty when the group asked for answered."""
    attempts: int = 1
    upstream: float = 0.0
    """Seconds spent waiting on upstreams (every attempt)."""
    guard: GuardOutcome | None = None
    """The JSON guard's verdict, when it looked."""


def forwarded(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream response headers worth passing on, names lower-cased."""
    out = []
    for name, value in raw:
        lower = name.lower()
        if lower not in _HOP_BY_HOP:
            out.append((lower, value))
    return out


def snippet(raw: bytes, limit: int = 200) -> str:
    """A one-line excerpt of an upstream body, for error messages."""
    text = " ".join(raw[: limit * 2].decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[:limit] + "..."


class Endpoint:
    """One replica of a group at runtime: its breaker, load, latency average and counters."""

    __slots__ = (
        "breaker",
        "clock",
        "config",
        "head",
        "label",
        "load",
        "model",
        "pool",
        "prefill",
        "served_by",
        "slot_priority",
        "slots",
        "stats",
    )

    def __init__(
        self, group: str, config: GatewayEndpoint, breaker: BreakerConfig, *, clock: Clock, events: EventBus
    ) -> None:
        self.config = config
        self.clock = clock
        self.label = config.label
        """The name in headers and metrics (``name``, else host:port)."""
        self.served_by = f"{group}/{self.label}".encode()
        self.model = config.model
        scheme_host, _, prefix = config.url.partition("://")[2].partition("/")
        headers = {
            "host": scheme_host,
            "content-type": "application/json",
            # identity: the body is forwarded, cached and checked as it is; compression would only
            # cost a decode on every answer.
            "accept-encoding": "identity",
            "user-agent": "brownout-gateway",
            **{k.lower(): v for k, v in config.headers.items()},
        }
        if config.api_key is not None:
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        path = f"/{prefix}/v1/chat/completions" if prefix else "/v1/chat/completions"
        self.head = f"POST {path} HTTP/1.1\r\n{lines}".encode()
        """The request head but its content-length, built once."""
        self.pool: Pool | None = None
        """The endpoint's keep-alive connections, opened by :meth:`Gateway.start`."""
        self.breaker = CircuitBreaker(f"gateway:{group}/{self.label}", breaker, clock=clock, events=events)
        self.load = EndpointLoad()
        """Attempts in flight and the latency average: what the picker ranks by."""
        self.stats = EndpointStats()
        self.prefill: bool | None = config.prefill
        """Whether the endpoint continues a trailing assistant message: from the config, else None
        until a continuation learns it (:mod:`brownout.gateway.stream`)."""
        self.slots: SharedEndpoint | None = None
        """The concurrency limiter of a model server this process also calls for its brief pipeline
        (:meth:`Gateway.share_slots`); None: attempts go straight to the endpoint."""
        self.slot_priority = 0
        """The queue of :attr:`slots` this endpoint's attempts wait in (lower first)."""

    async def take_slot(self, group: str, deadline: float) -> Permit | None:
        """A slot of the shared model server (None when the endpoint shares none), waited for in our
        queue until ``deadline`` at the latest -- never in the server's, where the brief pipeline's
        calls would wait behind the gateway's unseen. A request that gets none in time fails this
        attempt as busy (:class:`UpstreamFailed`, not counted by the breaker: nothing was sent)."""
        share = self.slots
        if share is None:
            return None
        clock = self.clock
        asked = clock.now()
        try:
            return await share.limiter.acquire(
                timeout=max(0.0, deadline - asked), priority=self.slot_priority
            )
        except Overloaded as e:
            self.stats.busy += 1
            raise UpstreamFailed(
                f"{group}/{self.label}: every slot of the model server stayed busy ({e.reason})",
                elapsed=clock.now() - asked,
            ) from e

    def free_slot(self, permit: Permit | None, *, answered: bool) -> None:
        """Give back :meth:`take_slot`'s permit; ``answered``: the server answered (a sign of life
        for the brief pipeline's calls). A gateway answer's length says nothing about the generator's
        calls, so it is not a latency sample for the adaptive limit."""
        if permit is None:
            return
        permit.release(sample=False)
        if answered and self.slots is not None:
            self.slots.last_success = self.clock.now()

    @property
    def available(self) -> bool:
        """True when the endpoint's breaker would let a call through now."""
        return self.breaker.available

    def status(self) -> dict[str, Any]:
        """The endpoint's state for ``/health/gateway``."""
        b = self.breaker
        load = self.load
        return {
            "endpoint": self.label,
            "url": self.config.url,
            "breaker": b.state.value,
            "available": b.available,
            "retry_after": round(b.retry_after(), 3),
            "in_flight": load.in_flight,
            "ewma_latency_ms": None if load.ewma is None else round(load.ewma * 1000.0, 3),
            "requests": self.stats.requests,
            "failures": self.stats.failures,
            # Whether attempts wait for a slot of a model server the brief pipeline shares, and how
            # many found none in time.
            "shares_slots": self.slots is not None,
            "busy": self.stats.busy,
        }


class Hedge:
    """A group's hedged requests: when the second attempt goes, and how many may (see
    :class:`~brownout.gateway.config.GatewayHedgeSection`)."""

    __slots__ = ("_p95", "_recent", "_since", "budget", "fixed")

    MIN_ANSWERS: Final = 20
    """Answers known before the observed p95 is trusted as the delay."""

    def __init__(self, config: GatewayHedgeSection, *, clock: Clock) -> None:
        self.fixed = config.delay
        self.budget = RetryBudget(config.budget_ratio, 0.0, _BUDGET_WINDOW, clock=clock)
        """Hedges allowed per request of the group over the last 10 s."""
        self._recent: deque[float] = deque(maxlen=200)
        self._p95: float | None = None
        self._since = 0

    def observe(self, seconds: float) -> None:
        """Count one answer's latency (a whole answer's, or a stream's first token's)."""
        self._recent.append(seconds)
        self._since += 1
        # Sorting 200 numbers now and then, not on every answer.
        if self._since >= 16 or (self._p95 is None and len(self._recent) >= self.MIN_ANSWERS):
            self._since = 0
            ranked = sorted(self._recent)
            self._p95 = ranked[int(0.95 * (len(ranked) - 1))]

    def delay(self) -> float | None:
        """Seconds to wait for the first attempt before hedging, or None while it is not known."""
        if self.fixed is not None:
            return self.fixed
        return self._p95 if len(self._recent) >= self.MIN_ANSWERS else None


class Group:
    """A model group at runtime: endpoints, admission, retry budget, optional cache, counters."""

    __slots__ = (
        "admission",
        "backoff",
        "budget",
        "cache",
        "chain",
        "config",
        "context_window",
        "endpoints",
        "first_token_timeout",
        "hedge",
        "json_guard",
        "max_attempts",
        "max_retry_after",
        "name",
        "name_bytes",
        "request_budget",
        "stall_timeout",
        "stats",
        "timeout",
    )

    def __init__(self, name: str, config: ModelGroup, *, clock: Clock, events: EventBus) -> None:
        self.name = name
        self.name_bytes = name.encode()
        self.config = config
        breaker = config.breaker.policy().model_copy(update={"ignore_exceptions": (Passthrough,)})
        self.endpoints = tuple(
            Endpoint(name, ep, breaker, clock=clock, events=events) for ep in config.endpoints
        )
        self.admission = Admission(f"gateway:{name}", config.admission.policy(), clock=clock, events=events)
        self.budget = RetryBudget(
            config.retry_budget_ratio, config.retry_budget_min_per_second, _BUDGET_WINDOW, clock=clock
        )
        self.cache: Cache[str, Answer] | None = (
            Cache(f"gateway:{name}", config.cache.policy(), clock=clock, events=events)
            if config.cache.enabled
            else None
        )
        self.timeout = config.timeout
        self.request_budget = config.budget
        """Seconds a request may take in all (its ``x-brownout-budget`` header may say otherwise)."""
        self.first_token_timeout = config.first_token_timeout
        self.stall_timeout = config.stall_timeout
        self.max_retry_after = config.max_retry_after
        self.context_window = config.context_window
        self.hedge = Hedge(config.hedge, clock=clock) if config.hedge.enabled else None
        """The group's hedging, or None when it is off."""
        self.max_attempts = config.max_attempts
        self.backoff = config.retry_backoff
        self.json_guard = config.json_guard
        self.chain: tuple[Group, ...] = (self,)
        """This group, then its fallbacks in order (set by the :class:`Gateway`)."""
        self.stats = GroupStats()

    @property
    def available(self) -> bool:
        """True when some endpoint's breaker would let a call through now."""
        return any(ep.breaker.available for ep in self.endpoints)

    @property
    def shares_slots(self) -> bool:
        """Whether the group's requests wait for slots of a model server it shares with the brief
        pipeline (:meth:`Gateway.share_slots`): there a request may wait long, so one whose client
        left is withdrawn."""
        return any(ep.slots is not None for ep in self.endpoints)

    def retry_after(self) -> float:
        """Seconds until some endpoint may take a call (0 when one can now)."""
        return min(ep.breaker.retry_after() for ep in self.endpoints)

    def status(self) -> dict[str, Any]:
        """The group's state for ``/health/gateway``."""
        adm = self.admission
        return {
            "available": self.available,
            "fallbacks": [g.name for g in self.chain[1:]],
            "in_flight": adm.in_flight,
            "queue_size": adm.queue_size,
            "endpoints": [ep.status() for ep in self.endpoints],
        }


class Gateway:
    """The model groups of a :class:`~brownout.gateway.config.GatewaySection` and the HTTP client.

    :meth:`start` opens a keep-alive connection pool per endpoint (:mod:`brownout.gateway.upstream`
    says why not httpx), :meth:`aclose` closes them. :meth:`complete` serves a whole answer; streams
    are served by :mod:`brownout.gateway.stream` through :meth:`route`.
    """

    def __init__(
        self,
        config: GatewaySection | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config if config is not None else GatewaySection()
        self.clock = clock
        self.events = events
        self._random = (rng if rng is not None else random.Random()).random
        self.groups: dict[str, Group] = {
            name: Group(name, group, clock=clock, events=events) for name, group in self.config.groups.items()
        }
        for name, group in self.groups.items():
            group.chain = (group, *(self.groups[f] for f in self.config.groups[name].fallbacks))
        self.schemas = SchemaGuard()
        self._started = False
        self.models_body = json.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "brownout"}
                    for name in self.groups
                ],
            }
        ).encode()
        """The ``GET /v1/models`` answer, serialised once."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the endpoints' connection pools and start the caches' sweepers."""
        if self._started:
            return
        cfg = self.config
        for group in self.groups.values():
            for ep in group.endpoints:
                # Upstreams are named in the config: no proxy from the environment, no redirects.
                ep.pool = Pool(
                    ep.config.url,
                    connect_timeout=group.config.connect_timeout,
                    max_idle=cfg.max_keepalive,
                    idle_timeout=cfg.keepalive_timeout,
                )
            if group.cache is not None:
                group.cache.start()
        self._started = True

    async def aclose(self) -> None:
        """Close the connection pools and stop the sweepers; safe to call twice."""
        self._started = False
        for group in self.groups.values():
            if group.cache is not None:
                await group.cache.aclose()
            for ep in group.endpoints:
                pool, ep.pool = ep.pool, None
                if pool is not None:
                    pool.close()

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`aclose`."""
        return self._started

    def status(self) -> dict[str, Any]:
        """Every group's state, for ``/health/gateway``."""
        groups = {name: g.status() for name, g in self.groups.items()}
        up = sum(1 for g in self.groups.values() if g.available)
        if not self.groups:
            state = "disabled"
        elif up == len(self.groups):
            state = "healthy"
        elif up:
            state = "degraded"
        else:
            state = "unhealthy"
        return {"status": state, "groups": groups}

    # ------------------------------------------------------------------ whole answers

    async def complete(
        self, group: Group, body: dict[str, Any], raw: bytes | None, deadline: float | None = None
    ) -> tuple[Answer, str | None]:
        """A whole answer to ``body`` from ``group`` (or its fallbacks), and the cache's word.

        The cache's word is None when the group has no cache, else ``"hit"``, ``"miss"`` or
        ``"bypass"`` (not a deterministic request). ``raw`` is the body as received (forwarded as it
        is where no model name is replaced), or None to serialise ``body``. ``deadline``: the clock
        time by which the request must be answered (default: the group's budget from now). Raises
        :class:`~brownout.errors.Overloaded` when the group's admission sheds the request and
        :class:`GatewayUnavailable` when nothing answered.
        """
        if deadline is None:
            deadline = self.clock.now() + group.request_budget
        cache = group.cache
        if cache is None:
            return await group.admission.call(self._serve, group, body, raw, deadline), None
        if not deterministic(body):
            return await group.admission.call(self._serve, group, body, raw, deadline), "bypass"
        try:
            result = await cache.fetch(
                cache_key(group.name, body), functools.partial(self._cacheable, group, body, raw, deadline)
            )
        except _Uncacheable as e:
            group.stats.cache["miss"] += 1
            return e.answer, "miss"
        if result.status == "hit":
            group.stats.cache["hit"] += 1
            return replace(result.value, upstream=0.0), "hit"
        group.stats.cache["miss"] += 1
        return result.value, "miss"

    async def _cacheable(
        self, group: Group, body: dict[str, Any], raw: bytes | None, deadline: float
    ) -> Answer:
        # Runs once for all concurrent identical requests (the cache's singleflight), under one slot.
        answer: Answer = await group.admission.call(self._serve, group, body, raw, deadline)
        if answer.status != 200 or answer.guard == "invalid":
            raise _Uncacheable(answer)
        return answer

    async def _serve(self, group: Group, body: dict[str, Any], raw: bytes | None, deadline: float) -> Answer:
        try:
            if group.hedge is None:
                answer = await self.route(group, body, raw, self._post, deadline=deadline)
            else:
                answer = await self.hedged(
                    group,
                    lambda trail: self.route(group, body, raw, self._post, deadline=deadline, trail=trail),
                )
        except Passthrough as e:
            return e.answer
        if group.json_guard and answer.status == 200:
            schema = requested_schema(body)
            if schema is not None:
                answer = await self._guard(group, body, schema, answer, deadline)
        return answer

    async def _guard(
        self, group: Group, body: dict[str, Any], schema: dict[str, Any], first: Answer, deadline: float
    ) -> Answer:
        """Check a whole answer against the request's schema; re-ask once with the problems if it fails."""

        async def ask(again: dict[str, Any]) -> Answer | None:
            try:
                answer = await self.route(group, again, None, self._post, deadline=deadline)
            except (GatewayUnavailable, Passthrough):
                return None
            return answer if answer.status == 200 else None

        answer, outcome = await self.schemas.run(schema, body, first, ask)
        answer.guard = outcome
        if outcome != "skipped":
            group.stats.guard[outcome] += 1
        if answer is not first:  # the re-asked answer: it carries the first one's cost too
            answer.upstream += first.upstream
            answer.attempts += first.attempts
        return answer

    async def _post(self, group: Group, ep: Endpoint, content: bytes, deadline: float) -> Answer:
        """One attempt on ``ep`` through its breaker (a permit is taken before any await), in a slot
        of the model server when it shares one (:meth:`Endpoint.take_slot`)."""
        if ep.slots is None:
            answer: Answer = await ep.breaker.call(self._send, group, ep, content, deadline)
            return answer
        slot = await ep.take_slot(group.name, deadline)
        answered = False
        try:
            answer = await ep.breaker.call(self._send, group, ep, content, deadline)
            answered = True
        except Passthrough:
            answered = True
            raise
        finally:
            ep.free_slot(slot, answered=answered)
        return answer

    def share_slots(self, group: str, share: SharedEndpoint, *, priority: int) -> None:
        """Let ``group``'s endpoints wait for ``share``'s slots, in the queue of ``priority``: the
        group of a model server that the brief pipeline calls too (the embedded model), so that the
        requests in flight to it, of both, never exceed its slots and neither queues inside it."""
        for ep in self.groups[group].endpoints:
            ep.slots = share
            ep.slot_priority = priority

    async def send(self, group: Group, ep: Endpoint, content: bytes, timeout: float) -> Response:
        """POST ``content`` to ``ep``; returns once the answer's head has arrived (body not yet read),
        waiting at most ``timeout`` seconds for it."""
        pool = ep.pool
        if pool is None:
            raise UpstreamError("the gateway is not started")
        head = ep.head
        if telemetry.SWITCH.tracer is not None:
            # The attempt's span is current: the upstream may join the trace (W3C traceparent).
            head += telemetry.header_lines()
        return await pool.request(head + b"content-length: %d\r\n\r\n" % len(content) + content, timeout)

    async def _send(self, group: Group, ep: Endpoint, content: bytes, deadline: float) -> Answer:
        clock = self.clock
        stats = ep.stats
        stats.requests += 1
        load = ep.load
        load.begin()
        start = clock.now()
        # Each wait for the upstream within the group's timeout, and never past the request's deadline.
        limit = min(group.timeout, deadline - start)
        try:
            response = await self.send(group, ep, content, limit)
            body = await response.read(max(0.001, min(group.timeout, deadline - clock.now())))
        except UpstreamTimeout as e:
            elapsed = clock.now() - start
            load.observe(elapsed)
            stats.failures += 1
            raise UpstreamFailed(
                f"{group.name}/{ep.label}: no answer within {limit:g}s ({e})", elapsed=elapsed, timed_out=True
            ) from e
        except UpstreamError as e:
            stats.failures += 1
            raise UpstreamFailed(f"{group.name}/{ep.label}: {e}", elapsed=clock.now() - start) from e
        finally:
            load.end()
        elapsed = clock.now() - start
        status = response.status
        if status < 400:
            load.observe(elapsed)
            stats.latency.observe(elapsed)
            return Answer(status, forwarded(response.headers), body, upstream=elapsed)
        self.refuse(group, ep, response, body, elapsed)

    def refuse(self, group: Group, ep: Endpoint, response: Response, body: bytes, elapsed: float) -> NoReturn:
        """Judge an upstream error status: raise Passthrough (the request's fault) or UpstreamFailed."""
        status = response.status
        if is_caller_fault(status):
            raise Passthrough(
                Answer(status, forwarded(response.headers), body, served_by=ep.served_by, upstream=elapsed)
            )
        ep.stats.failures += 1
        hint = None
        if status in (429, 503):
            raw = response.header(b"retry-after")
            hint = parse_retry_after(raw.decode("latin-1")) if raw is not None else None
        raise UpstreamFailed(
            f"{group.name}/{ep.label}: HTTP {status}: {snippet(body)}",
            status=status,
            retry_after=hint,
            elapsed=elapsed,
        )

    # ------------------------------------------------------------------ hedged requests

    async def hedged(
        self,
        group: Group,
        run: Callable[[list[Endpoint] | None], Awaitable[R]],
        discard: Callable[[R], Awaitable[None]] | None = None,
    ) -> R:
        """``run(trail)`` (a :meth:`route`), and once more alongside when the first is slow (the
        group's hedging); the first to answer wins and the other is cancelled.

        Both runs share ``trail``, the endpoints tried so far, so the hedge goes to another endpoint
        than the slow one when there is one. A :class:`Passthrough` is an answer too (it wins); a
        :class:`GatewayUnavailable` waits for the other run. ``discard`` releases a result that lost
        the race after it was made (an opened stream). Without hedging, or while its delay is
        unknown, this is ``await run(None)``.
        """
        hedge = group.hedge
        if hedge is None:
            return await run(None)
        hedge.budget.record_call()
        delay = hedge.delay()
        if delay is None:
            return await run(None)
        trail: list[Endpoint] = []
        first: asyncio.Future[R] = asyncio.ensure_future(run(trail))
        timer: asyncio.Future[Any] = asyncio.ensure_future(self.clock.sleep(delay))
        runs: set[asyncio.Future[Any]] = {first}
        try:
            await asyncio.wait((first, timer), return_when=asyncio.FIRST_COMPLETED)
            if not first.done() and hedge.budget.try_spend():
                group.stats.hedges["sent"] += 1
                second = run(trail) if telemetry.SWITCH.tracer is None else tracing.hedge(run, trail, group)
                runs.add(asyncio.ensure_future(second))
            failure: BaseException | None = None
            while runs:
                done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    runs.discard(task)
                    error = task.exception()
                    if error is None or isinstance(error, Passthrough):
                        if task is not first:
                            group.stats.hedges["won"] += 1
                        await _cancel_all(runs, discard)
                        if error is not None:
                            raise error
                        result: R = task.result()
                        return result
                    failure = failure or error
            assert failure is not None
            raise failure
        finally:
            timer.cancel()
            await _cancel_all(runs, discard)

    # ------------------------------------------------------------------ the routing loop

    async def route(
        self,
        group: Group,
        body: Mapping[str, Any],
        raw: bytes | None,
        attempt: Callable[[Group, Endpoint, bytes, float], Awaitable[R]],
        *,
        deadline: float,
        skip: Collection[Endpoint] = (),
        content_for: Callable[[Endpoint], bytes] | None = None,
        trail: list[Endpoint] | None = None,
    ) -> R:
        """Run ``attempt(group, endpoint, content, deadline)`` on the group's endpoints, then its fallbacks'.

        ``attempt`` raises :class:`UpstreamFailed` for a failure to retry elsewhere and
        :class:`Passthrough` for an answer to return at once; what it returns gets ``served_by``,
        ``path``, ``attempts`` and ``upstream`` set (or, for a Passthrough, the answer in it).
        ``deadline``: the clock time the request must be done by (no attempt starts after it, and
        each attempt is given it to carve its timeouts from). ``skip``: endpoints not to try at all
        (a continued stream's broken ones). ``content_for``: the body to send to an endpoint, when it
        is not ``body`` (with the endpoint's ``model``). ``trail``: endpoints tried by a run racing
        this one (a hedge), tried here only when no other can be, and added to as this run tries
        more. Raises :class:`GatewayUnavailable` when no attempt succeeded.
        """
        clock = self.clock
        errors: list[str] | None = None
        path: list[str] | None = None
        attempts = 0
        waited = 0.0
        spent = False
        contents: dict[str | None, bytes] = {}
        left: set[Endpoint] | None = set(skip) if skip else None
        chain = group.chain
        i = 0
        while i < len(chain):
            g = chain[i]
            i += 1
            if g is not group:
                path = [group.name] if path is None else path
                path.append(g.name)
            budget = g.budget
            budget.record_call()
            tried: list[Endpoint] | None = list(trail) if trail else None
            hinted = False  # an endpoint of this group asked to be called again shortly (Retry-After)
            n = 0
            while n < g.max_attempts:
                if clock.now() >= deadline:
                    spent = True
                    break
                ep = _pick(g, tried, left)
                resumed = False
                if ep is None and hinted:
                    # Only hinted endpoints are left: wait for the soonest one when worth it.
                    wait = min(
                        (e.breaker.retry_after() for e in g.endpoints if left is None or e not in left),
                        default=math.inf,
                    )
                    if wait <= g.max_retry_after and clock.now() + wait < deadline:
                        await clock.sleep(wait)
                        ep = _pick(g, tried, left)
                        resumed = True
                if ep is None:
                    break
                if n:
                    if not budget.try_spend():
                        errors = _note(errors, f"{g.name}: retry budget exhausted")
                        break
                    if not resumed and tried is not None and ep in tried and g.backoff > 0:
                        await clock.sleep(min(g.backoff * self._random(), max(0.0, deadline - clock.now())))
                        ep = _pick(g, tried, left)
                        if ep is None:
                            break
                n += 1
                attempts += 1
                if trail is not None:
                    trail.append(ep)
                if content_for is not None:
                    content = content_for(ep)
                elif (known := contents.get(ep.model)) is not None:
                    content = known
                else:
                    content = contents[ep.model] = _content(body, raw, ep.model)
                try:
                    if telemetry.SWITCH.tracer is None:
                        result = await attempt(g, ep, content, deadline)
                    else:
                        result = await tracing.attempt(attempt, group, g, ep, content, deadline, attempts)
                except Passthrough as e:
                    answer = e.answer
                    larger = _larger_context(chain, i - 1) if context_overflow(answer) else None
                    if larger is not None:
                        # Refused for its length: a fallback that declares a larger context may take it.
                        errors = _note(errors, f"{g.name}/{ep.label}: the request is over its context window")
                        waited += answer.upstream
                        i = larger
                        break
                    answer.attempts = attempts
                    answer.path = _path(path)
                    answer.upstream += waited
                    raise
                except UpstreamFailed as e:
                    waited += e.elapsed
                    errors = _note(errors, str(e))
                    tried = [ep] if tried is None else [*tried, ep]
                    hint = e.retry_after
                    if hint is not None and hint > 0:
                        # The endpoint said when to come back: no request calls it before then.
                        ep.breaker.open_for(min(hint, MAX_HOLD), f"upstream Retry-After {hint:g}s")
                        hinted = hinted or hint <= g.max_retry_after
                    elif e.timed_out or e.status == 429:
                        # Silent, or rate-limited without a hint: asking it again now would only wait
                        # again or add to its load.
                        left = {ep} if left is None else left | {ep}
                    continue
                except CircuitOpen:
                    # The permit went between the pick and the attempt (the pick found it available
                    # and the attempt takes it before any await, so only a pause allows this).
                    tried = [ep] if tried is None else [*tried, ep]
                    continue
                if group.hedge is not None:
                    group.hedge.observe(result.upstream)
                result.served_by = ep.served_by
                result.path = _path(path)
                result.attempts = attempts
                result.upstream += waited
                if g is not group:
                    group.stats.fallbacks[g.name] += 1
                    if self.events.active:
                        self.events.emit(
                            FallbackServed(f"gateway:{group.name}", clock.now(), g.name, group.chain.index(g))
                        )
                return result
            if spent:
                break
            if n == 0:
                if left is not None and all(ep in left for ep in g.endpoints):
                    errors = _note(errors, f"{g.name}: no endpoint left to ask")
                else:
                    errors = _note(errors, f"{g.name}: every endpoint's breaker is open")
        retry_after = max(1.0, min(g.retry_after() for g in group.chain))
        names = [group.name] if path is None else path
        detail = "; ".join(errors or ())
        if spent:
            message = f"the request's budget ran out after {attempts} attempt(s) on {' > '.join(names)}"
        else:
            message = f"no endpoint of {' > '.join(names)} could answer ({attempts} attempt(s))"
        raise GatewayUnavailable(
            group.name,
            f"{message}: {detail}" if detail else message,
            retry_after=retry_after,
            path=names,
            attempts=attempts,
            budget_spent=spent,
        )


async def _cancel_all(
    runs: set[asyncio.Future[Any]], discard: Callable[[Any], Awaitable[None]] | None
) -> None:
    """Cancel the runs that lost a hedged race, releasing (``discard``) any that answered meanwhile."""
    for task in runs:
        task.cancel()
    for task in list(runs):
        runs.discard(task)
        try:
            result = await task
        except BaseException:  # cancelled, or failed: nothing to release
            continue
        if discard is not None:
            await discard(result)


def _pick(group: Group, tried: list[Endpoint] | None, left: set[Endpoint] | None) -> Endpoint | None:
    """The endpoint for the next attempt; ``left``: endpoints this request will not call again."""
    if left is None:
        return pick(group.endpoints, tried)
    return pick([ep for ep in group.endpoints if ep not in left], tried)


def _larger_context(chain: tuple[Group, ...], at: int) -> int | None:
    """The index of the first group after ``chain[at]`` that declares a larger context window."""
    own = chain[at].context_window
    for j in range(at + 1, len(chain)):
        window = chain[j].context_window
        if window is not None and (own is None or window > own):
            return j
    return None


_OVERFLOW_CODES: Final = frozenset({"context_length_exceeded", "string_above_max_length"})
_OVERFLOW_WORDS: Final = (
    "context length",
    "context window",
    "context_length_exceeded",
    "maximum context",
    "too many tokens",
    "prompt is too long",
    "input is too long",
)


def context_overflow(answer: Answer) -> bool:
    """True when an upstream refused the request for its length (OpenAI's ``context_length_exceeded``,
    or the words other servers -- vLLM, llama.cpp, Anthropic's -- use for it)."""
    if answer.status not in (400, 413, 422):
        return False
    body = answer.body
    if len(body) > 65_536:
        return False
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and error.get("code") in _OVERFLOW_CODES:
        return True
    text = body.decode("utf-8", "replace").lower()
    return any(words in text for words in _OVERFLOW_WORDS)


class _Uncacheable(Exception):
    """An answer that must not be cached (an error passed back, a guard that gave up)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("not cacheable")
        self.answer = answer


def _content(body: Mapping[str, Any], raw: bytes | None, model: str | None) -> bytes:
    """The request body to send: as received when nothing changes, else re-serialised."""
    if model is None or model == body.get("model"):
        if raw is not None:
            return raw
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps({**body, "model": model}, separators=(",", ":"), ensure_ascii=False).encode()


def _path(path: list[str] | None) -> bytes:
    return b"" if path is None else ">".join(path).encode()


def _note(errors: list[str] | None, message: str) -> list[str]:
    if errors is None:
        return [message]
    errors.append(message)
    return errors


def retry_after_header(seconds: float) -> bytes:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds))).encode()
