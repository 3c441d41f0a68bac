"""Redis down and back: the Redis holding the shared state stops under load and returns empty."""

from __future__ import annotations

from brownout.chaos.drills.harness import Drill
from brownout.chaos.drills.measure import redis_ok
from brownout.chaos.drills.scenarios._shared import redis_config, start_redis
from brownout.chaos.drills.spec import DetectionRow, Fault, Scenario

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="redis-down",
    title="Redis down and back",
    category="Data",
    severity="High",
    kind="data",
    seed="002 (Redis health detector, tiered reads)",
    event="The Redis holding the server's shared state (breakers, response cache, singleflight locks, "
    "the event stream) is stopped under load; it comes back empty 4 s later, as a cache node would.",
    detection=(
        DetectionRow(
            "Redis health detector",
            "PING/SET/GET; 3 failures in a row: fallback",
            "redis.timeout",
        ),
        DetectionRow("Shared cache, breakers, locks", "command error or timeout", "immediate"),
    ),
    response=(
        "The shared cache answers from its local LRU front; breakers and singleflight fall back to "
        "their local state; events wait in the outbox. Nothing a request needs blocks on Redis.",
        "When Redis returns, the detector marks it healthy and shared state is written there again.",
    ),
    impact=(
        ("Failed requests", "0"),
        ("Lost writes", "0"),
        ("Sharing", "per replica while Redis is away"),
    ),
    verification=(
        "bounded load; Redis stopped for 4 s, then started empty on the same port",
        "0 failed requests; every acknowledged brief in the database",
        "Redis reported not healthy within 1 s of the first failed call",
        "Redis healthy and full mode again after the restart",
    ),
    play="redis_outage",
    fault=Fault("stop", hold=4.0),
    requires=("fakellm", "redis", "server-redis"),
)


async def play(d: Drill) -> None:
    """Stop the Redis holding the shared state under load; it comes back empty, as a cache node."""
    d.component = redis_ok
    s = d.scenario
    d.phase("starting Redis, fakes and server")
    redis = await start_redis(d)
    load, watcher = await d.begin(redis_config(d, redis.url))
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase("fault: Redis stopped")
    fault_at = d.mark("fault")
    await redis.astop()
    await d.clock.sleep(s.fault.hold)
    d.phase("restore: Redis started (empty)")
    await redis.astart()
    restore_at = d.mark("restore")
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    await d.end_load()
    statuses = sorted({h.redis_status for h in watcher.samples if h.reachable and h.t >= fault_at})
    d.result.extra["redis_statuses"] = statuses
    d.check(
        "the server saw Redis go",
        any(st not in ("healthy", "") for st in statuses),
        f"redis statuses seen: {', '.join(statuses) or 'none'}",
    )
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()
