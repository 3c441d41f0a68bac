"""Cache stampede: 1000 identical requests on an expired key; one computation serves them all."""

from __future__ import annotations

import statistics
from typing import Any

from brownout.chaos.drills.harness import Drill, DrillError, config_has
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="cache-stampede",
    title="Cache stampede (1000 callers, expired key)",
    category="Inference",
    severity="High",
    kind="load",
    seed="003 (cache stampede)",
    event="A popular request's cache entry expires and 1000 identical requests arrive at once.",
    detection=(DetectionRow("Singleflight", "a computation for the key is already in flight", "immediate"),),
    response=(
        "The first caller computes; the 999 others wait for its result (request coalescing).",
        "The result is cached; later callers are answered from the cache.",
    ),
    impact=(("Model computations", "1"), ("Failed requests", "0")),
    verification=(
        "cache.ttl_seconds 5; the key is primed, left to expire, then hit by 1000 concurrent requests "
        "while the generator takes 3 s to answer",
        "generator calls counted on the model server: exactly 1",
        "0 failed requests; every acknowledged brief is in the database",
    ),
    play="stampede",
    # The computation (the generator's answer) takes 3 s, as a real model's would.
    fault=Fault("none", hold=0.0, behaviour=frozen({"delay": 3.0})),
    goals=Goals(computations=1, detect=False, recover=False),
    mode="fast",
    config=frozen(
        {
            "cache": {"ttl_seconds": 5.0},
            "models": {"roles": {"qwen": {"timeout": 15.0}}},
            "server": {"request_timeout": 30.0},
        }
    ),
    fast=True,
)


async def play(d: Drill) -> None:
    """Prime a key, let it expire, then 1000 identical requests at once; count generator calls."""
    s = d.scenario
    callers = 1000
    ttl = float(s.config.get("cache", {}).get("ttl_seconds", 1.0))
    d.phase("starting fakes and server")
    # No periodic health probes (they are chat calls too: only the pipeline's may be counted), and the
    # TTL fixed (an adaptive TTL would lengthen it under load).
    # The thousand callers all come from 127.0.0.1 here, where in production they are a thousand
    # clients: lift the per-address connection cap for the drill.
    overrides: dict[str, Any] = {
        "models": {"health_interval": 3600.0},
        "server": {"max_connections_per_client": 0},
    }
    if config_has("modes", "adaptive_ttl"):
        overrides["modes"] = {"adaptive_ttl": {"enabled": False}}
    load, _watcher = await d.begin(overrides)
    text = "A fresh summer scent with lemon and sea breeze for the beach"
    d.phase("priming the key")
    primed = await load.send(text)
    if primed.outcome != "full":
        raise DrillError(f"priming request was not served in full: {primed.outcome} {primed.detail}")
    # The computation takes a few seconds, as a real model's would: the burst arrives while it runs.
    await d.fakes["qwen"].set({"mode": "ok", "delay": float(s.fault.behaviour.get("delay", 3.0))})
    await d.clock.sleep(ttl + 0.5)
    d.phase(f"opening {callers} connections")
    await load.warm(callers)
    before = int((await d.fakes["qwen"].counters())["chat_requests"])
    d.phase(f"{callers} concurrent requests on the expired key")
    d.mark("burst")
    burst = await load.burst(callers, text=lambda _: text)
    d.mark("answered")
    after = int((await d.fakes["qwen"].counters())["chat_requests"])
    await d.clock.sleep(d.settings.tail)
    await d.end_load()
    d.result.computations = after - before
    d.result.counts = dict(load.counts())
    d.result.extra.update(
        callers=callers,
        coalesced=sum(1 for x in burst if x.status == 200 and not x.cached),
        from_cache=sum(1 for x in burst if x.cached),
        p50_ms=round(statistics.median(x.latency for x in burst) * 1000, 1),
        max_ms=round(max(x.latency for x in burst) * 1000, 1),
    )
    d.failed_check()
    ok = sum(x.status == 200 for x in burst)
    d.check("every caller got a brief", ok == callers, f"{ok} of {callers}")
    want = s.goals.computations
    d.check(
        f"{want} computation for {callers} callers",
        d.result.computations == want,
        f"{d.result.computations} generator calls",
    )
    await d.finish_sqlite()
