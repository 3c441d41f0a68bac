"""The Redis side of ``brownout serve``: what replicas share when ``redis.url`` is configured.

One Redis client feeds four parts, each of which keeps the service answering when Redis does not:

* a :class:`~brownout.state.redis.RedisHealthDetector` (ping/set/get; over 100 ms is degraded, 3
  failures in a row is fallback, when Redis is not used at all) whose background check also brings
  Redis back;
* :class:`~brownout.state.breaker.RedisBreakers`: one breaker state per configured endpoint across
  replicas (local model servers are per replica, so their breakers stay local);
* a :class:`~brownout.state.redis.SharedCache` behind the brief service's LRU;
* a :class:`~brownout.state.singleflight.RedisSingleflight`: one computation per key across replicas;
* shared health checks: per interval, one replica probes each configured endpoint and the others
  read its results (the models' health checks, cheap for the models however many replicas there are).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from brownout.clock import WALL_CLOCK, Clock
from brownout.config import RedisSection
from brownout.events import EventBus
from brownout.llm.types import ProbeResult
from brownout.policies.cache import Cache
from brownout.state.breaker import RedisBreakers
from brownout.state.redis import RedisHealthDetector, SharedCache, _bounded
from brownout.state.singleflight import RedisSingleflight

__all__ = ["SharedState"]


class SharedState:
    """The Redis-backed parts built from the ``redis`` config section (see the module docstring)."""

    def __init__(
        self, section: RedisSection, *, clock: Clock, events: EventBus, wall: Clock = WALL_CLOCK
    ) -> None:
        if section.url is None:
            raise ValueError("SharedState needs redis.url")
        self.section = section
        self.clock = clock
        self.events = events
        # No client-side retries: every operation is bounded by our own timeouts, and a retry with
        # backoff would only spend that budget. socket_timeout bounds a Redis that hangs.
        self.client: Redis = Redis.from_url(
            section.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=max(section.timeout * 5, 0.5),
            socket_timeout=max(section.timeout * 10, 1.0),
        )
        self.detector = RedisHealthDetector(
            self.client, name="redis", clock=clock, events=events, interval=section.health_interval
        )
        self.breakers = RedisBreakers(
            self.client,
            prefix=f"{section.prefix}:breaker",
            sync_interval=section.breaker_sync_interval,
            probe_lease=section.probe_lease,
            timeout=max(section.timeout, 0.2),
            clock=wall,  # open-until times are compared across replicas
            events=events,
        )
        self.flights: RedisSingleflight[dict[str, Any]] | None = (
            RedisSingleflight(
                self.client,
                name="briefs",
                prefix=f"{section.prefix}:sf:",
                lock_ttl=section.lock_ttl,
                clock=clock,
            )
            if section.singleflight
            else None
        )
        self.cache: SharedCache | None = None

    def cache_for(self, local: Cache[str, Any], ttl: float) -> SharedCache | None:
        """The shared cache with ``local`` as its front (None when ``share_cache`` is off)."""
        if not self.section.share_cache:
            return None
        self.cache = SharedCache(
            self.client,
            name="briefs",
            prefix=f"{self.section.prefix}:cache:",
            ttl=ttl,
            local=local,
            detector=self.detector,
            redis_timeout=self.section.timeout,
            clock=self.clock,
            events=self.events,
        )
        return self.cache

    async def start(self) -> None:
        """Check Redis once (without failing when it is down) and start the background loops."""
        await self.detector.check()
        await self.breakers.sync()
        self.detector.start()
        self.breakers.start()

    async def probe_once(
        self, role: str, interval: float, probe: Callable[[], Awaitable[list[ProbeResult]]]
    ) -> tuple[list[ProbeResult], bool] | None:
        """One role's health check, once per interval across replicas: (results, probed here).

        The replica that takes the role's lock for this interval probes and publishes the results;
        the others take them from Redis. None when Redis cannot help (down, or no results yet): the
        caller then probes by itself.
        """
        key = f"{self.section.prefix}:health:{role}"
        bound = self.section.timeout * 5
        try:
            won = await _bounded(
                self.client.set(f"{key}:lock", uuid.uuid4().hex, nx=True, px=max(1, int(interval * 900))),
                bound,
                self.clock,
                self.events,
                "health",
            )
            if not won:
                raw = await _bounded(self.client.get(key), bound, self.clock, self.events, "health")
                if raw is None:
                    return None
                return [ProbeResult(**item) for item in json.loads(raw)], False
        except Exception:
            return None
        results = await probe()
        with contextlib.suppress(Exception):
            payload = json.dumps([dataclasses.asdict(r) for r in results])
            await _bounded(
                self.client.set(key, payload, px=max(1, int(interval * 2000))),
                bound,
                self.clock,
                self.events,
                "health",
            )
        return results, True

    def status(self) -> dict[str, Any]:
        """For ``/health``: the detector's view and where breaker state lives now."""
        cache = self.cache.stats() if self.cache is not None else None
        return {
            "status": self.detector.status,
            "consecutive_failures": self.detector.consecutive_failures,
            "last_latency_ms": None
            if self.detector.last_latency is None
            else round(self.detector.last_latency * 1000, 1),
            "last_error": self.detector.last_error or None,
            "breakers": "shared" if self.breakers.ok else "local",
            "cache_mode": self.cache.mode if self.cache is not None else None,
            "cache_redis_hits": cache.redis_hits if cache is not None else None,
        }

    async def aclose(self) -> None:
        """Stop the loops and close the client."""
        await self.breakers.aclose()
        await self.detector.aclose()
        await self.client.aclose()
