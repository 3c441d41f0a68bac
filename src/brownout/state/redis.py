"""Redis as shared state: a health detector and a shared cache with a local front that keeps answering.

A Redis outage must never stop the service: it is detected (PING, SET and GET of a probe key,
"degraded" when that takes over 100 ms, fallback mode after 3 consecutive failures), and meanwhile the
in-process cache keeps answering.

* :class:`RedisHealthDetector` runs that check on demand (:meth:`~RedisHealthDetector.check`) or every
  ``interval`` seconds in the background (:meth:`~RedisHealthDetector.start`). Its ``status`` is
  ``"healthy"``, ``"degraded"`` (the check was slow, or failed fewer than ``failures_to_fallback`` times
  in a row) or ``"fallback"`` (it failed that many times in a row). Fallback lasts until a check
  succeeds -- that is what brings Redis back, so run the background loop wherever a detector gates
  traffic. Every successful check (slow ones too) resets the failure count, so only failures in a row
  lead to fallback, and failures reported by the users of Redis
  (:meth:`~RedisHealthDetector.record_failure`) count as well, so fallback starts as soon as real
  traffic sees the outage.
* :class:`SharedCache` is a cache shared by replicas through Redis, with a
  :class:`~brownout.policies.cache.Cache` in front of it in each process. Reads try the local front,
  then Redis; every Redis operation is bounded by ``redis_timeout`` (100 ms, the per-operation
  budget for a degraded Redis), and a Redis error or timeout never reaches the caller: it is counted,
  reported to the detector, and the call is answered from the local front. While the detector is in
  fallback, Redis is not tried at all ("local-only" mode).

Timing comes from the injected clock (deadlines and the background loop), as everywhere in brownout.
Build the redis client with few or no connection retries (``retry=Retry(NoBackoff(), 0)``): the
deadlines bound every operation anyway, and redis-py's default backoff would only spend that budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar

from pydantic import Field, model_validator
from redis.asyncio import Redis

from brownout.background import Periodic
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.events import DEFAULT_BUS, EventBus, RedisStatusChanged
from brownout.policies._base import PolicyConfig
from brownout.policies.cache import Cache, CacheConfig
from brownout.policies.deadline import deadline

__all__ = [
    "RedisHealth",
    "RedisHealthConfig",
    "RedisHealthDetector",
    "RedisStatus",
    "Serializer",
    "SharedCache",
    "SharedCacheConfig",
    "SharedCacheStats",
]

_log = logging.getLogger("brownout.state.redis")

T = TypeVar("T")


def _retrieve(task: asyncio.Future[Any]) -> None:
    # An abandoned operation may still end with an error; fetch it so asyncio does not log
    # "exception was never retrieved" for something the caller has already been answered about.
    if not task.cancelled():
        task.exception()


async def _bounded(op: Awaitable[T], timeout: float, clock: Clock, events: EventBus, name: str) -> T:
    """Await ``op`` for at most ``timeout`` seconds of ``clock`` time (raises DeadlineExceeded after).

    The operation runs in a task of its own and is awaited through :func:`asyncio.shield`, so the
    deadline's cancellation lands on this coroutine rather than inside the client library: redis-py
    can absorb a cancellation that arrives while it sets up or tears down a connection, and an
    operation on a frozen server would then hang until its socket timeout (seen here: 5 s instead of
    0.1 s). The abandoned operation is cancelled and left to finish on its own.
    """
    task = asyncio.ensure_future(op)
    try:
        async with deadline(timeout, clock=clock, events=events, name=name):
            return await asyncio.shield(task)
    except BaseException:
        if not task.done():
            task.cancel()
            task.add_done_callback(_retrieve)
        raise


RedisStatus = Literal["healthy", "degraded", "fallback"]
"""What a :class:`RedisHealthDetector` thinks of its Redis."""


class RedisHealthConfig(PolicyConfig):
    """Settings of a :class:`RedisHealthDetector`; by default slow above 100 ms, fallback after 3 failures."""

    degraded_after: float = Field(default=0.1, ge=0, description="A check slower than this (s) is degraded.")
    failures_to_fallback: int = Field(
        default=3, ge=1, description="Consecutive failures after which the detector is in fallback."
    )
    check_timeout: float = Field(
        default=1.0, gt=0, description="Seconds one check (PING, SET, GET) may take."
    )
    interval: float = Field(default=5.0, gt=0, description="Seconds between background checks.")


@dataclass(frozen=True, slots=True)
class RedisHealth:
    """The result of one check: the detector's ``status`` after it, and what the check saw.

    ``latency`` is the seconds PING + SET + GET took (None when the check failed), ``error`` the failure
    (empty on success), ``consecutive_failures`` the failures in a row so far, ``at`` the clock time.
    """

    status: RedisStatus
    latency: float | None
    error: str
    consecutive_failures: int
    at: float

    @property
    def ok(self) -> bool:
        """Whether the check itself succeeded (a slow success is still ok)."""
        return self.latency is not None


class RedisHealthDetector:
    """Watches one Redis with PING/SET/GET checks; decides healthy, degraded or fallback.

    The probe key is unique to this detector (``brownout:health:<name>:<random>``) so replicas checking
    one Redis do not overwrite each other's probes, and it expires on its own (TTL of a few intervals).
    Emits :class:`~brownout.events.RedisStatusChanged` when the status changes.
    """

    __slots__ = (
        "_checking",
        "_client",
        "_clock",
        "_consecutive_failures",
        "_events",
        "_last_error",
        "_last_latency",
        "_probe_key",
        "_probe_ttl_ms",
        "_probes",
        "_status",
        "config",
        "name",
    )

    def __init__(
        self,
        client: Redis,
        *,
        name: str = "redis",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        degraded_after: float = 0.1,
        failures_to_fallback: int = 3,
        check_timeout: float = 1.0,
        interval: float = 5.0,
    ) -> None:
        self.name = name
        """Names this detector in events."""
        self.config = RedisHealthConfig(
            degraded_after=degraded_after,
            failures_to_fallback=failures_to_fallback,
            check_timeout=check_timeout,
            interval=interval,
        )
        """The validated settings."""
        self._client = client
        self._clock = clock
        self._events = events
        self._probe_key = f"brownout:health:{name}:{uuid.uuid4().hex}"
        # Long enough to survive until the next check, short enough not to litter a Redis whose
        # replicas come and go.
        self._probe_ttl_ms = max(1000, int((interval * 3 + check_timeout) * 1000))
        self._probes = 0
        # Optimistic start: until a check says otherwise, Redis is used.
        self._status: RedisStatus = "healthy"
        self._consecutive_failures = 0
        self._last_latency: float | None = None
        self._last_error = ""
        self._checking = Periodic(
            f"{name}-health", self.check, lambda: self.config.interval, clock=clock, logger=_log
        )

    @property
    def status(self) -> RedisStatus:
        """``"healthy"``, ``"degraded"`` or ``"fallback"``."""
        return self._status

    @property
    def fallback(self) -> bool:
        """Whether Redis should not be used now (the detector is in fallback mode)."""
        return self._status == "fallback"

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row (checks and reported ones) since the last success."""
        return self._consecutive_failures

    @property
    def last_latency(self) -> float | None:
        """Seconds the last successful check took, or None before any."""
        return self._last_latency

    @property
    def last_error(self) -> str:
        """The last failure seen (``"TypeName: message"``), or empty."""
        return self._last_error

    async def check(self) -> RedisHealth:
        """Run PING, SET and GET of the probe key within ``check_timeout``; update and return the status."""
        clock = self._clock
        self._probes += 1
        token = str(self._probes)
        start = clock.now()
        try:
            got = await _bounded(
                self._probe(token), self.config.check_timeout, clock, self._events, self.name
            )
            if isinstance(got, bytes):
                got = got.decode()
            if got != token:
                raise ValueError(f"probe key read back {got!r}, expected {token!r}")
        except Exception as e:  # any failure of the check is what we measure, not a bug to raise
            self.record_failure(e)
            return RedisHealth(self._status, None, self._last_error, self._consecutive_failures, clock.now())
        now = clock.now()
        latency = now - start
        self._last_latency = latency
        self._consecutive_failures = 0
        if latency > self.config.degraded_after:
            self._set_status("degraded", f"check took {latency * 1000:.1f} ms", now)
        else:
            self._set_status("healthy", f"check took {latency * 1000:.1f} ms", now)
        return RedisHealth(self._status, latency, "", 0, now)

    async def _probe(self, token: str) -> Any:
        client = self._client
        await client.ping()
        await client.set(self._probe_key, token, px=self._probe_ttl_ms)
        return await client.get(self._probe_key)

    def record_failure(self, error: BaseException | str) -> None:
        """Count a failed Redis operation (a check, or real traffic); may move to degraded or fallback."""
        self._last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.config.failures_to_fallback:
            new: RedisStatus = "fallback"
        elif self._status == "fallback":
            return  # unreachable in practice: only a success leaves fallback
        else:
            new = "degraded"
        self._set_status(new, self._last_error, self._clock.now())

    def record_success(self) -> None:
        """Reset the failure count after a successful operation (the status changes only on checks)."""
        self._consecutive_failures = 0

    def _set_status(self, new: RedisStatus, reason: str, now: float) -> None:
        old = self._status
        if new == old:
            return
        self._status = new
        if self._events.active:
            self._events.emit(RedisStatusChanged(self.name, now, old, new, reason))

    # -- background loop ------------------------------------------------------------------------

    def start(self) -> None:
        """Start checking every ``interval`` seconds in the background (idempotent; needs a running loop)."""
        self._checking.start()

    @property
    def running(self) -> bool:
        """Whether the background loop runs."""
        return self._checking.running

    async def aclose(self) -> None:
        """Stop the background loop (the detector keeps its last status and can be started again)."""
        await self._checking.stop()

    async def __aenter__(self) -> Self:
        """Start the background loop."""
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the background loop."""
        await self.aclose()

    def __repr__(self) -> str:
        return f"<RedisHealthDetector {self.name!r} {self._status} failures={self._consecutive_failures}>"


class Serializer(Protocol):
    """How :class:`SharedCache` turns values into Redis strings and back (the :mod:`json` module fits)."""

    def dumps(self, obj: Any, /) -> str | bytes:
        """Encode a value."""

    def loads(self, s: str | bytes, /) -> Any:
        """Decode a value."""


class SharedCacheConfig(PolicyConfig):
    """Settings of a :class:`SharedCache`."""

    prefix: str = Field(default="brownout:cache:", description="Prepended to every key in Redis.")
    ttl: float = Field(
        default=600.0, gt=0, description="Seconds a value lives in Redis unless set otherwise."
    )
    redis_timeout: float = Field(
        default=0.1, gt=0, description="Seconds one Redis operation may take (default 100 ms)."
    )

    @model_validator(mode="after")
    def _prefix_not_empty(self) -> Self:
        # Without a prefix a cache would share key space with everything else in the Redis database.
        if not self.prefix:
            raise ValueError("prefix must not be empty")
        return self


@dataclass(frozen=True, slots=True)
class SharedCacheStats:
    """Counters of a :class:`SharedCache`.

    Every :meth:`SharedCache.get` counts exactly one of ``local_hits``, ``redis_hits`` and ``misses``;
    ``redis_errors`` counts failed or timed-out Redis operations (of any kind). ``mode`` is
    ``"local-only"`` while the detector is in fallback, else ``"redis"``.
    """

    local_hits: int
    redis_hits: int
    misses: int
    redis_errors: int
    mode: Literal["redis", "local-only"]


class SharedCache:
    """A cache shared through Redis, with an in-process :class:`~brownout.policies.cache.Cache` in front.

    ``get`` answers from the local front when it holds a fresh value, else from Redis (the value is then
    kept in the front). ``set`` stores in both. Redis failures and timeouts (``redis_timeout`` per
    operation) never raise: the cache keeps answering from the local front and reports the
    failure to ``detector``; while the detector is in fallback, Redis is skipped altogether.

    Trade-offs to know: a value in the local front is served until it expires there (its ``ttl``,
    by default the same as Redis's), so another replica's update or delete of that key is seen only
    after that -- pass a ``local`` cache with a shorter ``ttl`` when that matters. ``None`` cannot be
    cached (a get answers ``None`` for a miss). Values go through ``serializer`` (JSON by default).
    """

    __slots__ = (
        "_client",
        "_clock",
        "_detector",
        "_dumps",
        "_events",
        "_loads",
        "_local",
        "_local_hits",
        "_misses",
        "_prefix",
        "_redis_errors",
        "_redis_hits",
        "_timeout",
        "_ttl_ms",
        "config",
        "name",
    )

    def __init__(
        self,
        client: Redis,
        *,
        name: str = "cache",
        prefix: str = "brownout:cache:",
        ttl: float = 600.0,
        local: Cache[str, Any] | None = None,
        detector: RedisHealthDetector | None = None,
        serializer: Serializer = json,
        redis_timeout: float = 0.1,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.name = name
        """Names this cache in events."""
        self.config = SharedCacheConfig(prefix=prefix, ttl=ttl, redis_timeout=redis_timeout)
        """The validated settings."""
        self._client = client
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl * 1000))
        self._timeout = redis_timeout
        self._local: Cache[str, Any] = (
            local
            if local is not None
            else Cache(f"{name}.local", CacheConfig(max_entries=1000, ttl=ttl), clock=clock, events=events)
        )
        self._detector = detector
        self._dumps = serializer.dumps
        self._loads = serializer.loads
        self._clock = clock
        self._events = events
        self._local_hits = 0
        self._redis_hits = 0
        self._misses = 0
        self._redis_errors = 0

    @property
    def local(self) -> Cache[str, Any]:
        """The in-process front cache."""
        return self._local

    @property
    def detector(self) -> RedisHealthDetector | None:
        """The health detector that gates Redis, if any."""
        return self._detector

    def _skip_redis(self) -> bool:
        detector = self._detector
        return detector is not None and detector.fallback

    def _failed(self, error: BaseException) -> None:
        self._redis_errors += 1
        if self._detector is not None:
            self._detector.record_failure(error)

    def _succeeded(self) -> None:
        # Only touch the detector when there is a failure streak to end (keeps the success path lean).
        detector = self._detector
        if detector is not None and detector.consecutive_failures:
            detector.record_success()

    def _bounded(self, op: Awaitable[T]) -> Coroutine[Any, Any, T]:
        return _bounded(op, self._timeout, self._clock, self._events, self.name)

    async def get(self, key: str) -> Any | None:
        """The value for ``key`` from the local front, else Redis, else ``None``; never raises for Redis."""
        value = self._local.get(key)
        if value is not None:
            self._local_hits += 1
            return value
        if self._skip_redis():
            self._misses += 1
            return None
        try:
            raw = await self._bounded(self._client.get(self._prefix + key))
            value = None if raw is None else self._loads(raw)
        except Exception as e:  # Redis down, slow or holding garbage: answer without it
            self._failed(e)
            self._misses += 1
            return None
        self._succeeded()
        if value is None:
            self._misses += 1
            return None
        self._local.set(key, value)
        self._redis_hits += 1
        return value

    async def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` locally and, best effort, in Redis for ``ttl`` seconds (default: the config's).

        Returns whether Redis took it. A value the serializer cannot encode raises (a caller's bug).
        """
        data = self._dumps(value)
        self._local.set(key, value, ttl=ttl)
        if self._skip_redis():
            return False
        ttl_ms = self._ttl_ms if ttl is None else max(1, round(ttl * 1000))
        try:
            await self._bounded(self._client.set(self._prefix + key, data, px=ttl_ms))
        except Exception as e:  # best effort: the local copy still serves this replica
            self._failed(e)
            return False
        self._succeeded()
        return True

    async def delete(self, key: str) -> bool:
        """Remove ``key`` locally and, best effort, from Redis; returns whether Redis took the delete."""
        self._local.delete(key)
        if self._skip_redis():
            return False
        try:
            await self._bounded(self._client.delete(self._prefix + key))
        except Exception as e:  # best effort, as for set
            self._failed(e)
            return False
        self._succeeded()
        return True

    @property
    def mode(self) -> Literal["redis", "local-only"]:
        """``"local-only"`` while the detector is in fallback, else ``"redis"``."""
        return "local-only" if self._skip_redis() else "redis"

    def stats(self) -> SharedCacheStats:
        """A snapshot of the counters and the mode."""
        return SharedCacheStats(
            self._local_hits, self._redis_hits, self._misses, self._redis_errors, self.mode
        )

    def __repr__(self) -> str:
        return f"<SharedCache {self.name!r} {self.mode}>"
