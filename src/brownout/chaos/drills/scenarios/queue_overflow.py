"""Queue overflow: 700 requests against a 2 s generator; 500 wait, the rest get 503 + Retry-After."""

from __future__ import annotations

import asyncio

from brownout.chaos.drills.harness import Drill
from brownout.chaos.drills.load import Load, brief_text
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="queue-overflow",
    title="Queue overflow (more than 500 waiting)",
    category="API",
    severity="High",
    kind="load",
    seed="000 (queue overflow)",
    event="The generator slows to 2 s per call while 700 requests arrive at once: 4 run, 500 wait, "
    "the rest overflow.",
    detection=(DetectionRow("Admission control", "queue length above queue.max_size (500)", "immediate"),),
    response=(
        "Requests beyond 500 waiting are refused at once with 503, Retry-After 30, queue_size and a "
        "suggestion to use `fast`.",
        "Waiting requests are served as the queue drains; nothing fails.",
    ),
    impact=(
        ("Failed requests", "0"),
        ("Rejected", "the overflow, with Retry-After"),
        ("Latency", "queueing"),
    ),
    verification=(
        "700 concurrent unique requests against a 2 s generator (timeout 10 s)",
        "503s with Retry-After, queue_size and a suggestion for the overflow; /health showed 500 waiting",
        "0 failed requests; the queue drains once the generator is fast again",
    ),
    play="queue_overflow",
    fault=Fault("control", ("qwen",), frozen({"mode": "slow", "delay": 2.0}), hold=0.0),
    goals=Goals(min_rejected=1, must_see=("rejected",), detect=False, recover=True),
    mode="fast",
    config=frozen({"models": {"roles": {"qwen": {"timeout": 10.0}}}, "server": {"request_timeout": 30.0}}),
)


async def play(d: Drill) -> None:
    """700 concurrent requests against a 2 s generator: 500 wait, the overflow gets 503 + Retry-After."""
    s = d.scenario
    callers = 700
    d.phase("starting fakes and server")
    # Probes off: a 2 s generator must stay "healthy" so that requests queue for it.
    load, watcher = await d.begin({"models": {"health_interval": 3600.0}})
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    await load.stop()
    fault_at = d.mark("slow generator + flood")
    for role in s.fault.roles:
        await d.fakes[role].set(s.fault.behaviour)
    d.phase(f"{callers} concurrent requests")
    # The flood is new callers: new connections, not the warm-up's kept-alive ones.
    crowd = Load(
        load.base_url,
        mode=s.mode,
        clock=d.clock,
        timeout=load.timeout,
        text=lambda i: f"{brief_text(i)} (flood)",
        on_sample=lambda x: d.progress.sample(s, x),
    )
    flood = asyncio.create_task(crowd.burst(callers))
    # Hold the flood until the queue has been seen full (or 30 s), then let the generator go fast.
    await watcher.wait_for(lambda h: h.queue_size >= 500, 30.0)
    await d.clock.sleep(0.5)
    restore_at = d.mark("restore")
    for role in s.fault.roles:
        await d.fakes[role].set({"mode": "ok"})
    d.phase("draining the queue")
    try:
        await flood
    finally:
        await crowd.aclose()
    load.samples.extend(crowd.samples)
    load.start()
    await d.wait_recovered(restore_at, 60.0)
    await d.end_load()
    r = d.result
    r.counts = dict(load.counts())
    rejected = [x for x in load.samples if x.outcome == "rejected"]
    max_queue = max((h.queue_size for h in watcher.samples), default=0)
    r.extra.update(callers=callers, max_queue_size=max_queue)
    if rejected:
        r.detection_s = max(0.0, min(x.done for x in rejected) - fault_at)
    d.failed_check()
    d.check(
        "overflow refused with 503 + Retry-After",
        len(rejected) >= s.goals.min_rejected,
        f"{len(rejected)} rejected",
    )
    # The refusal says how full the queue is and suggests the fast mode. (How fast a refusal
    # comes back is the admission policy's tests' business: from here it would measure the client's
    # time to open 700 connections on the machine as much as the server.)
    limit = d.server.config.queue.max_size if d.server is not None else 500
    told = [
        x
        for x in rejected
        if (x.info or {}).get("queue_size", 0) >= limit and (x.info or {}).get("suggestion")
    ]
    d.check(
        "refusals carry queue_size and a suggestion",
        bool(rejected) and len(told) == len(rejected),
        f"{len(told)} of {len(rejected)} with queue_size >= {limit} and a suggestion",
    )
    d.check("queue reached its limit (500)", max_queue >= 500, f"max queue_size seen {max_queue}")
    d.recovery_check(restore_at, 60.0)
    await d.finish_sqlite()
