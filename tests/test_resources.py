"""The resource monitor (seed 001): levels, alerts, proactive recovery, GPU skipped cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.errors import ConfigError
from brownout.events import EventBus, ResourceAlert
from brownout.health.resources import (
    GpuProbe,
    GpuReading,
    Level,
    ResourceMonitor,
    ResourceSample,
    Thresholds,
    system_sample,
)
from brownout.recovery import FailureType
from brownout.server.app import create_app
from brownout.server.runtime import Runtime
from brownout.testing import FakeClock


def sample(cpu: float | None, memory: float, *gpus: float, at: float = 0.0) -> ResourceSample:
    readings = tuple(GpuReading(i, f"gpu{i}", int(p * 10), 1000) for i, p in enumerate(gpus))
    return ResourceSample(at=at, cpu_percent=cpu, memory_percent=memory, gpus=readings, gpu_status="ok")


def test_seed_thresholds_give_levels() -> None:
    monitor = ResourceMonitor()
    assert monitor.thresholds_for("cpu") == Thresholds(80, 95)
    assert monitor.thresholds_for("memory") == Thresholds(80, 95)
    assert monitor.thresholds_for("gpu3") == Thresholds(90, 95)
    cpu = Thresholds(80, 95)
    assert [cpu.level(p) for p in (0, 79.9, 80, 94.9, 95, 100)] == [
        "ok",
        "ok",
        "warning",
        "warning",
        "critical",
        "critical",
    ]
    with pytest.raises(ConfigError):
        Thresholds(96, 95)
    with pytest.raises(ConfigError, match=r"resources\.interval"):
        ResourceMonitor(interval=0)


async def test_level_changes_alert_and_critical_levels_call_for_recovery(clock: FakeClock) -> None:
    bus = EventBus()
    alerts: list[ResourceAlert] = []
    bus.subscribe(alerts.append, ResourceAlert)
    critical: list[tuple[str, float | None]] = []
    changes: list[tuple[str, Level, Level]] = []

    async def on_critical(resource: str, s: ResourceSample) -> None:
        critical.append((resource, s.readings()[resource]))

    async def on_level(resource: str, old: Level, new: Level, s: ResourceSample) -> None:
        changes.append((resource, old, new))

    monitor = ResourceMonitor(on_critical=on_critical, on_level=on_level, clock=clock, events=bus)
    await monitor.observe(sample(None, 50.0))
    assert monitor.level == "ok"
    assert monitor.levels == {"memory": "ok"}  # no CPU reading on the first sample
    await monitor.observe(sample(85.0, 50.0, 91.0))
    assert monitor.levels == {"memory": "ok", "cpu": "warning", "gpu0": "warning"}
    await monitor.observe(sample(97.0, 96.0, 50.0))
    assert monitor.level == "critical"
    assert sorted(monitor.critical()) == ["cpu", "memory"]
    await monitor.observe(sample(98.0, 60.0, 50.0))  # still critical: asked again (recovery limits it)
    await monitor.observe(sample(10.0, 60.0, 50.0))
    assert monitor.level == "ok"
    assert critical == [("memory", 96.0), ("cpu", 97.0), ("cpu", 98.0)]
    assert changes == [
        ("cpu", "ok", "warning"),
        ("gpu0", "ok", "warning"),
        ("memory", "ok", "critical"),
        ("cpu", "warning", "critical"),
        ("gpu0", "warning", "ok"),
        ("memory", "critical", "ok"),
        ("cpu", "critical", "ok"),
    ]
    assert [(a.resource, a.level, a.threshold) for a in alerts][:3] == [
        ("cpu", "warning", 80.0),
        ("gpu0", "warning", 90.0),
        ("memory", "critical", 95.0),
    ]
    assert monitor.alerts[("cpu", "critical")] == 1
    assert monitor.criticals == 3
    assert monitor.samples == 5


async def test_the_monitor_samples_every_interval_on_its_clock(clock: FakeClock) -> None:
    taken: list[bool] = []

    def sampler(first: bool) -> ResourceSample:
        taken.append(first)
        return sample(None if first else 20.0, 30.0, at=clock.now())

    monitor = ResourceMonitor(sampler=sampler, interval=60, clock=clock)
    monitor.start()
    await clock.run(0)
    assert taken == [True]
    await clock.run(59)
    assert taken == [True]
    await clock.run(1)
    await clock.run(120)
    assert taken == [True, False, False, False]
    assert monitor.status()["readings"] == {"memory": 30.0, "cpu": 20.0}
    await monitor.aclose()
    await clock.run(600)
    assert len(taken) == 4


async def test_real_psutil_readings(clock: FakeClock) -> None:
    first = system_sample(None, with_cpu=False)
    assert first.cpu_percent is None
    assert 0 < first.memory_percent <= 100
    again = system_sample(None)
    assert again.cpu_percent is not None
    assert 0 <= again.cpu_percent <= 100
    monitor = ResourceMonitor(clock=clock)
    s1 = await monitor.check()
    s2 = await monitor.check()
    assert s1.cpu_percent is None  # the first sample only starts the CPU window
    assert s2.cpu_percent is not None
    assert set(monitor.levels) >= {"cpu", "memory"}


def test_no_gpu_is_skipped_cleanly() -> None:
    probe = GpuProbe()
    assert probe.read() == () or probe.status == "ok"
    if importlib.util.find_spec("pynvml") is None:
        assert probe.status == "skipped: nvidia-ml-py is not installed"
    # Asking again does not retry the import every sample.
    status = probe.status
    assert probe.read() == () or status == "ok"
    assert probe.status == status
    probe.close()
    assert system_sample(probe).gpus == () or probe.status == "ok"


class _NvmlError(Exception):
    pass


def fake_nvml(devices: list[tuple[str, int, int]], *, init_error: bool = False) -> Any:
    """An object shaped like the pynvml module (there is no NVIDIA GPU on the test machines)."""
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise _NvmlError("NVML Shared Library Not Found")

    return SimpleNamespace(
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda i: SimpleNamespace(used=devices[i][1], total=devices[i][2]),
        nvmlDeviceGetName=lambda i: devices[i][0].encode(),
    )


def test_gpu_memory_is_read_through_nvml_when_it_answers() -> None:
    nvml = fake_nvml([("A100", 76_000, 80_000), ("T4", 1_000, 16_000)])
    probe = GpuProbe(nvml)
    readings = probe.read()
    assert [(g.index, g.name, round(g.percent, 2)) for g in readings] == [(0, "A100", 95.0), (1, "T4", 6.25)]
    assert probe.status == "ok"
    probe.close()
    assert nvml.calls == ["init", "shutdown"]
    broken = GpuProbe(fake_nvml([], init_error=True))
    assert broken.read() == ()
    assert broken.status.startswith("skipped: NVML unavailable (_NvmlError")
    none = GpuProbe(fake_nvml([]))
    assert none.read() == ()
    assert none.status == "skipped: no GPU"


# -------------------------------------------------------------------------------- in the server


@contextlib.asynccontextmanager
async def serve(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    fakes = {role: FakeLLM(model=role) for role in ROLES}
    for fake in fakes.values():
        await fake.start()
    try:
        base = load_config(None, environ={}).model_dump()
        base["models"]["local"]["enabled"] = False
        base["models"]["health_interval"] = 3600.0
        for role in ROLES:
            base["models"]["roles"][role]["endpoints"] = [{"url": fakes[role].url}]
        base["database"].update(
            {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")}
        )
        base["resources"]["interval"] = 3600.0  # sampled by hand below
        config = BrownoutConfig.model_validate(base)
        runtime = Runtime(config, events=EventBus())
        app = create_app(config, runtime)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as http:
                yield runtime, http
    finally:
        for fake in fakes.values():
            await fake.stop()


async def test_a_critical_resource_starts_proactive_recovery_undone_when_it_passes(tmp_path: Path) -> None:
    async with serve(tmp_path) as (rt, http):
        for _ in range(500):  # the monitor's own first sample (at start) is in
            if rt.ops.resources.samples:
                break
            await asyncio.sleep(0.01)
        load = {"cpu": 97.0}
        rt.ops.resources.sampler = lambda first: sample(load["cpu"], 40.0)
        await rt.ops.resources.check()
        rec = rt.recovery
        for _ in range(500):
            if rec.outcomes and not rec.busy:
                break
            await asyncio.sleep(0.01)
        outcome = rec.outcomes[0]
        assert (outcome.failure_type, outcome.trigger) == (FailureType.SYSTEM_RESOURCE, "proactive")
        assert [(a.action, a.status) for a in outcome.attempts] == [
            ("check_health", "failed"),  # the re-sample still sees the CPU at 97 %
            ("clear_cache", "ok"),
            ("reduce_generation_params", "ok"),
        ]
        assert "cpu at 97%" in outcome.attempts[0].detail
        assert outcome.status == "unresolved"
        assert rt.service is not None
        assert rt.service.generation_limit == (256, 0.5)
        assert rt.ops.modes.evaluate().value == "degraded"  # resources degrade; they are not core
        assert rt.service.switched_off["system_mode"] == frozenset({"llama"})
        # The pressure passes: the reduction made for it is undone, the mode recovers (after 2 looks).
        load["cpu"] = 20.0
        await rt.ops.resources.check()
        assert rt.service.generation_limit is None
        assert rt.recovery.in_force == {}
        rt.ops.modes.evaluate()
        assert rt.ops.modes.evaluate().value == "normal"
        assert "system_mode" not in rt.service.switched_off
        health = (await http.get("/api/v1/recovery/health")).json()
        assert health["resources"]["levels"] == {"memory": "ok", "cpu": "ok"}
        assert health["system_mode"]["mode"] == "normal"
        assert [f["component"] for f in health["system_mode"]["failure_history"]] == ["resources"]
