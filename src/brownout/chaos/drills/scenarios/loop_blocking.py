"""Event-loop blocking: oversized malformed answers make the JSON guard's repair block the server's loop."""

from __future__ import annotations

from typing import Any

from brownout.chaos.drills.harness import Drill
from brownout.chaos.drills.spec import DetectionRow, Fault, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="loop-blocking",
    title="Event-loop blocking",
    category="API",
    severity="High",
    kind="model",
    seed="003 (event-loop blocking)",
    event="A CPU-bound call runs on the server's event loop: for one second the generator answers "
    "long malformed JSON (16 000 characters, just under the guard's repair limit), and the JSON "
    "guard repairs each answer with json_repair on the loop -- 50 to 100 ms of CPU per answer. "
    "Since the guard caps what it repairs, no answer can block the loop past the 100 ms limit, so "
    "the drill runs the detector at 50 ms to have blocks to detect.",
    detection=(
        DetectionRow(
            "Loop-block detector",
            "a request step running without yielding",
            "loop_block.threshold (100 ms; 50 ms in this drill)",
        ),
        DetectionRow("Loop-block detector", "heartbeat waking late", "loop_block.interval (25 ms)"),
    ),
    response=(
        "The detector reports each block (LoopBlocked event, metric, log) with the route that caused it, "
        "POST /v1/briefs.",
        "The system mode is degraded while blocks are recent; requests queued behind a block are served "
        "once it ends, by a fallback when the guard gave up; none fails.",
        "When the answers are normal again, full mode returns.",
    ),
    impact=(("Failed requests", "0"), ("Latency", "every request in flight waits out each block")),
    verification=(
        "bounded load at 4 requests/s; one second of oversized garbage answers from the generator",
        "blocks reported, attributed to POST /v1/briefs, within 1 s of their end",
        "0 failed requests; full mode back after the answers are normal again",
    ),
    play="loop_block",
    # Unclosed near-JSON just under MAX_REPAIR_CHARS (longer answers are re-asked, not repaired):
    # json_repair spends 50-100 ms on each, over the drill's 50 ms threshold.
    fault=Fault("control", ("qwen",), frozen({"mode": "ok", "chars": 16_000}), hold=1.0),
    config=frozen({"loop_block": {"threshold": 0.05, "interval": 0.02}}),
    rate=4.0,
    requires=("fakellm", "loop-detector"),
)


async def play(d: Drill) -> None:
    """CPU-bound work on the server's event loop: the generator answers oversized malformed JSON for a
    moment, and the JSON guard's repair of it runs on the loop."""
    s = d.scenario
    d.phase("starting fakes and server")
    load, _watcher = await d.begin()
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    assert d.events is not None
    blocks_before = await _loop_blocks(d)
    d.phase("fault: oversized garbage answers (repair on the loop)")
    fault_at = d.mark("fault")
    for role in s.fault.roles:
        chars = int(s.fault.behaviour.get("chars", 16_000))
        await d.fakes[role].set({"mode": "ok", "content": _garbage(chars)})
    await d.clock.sleep(s.fault.hold)
    for role in s.fault.roles:
        await d.fakes[role].set({"mode": "ok"})
    restore_at = d.mark("restore")
    d.phase("recovering")
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    status = await _loop_status(d)
    await d.end_load()
    blocks = int(status.get("blocked_total", 0)) - blocks_before
    reported = d.events.first(fault_at, "LoopBlocked")
    r = d.result
    r.extra.update(
        loop_blocks=blocks,
        max_block_ms=status.get("max_block_ms"),
        routes=sorted(status.get("by_route", {})),
    )
    if reported is not None:
        r.detection_s = reported.t - fault_at
    max_block = float(status.get("max_block_ms", 0.0)) / 1000
    # A block is reported when it ends: the budget allows for the block itself.
    r.detection_budget_s = d.detection_budget(fault_at) + max_block
    d.check(
        "the detector reported blocks of the loop",
        blocks > 0,
        f"{blocks} blocks, longest {max_block * 1000:.0f} ms",
    )
    d.check(
        "blocks attributed to the brief route",
        any("/v1/briefs" in route for route in status.get("by_route", {})),
        f"routes: {', '.join(sorted(status.get('by_route', {}))) or 'none'}",
    )
    d.common_checks(fault_at, restore_at, health_detection=False)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()


def _garbage(chars: int) -> str:
    """Chatty, unclosed near-JSON of about ``chars`` characters: what a small model writes without a
    grammar, and what json_repair works hardest on."""
    words = "lorem ipsum, dolor sit amet, {oops [unclosed 'x': "
    return '{"description": "' + words * (chars // len(words))


async def _loop_status(d: Drill) -> dict[str, Any]:
    health = await d.server_json("/api/v1/recovery/health") or {}
    loop = health.get("event_loop")
    return loop if isinstance(loop, dict) else {}


async def _loop_blocks(d: Drill) -> int:
    return int((await _loop_status(d)).get("blocked_total", 0))
