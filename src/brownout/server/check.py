"""What the read-only routes behind the pre-promotion checklist (``brownout check --url``, run before a
canary is promoted) answer (the routes: :mod:`brownout.server.routes.check`).

* ``GET /api/v1/config/summary`` -- the settings that decide whether the guards are on (the JSON guard,
  the breakers, the cache, the queue), the server's limits, and only *whether* secrets are set: no
  token, API key, webhook URL or database password ever appears in it.
* ``GET /api/v1/selftest/cache`` -- proves that the response cache expires and regenerates entries.
  Waiting out the real TTL (600 s by default) is no check one runs before a promotion, so the
  self-test builds a second cache of the *same class with the same settings* as the live one, on a
  manual clock, and walks it through the checklist's cache test: set, hit while fresh, miss once the
  TTL has passed (counted as an expiration), regenerate (set again, and the stampede-safe
  ``fetch``), hit the new value, evict the least recently used entry when full, sweep expired
  entries. It never touches the live cache's entries or counters; it also checks that the live cache
  has the configured size and a TTL in range (the configured one, or the adaptive TTL's range when
  that is on), and runs the test at the TTL in force. Its cost is bounded (``_FILL_LIMIT`` entries).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from brownout.config import BrownoutConfig
from brownout.events import EventBus
from brownout.policies.cache import Cache
from brownout.testing import FakeClock

__all__ = ["cache_selftest", "config_summary"]

_FILL_LIMIT = 100_000


def _where(url: str) -> str:
    """scheme://host[:port] of a URL: no user, password, path or query (they may hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def config_summary(config: BrownoutConfig) -> dict[str, Any]:
    """The guard-relevant settings with every secret left out (see the module docstring)."""
    s = config.server
    db_scheme = urlsplit(config.database.url).scheme
    return {
        "json_guard": config.json_guard.model_dump(mode="json"),
        "circuit_breaker": config.circuit_breaker.model_dump(mode="json"),
        "cache": config.cache.model_dump(mode="json"),
        "queue": config.queue.model_dump(mode="json"),
        "server": {
            "max_text_chars": s.max_text_chars,
            "max_body_bytes": s.max_body_bytes,
            "request_timeout": s.request_timeout,
            "admin_token_set": s.admin_token is not None,
            "cors_origins": list(s.cors_origins),
            "live_interval": s.live_interval,
        },
        "models": {
            role: {
                "local": not section.endpoints,
                "endpoints": [_where(ep.url) for ep in section.endpoints],
                "timeout": section.timeout,
            }
            for role, section in config.models.roles.items()
        },
        "database": {"driver": db_scheme},
        "webhooks": {"endpoints": len(config.webhooks.endpoints)},
    }


async def cache_selftest(config: BrownoutConfig, live: Cache[Any, Any] | None) -> dict[str, Any]:
    """Run the cache expiry and regeneration self-test (module docstring); ``ok`` is True when all passed."""
    steps: list[dict[str, Any]] = []

    def step(name: str, ok: bool, detail: str) -> None:
        steps.append({"name": name, "ok": bool(ok), "detail": detail})

    cfg = config.cache
    step(
        "enabled",
        cfg.enabled,
        f"cache.enabled={cfg.enabled}, type={cfg.type}, eviction={cfg.eviction_policy}",
    )
    if live is None:
        step("live cache", False, "the service has not started")
        return {"ok": False, "steps": steps}
    # The TTL in force: the adaptive TTL (it follows the load) moves it within its range; else the
    # configured one.
    in_force = float(getattr(live, "ttl", live.config.ttl))
    adaptive = getattr(getattr(config, "modes", None), "adaptive_ttl", None)
    if adaptive is not None and adaptive.enabled:
        ttl_ok = adaptive.min <= in_force <= adaptive.max
        allowed = f"adaptive {adaptive.min:g}..{adaptive.max:g}s"
    else:
        ttl_ok = in_force == cfg.ttl_seconds
        allowed = f"configured {cfg.ttl_seconds:g}s"
    step(
        "live settings",
        ttl_ok and live.config.max_entries == cfg.max_size,
        f"live cache ttl {in_force:g}s ({allowed}), "
        f"max {live.config.max_entries} (configured {cfg.max_size})",
    )
    clock = FakeClock(start=0.0)
    settings = live.config.model_copy(update={"ttl": in_force})
    cache: Cache[str, str] = type(live)("selftest", settings, clock=clock, events=EventBus())
    ttl = cache.config.ttl
    keep = max(cache.config.stale_while_revalidate, cache.config.stale_if_error)

    cache.set("k", "v1")
    step("fresh hit", cache.get("k") == "v1", "set k=v1, read back at once")
    clock.advance(ttl * 0.99)
    step("hit before ttl", cache.get("k") == "v1", f"still v1 at {ttl * 0.99:g}s of {ttl:g}s")
    clock.advance(ttl * 0.01 + keep + 1.0)
    before = cache.stats().expirations
    expired = cache.get("k") is None and cache.stats().expirations == before + 1
    step("expired after ttl", expired, f"miss at {ttl + keep + 1:g}s, counted as an expiration")
    cache.set("k", "v2")
    step("regenerated (set)", cache.get("k") == "v2", "set k=v2 after expiry, read back v2")

    clock.advance(ttl + keep + 1.0)
    computed: list[str] = []

    async def compute() -> str:
        computed.append("v3")
        return "v3"

    result = await cache.fetch("k", compute)
    again = await cache.fetch("k", compute)
    step(
        "regenerated (fetch)",
        result.status == "miss" and result.value == "v3" and again.status == "hit" and computed == ["v3"],
        f"expired entry recomputed once ({result.status}), then served ({again.status})",
    )

    size = cache.config.max_entries
    if size <= _FILL_LIMIT:
        cache.clear()
        for i in range(size + 1):
            cache.set(f"fill{i}", "x")
        evicted = "fill0" not in cache and f"fill{size}" in cache and len(cache) == size
        step("lru eviction", evicted and cache.stats().evictions >= 1, f"{size + 1} sets into {size} slots")
    else:
        step("lru eviction", True, f"skipped: max_size {size} is above the self-test's {_FILL_LIMIT}")

    clock.advance(ttl + keep + 1.0)
    swept = cache.sweep()
    step("sweep", len(cache) == 0 and swept > 0, f"sweep removed {swept} expired entries")
    await cache.aclose()
    return {
        "ok": all(s["ok"] for s in steps),
        "class": f"{type(live).__module__}.{type(live).__qualname__}",
        "ttl_seconds": ttl,
        "max_size": size,
        "steps": steps,
    }
