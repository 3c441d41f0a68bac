"""System modes (seed 002) and the adaptive cache TTL (seed 000)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.errors import ConfigError
from brownout.events import CacheTTLChanged, EventBus, SystemModeChanged
from brownout.health.modes import (
    DEFAULT_SWITCH_OFF,
    AdaptiveTTL,
    ComponentHealth,
    ComponentStatus,
    SystemMode,
    SystemModes,
    derive_mode,
)
from brownout.health.resources import ResourceSample
from brownout.server.app import create_app
from brownout.server.runtime import Runtime
from brownout.testing import FakeClock
from support.wait import until

# -------------------------------------------------------------------------------- deriving the mode


def comps(**statuses: ComponentStatus) -> list[ComponentHealth]:
    """Components by name; names starting with "core_" are core."""
    return [ComponentHealth(n, s, core=n.startswith("core_")) for n, s in statuses.items()]


@pytest.mark.parametrize(
    ("statuses", "mode"),
    [
        ({"core_gen": "healthy", "db": "healthy"}, SystemMode.NORMAL),
        ({"core_gen": "healthy", "db": "degraded"}, SystemMode.DEGRADED),
        ({"core_gen": "healthy", "db": "unhealthy"}, SystemMode.DEGRADED),  # not core
        ({"core_gen": "degraded", "db": "healthy"}, SystemMode.DEGRADED),  # core, but only degraded
        ({"core_gen": "unhealthy", "db": "healthy"}, SystemMode.EMERGENCY),
        ({}, SystemMode.NORMAL),
    ],
)
def test_the_mode_follows_the_components(statuses: dict[str, ComponentStatus], mode: SystemMode) -> None:
    assert derive_mode(comps(**statuses))[0] is mode


def test_the_reason_names_what_is_not_healthy() -> None:
    _, reason = derive_mode([ComponentHealth("db", "degraded", detail="5 writes spooled")])
    assert reason == "db degraded (5 writes spooled)"


class Health:
    """A settable set of components."""

    def __init__(self) -> None:
        self.now: dict[str, ComponentStatus] = {"core_gen": "healthy", "db": "healthy"}

    def __call__(self) -> list[ComponentHealth]:
        return comps(**self.now)


def test_modes_rise_at_once_and_fall_after_agreeing_evaluations(clock: FakeClock) -> None:
    health = Health()
    bus = EventBus()
    seen: list[SystemModeChanged] = []
    bus.subscribe(seen.append, SystemModeChanged)
    applied: list[tuple[str, str]] = []
    modes = SystemModes(
        health,
        recover_after=2,
        on_change=lambda old, new, reason: applied.append((old.value, new.value)),
        clock=clock,
        events=bus,
    )
    assert modes.evaluate() is SystemMode.NORMAL
    assert modes.switched_off == ()
    health.now["core_gen"] = "unhealthy"
    clock.advance(10)
    assert modes.evaluate() is SystemMode.EMERGENCY
    assert modes.since == clock.now()
    assert modes.switched_off == DEFAULT_SWITCH_OFF[SystemMode.EMERGENCY]
    assert not modes.is_on("model_validation")
    health.now["core_gen"] = "healthy"
    health.now["db"] = "degraded"
    assert modes.evaluate() is SystemMode.EMERGENCY  # one better look is not enough
    assert modes.evaluate() is SystemMode.DEGRADED
    health.now["db"] = "healthy"
    assert modes.evaluate() is SystemMode.DEGRADED
    health.now["db"] = "degraded"  # flaps back: the count starts over
    assert modes.evaluate() is SystemMode.DEGRADED
    health.now["db"] = "healthy"
    assert modes.evaluate() is SystemMode.DEGRADED
    assert modes.evaluate() is SystemMode.NORMAL
    assert applied == [("normal", "emergency"), ("emergency", "degraded"), ("degraded", "normal")]
    assert [(e.old, e.new) for e in seen] == applied
    assert seen[0].switched_off == DEFAULT_SWITCH_OFF[SystemMode.EMERGENCY]
    assert "core_gen unhealthy" in seen[0].reason
    assert modes.changes == {"emergency": 1, "degraded": 1, "normal": 1}


def test_failures_are_kept_with_the_mode_and_when_they_recovered(clock: FakeClock) -> None:
    health = Health()
    modes = SystemModes(health, recover_after=1, clock=clock)
    modes.evaluate()
    health.now["db"] = "degraded"
    clock.advance(5)
    modes.evaluate()
    health.now["db"] = "unhealthy"  # worse: a new record
    clock.advance(5)
    modes.evaluate()
    health.now["db"] = "healthy"
    clock.advance(5)
    modes.evaluate()
    history = [r.as_dict() for r in modes.failure_history]
    assert [(h["component"], h["status"], h["mode"]) for h in history] == [
        ("db", "degraded", "normal"),
        ("db", "unhealthy", "degraded"),
    ]
    assert history[0]["recovered_at"] is None  # superseded by the worse record
    assert history[1]["recovered_at"] == clock.now()
    assert modes.status()["failure_history"] == history


def test_reset_takes_the_mode_health_calls_for_now(clock: FakeClock) -> None:
    health = Health()
    modes = SystemModes(health, recover_after=3, clock=clock)
    health.now["core_gen"] = "unhealthy"
    modes.evaluate()
    health.now["core_gen"] = "healthy"
    assert modes.evaluate() is SystemMode.EMERGENCY
    assert modes.reset() is SystemMode.NORMAL


async def test_modes_are_evaluated_every_interval(clock: FakeClock) -> None:
    health = Health()
    modes = SystemModes(health, interval=10, clock=clock)
    modes.start()
    await clock.run(0)
    assert modes.evaluations == 1
    await clock.run(30)
    assert modes.evaluations == 4
    await modes.aclose()
    await clock.run(30)
    assert modes.evaluations == 4


def test_bad_settings_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"modes\.recover_after"):
        SystemModes(Health(), recover_after=0)
    with pytest.raises(ConfigError, match=r"modes\.adaptive_ttl"):
        AdaptiveTTL(load=lambda: 0.0, apply=print, base=100, min_ttl=600)


class ModesMachine(RuleBasedStateMachine):
    """SystemModes against a reference model of "rise at once, fall after N agreeing looks"."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.health = Health()
        self.n = 2
        self.modes = SystemModes(self.health, recover_after=self.n, clock=self.clock)
        self.mode = SystemMode.NORMAL
        self.window: list[SystemMode] = []

    @rule(
        name=st.sampled_from(["core_gen", "db"]),
        status=st.sampled_from(["healthy", "degraded", "unhealthy"]),
    )
    def change(self, name: str, status: ComponentStatus) -> None:
        self.health.now[name] = status

    @rule()
    def evaluate(self) -> None:
        # The last N targets since the last change; up at once, down when all N are lower.
        target, _ = derive_mode(self.health())
        self.window = [*self.window, target][-self.n :]
        if target.rank > self.mode.rank:
            self.mode, self.window = target, []
        elif len(self.window) == self.n and all(m.rank < self.mode.rank for m in self.window):
            self.mode, self.window = max(self.window, key=lambda m: m.rank), []
        assert self.modes.evaluate() is self.mode

    @rule()
    def reset(self) -> None:
        self.mode = derive_mode(self.health())[0]
        self.window = []
        assert self.modes.reset() is self.mode

    @invariant()
    def switches_follow_the_mode(self) -> None:
        assert self.modes.switched_off == DEFAULT_SWITCH_OFF[self.modes.mode]


def test_modes_match_the_reference_model() -> None:
    run_state_machine_as_test(
        ModesMachine, settings=settings(max_examples=80, stateful_step_count=40, deadline=None)
    )


# -------------------------------------------------------------------------------- adaptive TTL


def test_the_ttl_follows_seed_000s_rule(clock: FakeClock) -> None:
    applied: list[float] = []
    bus = EventBus()
    changes: list[CacheTTLChanged] = []
    bus.subscribe(changes.append, CacheTTLChanged)
    ttl = AdaptiveTTL(load=lambda: 0.0, apply=applied.append, clock=clock, events=bus)
    assert ttl.current == 3600
    assert [ttl.adjust(0.9) for _ in range(6)] == [7200, 14400, 28800, 57600, 86400, 86400]
    assert ttl.adjust(0.5) == 86400  # between the thresholds: unchanged
    assert ttl.adjust(0.8) == 86400  # "above 0.8" is strict
    assert [ttl.adjust(0.1) for _ in range(10)][-1] == 600
    assert ttl.adjust(0.29) == 600
    assert ttl.adjust(1.7) == 1200  # loads are clamped to 0..1
    assert applied[-1] == 1200
    assert ttl.adjustments["up"] == 5 + 1
    assert [(c.old, c.new) for c in changes][:2] == [(3600, 7200), (7200, 14400)]


def test_a_degraded_system_never_shortens_the_ttl(clock: FakeClock) -> None:
    allowed = {"now": False}
    ttl = AdaptiveTTL(load=lambda: 0.1, apply=lambda t: None, may_shorten=lambda: allowed["now"], clock=clock)
    assert ttl.tick() == 3600
    assert ttl.adjustments["held"] == 1
    assert ttl.adjust(0.95) == 7200  # raising is always allowed
    allowed["now"] = True
    assert ttl.tick() == 3600


async def test_the_ttl_is_adjusted_every_interval(clock: FakeClock) -> None:
    loads = iter([0.9, 0.9, 0.1])
    applied: list[float] = []
    ttl = AdaptiveTTL(load=lambda: next(loads), apply=applied.append, interval=60, clock=clock)
    ttl.start()
    assert applied == [3600]  # the base, at once
    await clock.run(59)
    assert applied == [3600]
    await clock.run(121)
    assert applied == [3600, 7200, 14400, 7200]
    await ttl.aclose()


# -------------------------------------------------------------------------------- in the server


@contextlib.asynccontextmanager
async def serve(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, dict[str, FakeLLM]]]:
    fakes = {role: FakeLLM(model=role) for role in ROLES}
    for fake in fakes.values():
        await fake.start()
    try:
        base = load_config(None, environ={}).model_dump()
        base["models"]["local"]["enabled"] = False
        base["models"]["health_interval"] = 3600.0
        for role in ROLES:
            base["models"]["roles"][role]["endpoints"] = [{"url": fakes[role].url}]
        base["json_guard"].update({"backoff_base": 0.0, "jitter": 0.0})
        base["database"].update(
            {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")}
        )
        base["resources"]["interval"] = 3600.0
        base["modes"]["interval"] = 3600.0  # evaluated by hand below
        config = BrownoutConfig.model_validate(base)
        runtime = Runtime(config, events=EventBus())
        app = create_app(config, runtime)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=30) as http:
                for _ in range(500):  # the first probes and the watchers' first look are done
                    svc = runtime.service
                    probed = svc is not None and len(svc.stats.health) == len(ROLES)
                    if probed and runtime.ops.resources.samples and runtime.ops.modes.evaluations:
                        break
                    await asyncio.sleep(0.01)
                yield runtime, http, fakes
    finally:
        for fake in fakes.values():
            await fake.stop()


async def test_degraded_mode_switches_the_hinter_off_and_normal_brings_it_back(tmp_path: Path) -> None:
    async with serve(tmp_path) as (rt, http, fakes):
        assert rt.service is not None
        assert rt.service.cache.ttl == 3600  # the adaptive TTL's base, applied at start
        health = (await http.get("/health")).json()
        assert health["system_mode"] == "normal"
        assert health["cache"]["ttl_seconds"] == 3600

        cpu = {"now": 85.0}  # a warning is reported, but switches nothing off
        rt.ops.resources.sampler = lambda first: ResourceSample(0.0, cpu["now"], 40.0)
        await rt.ops.resources.check()
        assert rt.ops.modes.evaluate() is SystemMode.NORMAL
        cpu["now"] = 96.0  # critical: the resources component is unhealthy, the mode degraded
        rt.ops.resources.sampler = lambda first: ResourceSample(0.0, cpu["now"], 40.0)
        await rt.ops.resources.check()
        assert rt.ops.modes.evaluate() is SystemMode.DEGRADED
        # The proactive recovery chain (it probes the models) runs its course.
        await until(lambda: bool(rt.recovery.outcomes) and not rt.recovery.busy, "the proactive chain to end")
        before = fakes["llama"].chat_requests
        body = (await http.post("/v1/briefs", json={"text": "a smoky vetiver", "mode": "creative"})).json()
        assert body["served_mode"] == "balanced"
        assert body["reason"] == "llama unavailable"
        assert fakes["llama"].chat_requests == before  # the hinter was not called
        assert (await http.get("/health")).json()["system_mode"] == "degraded"
        assert rt.ops.ttl.adjust(0.0) == 3600  # degraded: the TTL is not lowered

        cpu["now"] = 20.0
        await rt.ops.resources.check()
        rt.ops.modes.evaluate()
        assert rt.ops.modes.evaluate() is SystemMode.NORMAL
        body = (await http.post("/v1/briefs", json={"text": "a green fig", "mode": "creative"})).json()
        assert body["served_mode"] == "creative"
        assert fakes["llama"].chat_requests == before + 1
        status = (await http.get("/api/v1/recovery/health")).json()["system_mode"]
        assert status["mode"] == "normal"
        assert [(f["component"], f["status"]) for f in status["failure_history"]] == [
            ("resources", "unhealthy")
        ]
        assert status["failure_history"][0]["recovered_at"] is not None
        # The idle system's TTL now halves towards the minimum, and the cache uses it.
        assert rt.ops.ttl.tick() == 1800
        assert rt.service.cache.ttl == 1800


async def test_a_generator_outage_in_emergency_mode_is_served_as_fallback_not_all_down(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path) as (rt, http, fakes):
        fakes["qwen"].set("down")
        await rt.probe_all()  # the generator fails its probe: a core component is unhealthy
        assert rt.ops.modes.evaluate() is SystemMode.EMERGENCY
        assert rt.service is not None
        assert rt.service.switched_off["system_mode"] == frozenset({"llama", "mistral"})
        body = (
            await http.post("/v1/briefs", json={"text": "a green tea and fig cologne", "mode": "balanced"})
        ).json()
        # The validator and hinter are switched off, not down: this is the generator's fallback (a
        # brief built from the customer's text by the rules), not emergency's generic popular brief.
        assert body["served_mode"] == "fallback"
        assert body["stages"][0]["served_by"] in ("cache", "rules")
