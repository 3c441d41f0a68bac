"""Memory pressure: a helper holds memory past the critical threshold; the monitor alerts, recovery acts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from brownout.chaos.drills.harness import Drill, DrillError, config_has, seconds_text
from brownout.chaos.drills.scenarios._shared import recovery_history
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="memory-pressure",
    title="Memory pressure leading to a recovery action",
    category="Infrastructure",
    severity="High",
    kind="model",
    seed="001 (resource monitor, recovery chains)",
    event="A helper process holds memory until the machine's use crosses the resource monitor's "
    "critical threshold (set 6 % above the use at the start of the drill), then releases it.",
    detection=(DetectionRow("Resource monitor", "memory percent above threshold", "monitor interval"),),
    response=(
        "The monitor raises a resource alert; the recovery manager runs its action chain "
        "(e.g. clear the cache) with cooldowns.",
        "Requests keep being answered throughout.",
    ),
    impact=(("Failed requests", "0"), ("Cache", "cleared by the recovery action")),
    verification=(
        "bounded load; thresholds at use + 3 % / + 6 %; a helper holds 9 % of the memory for 4 s",
        "a critical memory alert within one monitor interval; a recovery action for the resource failure",
        "0 failed requests; back to ok (and the generation limits undone) once the memory is released",
    ),
    play="memory_pressure",
    # Thresholds at use + 3 % (warning) and + 6 % (critical); a helper holds 9 % of the memory:
    # margins wide enough for what other processes of a shared machine allocate meanwhile.
    fault=Fault("none", hold=4.0, behaviour=frozen({"margin": 3.0, "interval": 0.5})),
    goals=Goals(detect=False),
    requires=("fakellm", "resource-monitor"),
)


async def play(d: Drill) -> None:
    """Real memory pressure: thresholds set just above the machine's use, then a helper process holds
    enough memory to cross the critical one; the monitor alerts and recovery runs its chain."""
    s = d.scenario
    total, available = _meminfo()
    used = 100.0 * (total - available) / total
    margin = float(s.fault.behaviour.get("margin", 2.0))
    warning, critical = min(used + margin, 99.0), min(used + 2 * margin, 99.5)
    # Hold enough to pass critical by one more margin, bounded to a quarter of what is available.
    need = int(total * (3 * margin) / 100)
    if need > available // 4:
        raise DrillError(f"not enough free memory for a bounded pressure drill ({need >> 20} MiB needed)")
    d.phase("starting fakes and server")
    interval = float(s.fault.behaviour.get("interval", 0.5))
    overrides: dict[str, Any] = {
        "resources": {
            "interval": interval,
            "memory_warning": round(warning, 1),
            "memory_critical": round(critical, 1),
            # CPU is not this drill's subject: on a shared machine it must not trigger recovery too.
            "cpu_warning": 100.0,
            "cpu_critical": 100.0,
        }
    }
    if config_has("recovery", "cooldown"):
        # A short cooldown, as the breaker's: a CPU spike of a busy machine (100 % cannot be excluded
        # by a threshold) must not hold the memory's recovery back for the default 30 s.
        overrides["recovery"] = {"cooldown": 1.0}
    load, _watcher = await d.begin(overrides)
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    assert d.events is not None
    d.phase(f"fault: holding {need >> 20} MiB (critical at {critical:.1f} %)")
    # The machine's memory use, sampled by the drill: when it crossed the critical level is the fault.
    usage: list[tuple[float, float]] = []

    async def sample_memory() -> None:
        while True:
            t_total, t_available = _meminfo()
            usage.append((d.clock.now(), 100.0 * (t_total - t_available) / t_total))
            await d.clock.sleep(0.05)

    # What the server says of it (the live stream cuts bursts of alerts, so its state is polled too).
    levels: list[tuple[float, str]] = []

    async def poll_levels() -> None:
        while True:
            health = await d.server_json("/api/v1/recovery/health") or {}
            level = ((health.get("resources") or {}).get("levels") or {}).get("memory")
            levels.append((d.clock.now(), str(level)))
            await d.clock.sleep(0.1)

    history_before = len(await recovery_history(d))
    sampler = asyncio.create_task(sample_memory())
    poller = asyncio.create_task(poll_levels())
    fault_at = d.mark("fault")
    try:
        hog = await d.spawn_helper("memory-hog", _HOG.replace("sys.argv[1]", str(need)), "HOLDING", 120.0)
        await d.clock.sleep(s.fault.hold)
        d.phase("restore: memory released")
        await hog.stop(5.0)
        restore_at = d.mark("restore")
        await d.clock.sleep(0.5)
    finally:
        sampler.cancel()
    crossed_at = next((t for t, pct in usage if pct >= critical), None)
    budget = d.recovery_budget() + interval
    await d.wait_recovered(restore_at, budget)
    await d.clock.sleep(2 * interval)
    poller.cancel()
    status = await d.server_json("/api/v1/recovery/status") or {}
    history = (await recovery_history(d))[history_before:]
    await d.end_load()
    r = d.result
    event = d.events.first(fault_at, "ResourceAlert", resource="memory", level="critical")
    polled = next((t for t, level in levels if t >= fault_at and level == "critical"), None)
    seen = [t for t in (event.t if event else None, polled) if t is not None]
    alert_at = min(seen) if seen else None
    resource_actions = [a for a in history if a.get("failure_type") == "system_resource_error"]
    back_ok = any(t >= restore_at and level == "ok" for t, level in levels) or (
        d.events.first(restore_at, "ResourceAlert", resource="memory", level="ok") is not None
    )
    r.extra.update(
        used_percent=round(used, 1),
        critical_percent=round(critical, 1),
        held_mib=need >> 20,
        max_used_percent=round(max((pct for _, pct in usage), default=0.0), 1),
        recovery_actions=[f"{a.get('action')}:{a.get('status')}" for a in resource_actions],
        generation_limit_at_end=status.get("generation_limit"),
    )
    if alert_at is not None and crossed_at is not None:
        r.detection_s = max(0.0, alert_at - crossed_at)
    # Detection: within one monitor interval of the use crossing the critical level, plus 1 s.
    r.detection_budget_s = interval + d.settings.detect_slack
    d.check(
        "memory use crossed the critical level",
        crossed_at is not None,
        f"max {r.extra['max_used_percent']} % against critical {critical:.1f} %",
    )
    d.check(
        "memory pressure detected (critical alert) within one monitor interval + 1 s",
        r.detection_s is not None and r.detection_s <= r.detection_budget_s,
        "no critical memory level reported"
        if alert_at is None
        else f"critical {seconds_text(r.detection_s)} after the crossing "
        f"(budget {r.detection_budget_s:.2f} s)",
    )
    d.check(
        "a recovery action ran for the resource failure",
        bool(resource_actions),
        ", ".join(r.extra["recovery_actions"]) or "none in the recovery history",
    )
    d.check(
        "back to ok once the memory is released",
        back_ok and status.get("generation_limit") is None,
        f"memory level ok {'seen' if back_ok else 'not seen'}; "
        f"generation limit at end {status.get('generation_limit')}",
    )
    d.common_checks(fault_at, restore_at, health_detection=False)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()


_HOG = """
import sys, time
chunk = 64 * 1024 * 1024
held = []
for _ in range(int(sys.argv[1]) // chunk + 1):
    held.append(b"\\x01" * chunk)  # written, so resident: real memory, not a reservation
print("HOLDING", sum(map(len, held)), flush=True)
time.sleep(600)
"""


def _meminfo() -> tuple[int, int]:
    """Total and available memory in bytes, as the kernel reports them (what psutil's percent uses)."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]
