"""The dimmer wired into the brief service: what a request leaves out under load, and what it says.

Real pipeline runs over real HTTP to fault-injecting model servers on 127.0.0.1 (the ``fakes``
fixture). The dimmer's value is pinned (``force``) where a test needs a given level; the bounded load
test lets the controller move it by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from brownout.briefs.schema import CreativeBrief
from brownout.briefs.service import BriefService
from brownout.briefs.similar import SimilarityIndex
from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.errors import ConfigError, ServiceUnavailable
from brownout.events import DimmerChanged, EventBus
from brownout.llm.client import ModelClient
from brownout.llm.pipeline import Mode, Pipeline, PipelineContext, Stage
from brownout.llm.types import EndpointConfig
from brownout.policies.cpu_budget import CpuBudget, CpuBudgetConfig
from brownout.policies.dimmer import Dimmer
from brownout.testing import FakeClock
from support.stack import distinct_text, make_config, serve
from support.wait import until

TEXT = "a fresh citrus perfume for hot summer days"


@contextlib.asynccontextmanager
async def service_on(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    overrides: Mapping[str, Any] | None = None,
    bus: EventBus | None = None,
) -> AsyncIterator[BriefService]:
    """The brief service alone, each role on its fake."""
    config: BrownoutConfig = make_config({r: f.url for r, f in fakes.items()}, tmp_path / "b.db", overrides)
    group = config.circuit_breaker.group()
    events = bus or EventBus()
    clients = {
        role: ModelClient(
            role,
            [EndpointConfig(url=fakes[role].url, model=role)],
            breakers=group,
            timeout=5.0,
            events=events,
        )
        for role in ROLES
    }
    service = BriefService(config, clients, events=events, rng=random.Random(3))
    try:
        yield service
    finally:
        await service.aclose()
        for client in clients.values():
            await client.aclose()


class CountingIndex(SimilarityIndex[CreativeBrief]):
    """The service's similarity index, remembering the texts it was asked to search for."""

    def __init__(self) -> None:
        super().__init__()
        self.searched: list[str] = []

    def search(self, text: str) -> tuple[CreativeBrief, float] | None:
        self.searched.append(text)
        return super().search(text)


def calls(fakes: dict[str, FakeLLM]) -> dict[str, int]:
    return {role: fake.chat_requests for role, fake in fakes.items()}


async def test_at_low_load_an_ordinary_brief_is_unchanged(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with service_on(fakes, tmp_path) as svc:
        answer = await svc.create_brief(TEXT, "creative")
        assert answer["served_mode"] == "creative"
        assert answer["downshifted"] is False
        assert answer["reason"] is None
        assert "dimmed" not in answer
        assert svc.dimmer.level == 0
        assert calls(fakes) == {"qwen": 1, "mistral": 1, "llama": 1}
        assert sum(svc.stats.dimmed.values()) == 0


@pytest.mark.parametrize(
    ("value", "mode", "served", "dimmed", "model_calls"),
    [
        (0.25, "creative", "balanced", ["creative_hints"], {"qwen": 1, "mistral": 1, "llama": 0}),
        (0.25, "balanced", "balanced", None, {"qwen": 1, "mistral": 1, "llama": 0}),
        (0.5, "creative", "fast", ["creative_hints", "validation"], {"qwen": 1, "mistral": 0, "llama": 0}),
        (0.5, "balanced", "fast", ["validation"], {"qwen": 1, "mistral": 0, "llama": 0}),
        (0.5, "fast", "fast", None, {"qwen": 1, "mistral": 0, "llama": 0}),
        # Generation is dimmed only where a similar earlier brief can stand in: none here, so it runs.
        (0.75, "creative", "fast", ["creative_hints", "validation"], {"qwen": 1, "mistral": 0, "llama": 0}),
    ],
)
async def test_a_dimmer_level_serves_the_right_mode_and_says_so(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    value: float,
    mode: str,
    served: str,
    dimmed: list[str] | None,
    model_calls: dict[str, int],
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        svc.dimmer.force(value)
        answer = await svc.create_brief(TEXT, mode)
        assert answer["requested_mode"] == mode
        assert answer["served_mode"] == served
        assert calls(fakes) == model_calls
        if dimmed is None:
            assert "dimmed" not in answer
            assert answer["downshifted"] is False
            return
        assert answer["dimmed"] == dimmed
        assert answer["reason"] == "load"
        assert answer["downshifted"] is True
        assert answer["impact"]  # what the customer loses, as for any downshift
        assert answer["degraded"] is True
        assert all(svc.stats.dimmed[step] == 1 for step in dimmed)
        # A dimmed answer is not cached as if it were the full one.
        assert svc.cache.peek(svc.cache_key(TEXT, mode)) is None


async def test_past_the_validator_a_similar_brief_stands_in_for_generating(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        svc.similar = counting = CountingIndex()
        first = await svc.create_brief(TEXT, "fast")
        assert first["stages"][0]["served_by"] == "model:qwen"
        svc.dimmer.force(0.75)
        before = calls(fakes)
        counting.searched.clear()
        answer = await svc.create_brief(TEXT + " please", "creative")  # similar, not the same request
        assert calls(fakes) == before  # no model call at all
        # The dimmer's check for a stand-in and the fallback that serves it share one search.
        assert counting.searched == [TEXT + " please"]
        assert answer["served_mode"] == "fallback"
        assert answer["stages"][0]["served_by"] == "cache"
        assert answer["dimmed"] == ["creative_hints", "validation", "generation"]
        assert answer["reason"] == "load"
        assert answer["reliability"] == "medium"


async def test_fully_dimmed_the_rules_answer_without_any_model_call(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        svc.dimmer.force(1.0)
        answer = await svc.create_brief("a warm amber scent for winter nights", "balanced")
        assert calls(fakes) == {"qwen": 0, "mistral": 0, "llama": 0}
        assert answer["served_mode"] == "fallback"
        assert answer["stages"][0]["served_by"] == "rules"
        assert answer["dimmed"] == ["validation", "generation"]
        assert answer["reliability"] == "low"


async def test_the_dimmer_never_leaves_a_free_generator_slot_idle(
    fakes: dict[str, FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        clock = FakeClock()
        svc.dimmer = Dimmer("briefs", svc.dimmer.steps, svc.dimmer.config, clock=clock, rng=random.Random(1))
        for _ in range(40):  # answers three times past their target: the controller dims everything
            svc.dimmer.observe(30.0)
            clock.advance(0.5)
        assert svc.dimmer.value == 1.0
        assert not svc.dimmer.forced
        # The generator has a free slot: a request starting on it now waits for nobody, so it gets
        # the generator; the optional stages before generation stay dimmed.
        answer = await svc.create_brief(TEXT, "creative")
        assert calls(fakes) == {"qwen": 1, "mistral": 0, "llama": 0}
        assert answer["stages"][0]["served_by"] == "model:qwen"
        assert answer["served_mode"] == "fast"
        assert answer["dimmed"] == ["creative_hints", "validation"]
        assert answer["reason"] == "load"
        # Every slot taken (a call would wait a minute): fully dimmed, no model call at all.
        monkeypatch.setattr(ModelClient, "estimated_wait", lambda self, ahead=0: 60.0)
        busy = await svc.create_brief("a smoky leather scent for a night out", "fast")
        assert calls(fakes) == {"qwen": 1, "mistral": 0, "llama": 0}
        assert busy["stages"][0]["served_by"] in ("cache", "rules")
        assert busy["dimmed"][-1] == "generation"


async def test_the_dimmer_can_be_switched_off_or_pinned_in_config(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path, {"dimmer": {"enabled": False}}) as svc:
        svc.dimmer.observe(100.0)
        assert svc.dimmer.decide().dimmed == ()
    async with service_on(fakes, tmp_path, {"dimmer": {"force_value": 0.5}}) as svc:
        assert svc.dimmer.level == 2


# -------------------------------------------------------------------------------- bounded load


async def test_under_overload_answers_dim_rejections_never_wait_and_full_service_returns(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Every model call takes 0.3 s; two pipeline runs at once: about two full creative briefs a second.
    for fake in fakes.values():
        fake.set(mode="ok", delay=0.3)
    bus = EventBus()
    levels: list[int] = []
    bus.subscribe(lambda e: levels.append(e.new_level), DimmerChanged)
    overrides = {
        "queue": {"max_concurrent": 2, "max_size": 500, "max_wait": 30.0},
        "cache": {"enabled": False},
        "dimmer": {
            "targets": {"fast": 2.0, "balanced": 2.0, "creative": 2.0},
            "window": 2.0,
            "interval": 0.25,
        },
    }
    async with service_on(fakes, tmp_path, overrides, bus) as svc:
        for i in range(2):  # the admission learns the service time at low load: full answers
            warm = await svc.create_brief(distinct_text(-1 - i), "creative")
            assert warm["served_mode"] == "creative"
            assert "dimmed" not in warm
        outcomes: list[dict[str, Any] | ServiceUnavailable] = []

        async def one(i: int) -> None:
            try:
                outcomes.append(await svc.create_brief(distinct_text(i), "creative"))
            except ServiceUnavailable as e:
                outcomes.append(e)

        # 12 requests a second for 6 s (72 in all, at most 72 in flight): six times what fits in full.
        tasks: list[asyncio.Task[None]] = []
        for i in range(72):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(1 / 12)
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)

        answers = [o for o in outcomes if isinstance(o, dict)]
        refused = [o for o in outcomes if isinstance(o, ServiceUnavailable)]
        assert len(answers) + len(refused) == 72
        dimmed = [a for a in answers if a.get("dimmed")]
        # Answers dim instead of failing: optional stages left out, the reason said.
        assert dimmed, "the overload dimmed nothing"
        assert all(a["reason"] == "load" for a in dimmed)
        assert max(levels) >= 1
        # Refusals are the at-once kind, with an estimated Retry-After.
        assert all(e.retry_after >= 1.0 for e in refused)
        assert all("latency target" in str(e) for e in refused)
        stats = svc.admission.stats
        assert stats.rejected["queue_full"] == 0
        # Refused at once on the estimate: nothing else refuses these requests. One a busy machine
        # made the estimate hopeful for left the queue at its deadline to start, and was answered
        # without the generator.
        assert stats.rejected["deadline"] == len(refused)
        assert stats.admitted + stats.rejected["queue_timeout"] == len(answers) + 2
        # Every caller that joined the queue was admitted, or left it at its deadline to start.
        assert stats.queued <= stats.admitted + stats.rejected["queue_timeout"]
        # No model was failed by the load.
        assert sum(svc.stats.failures.values()) == 0
        # The load is over: full service comes back by itself.
        await until(
            lambda: svc.dimmer.level == 0,
            "the dimmer back at level 0",
            timeout=svc.dimmer.recovery_time + 5.0,
        )
        after = await svc.create_brief(distinct_text(1000), "creative")
        assert after["served_mode"] == "creative"
        assert "dimmed" not in after


# -------------------------------------------------------------------------------- the app


async def test_health_metrics_and_the_live_snapshot_show_the_dimmer(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        health = (await stack.http.get("/health")).json()
        assert health["dimmer"]["level"] == 0
        assert health["dimmer"]["value"] == 0.0
        assert health["dimmer"]["target_p95"] == 10.0
        assert health["dimmer"]["dimming"] is None
        answer = (await stack.http.post("/v1/briefs", json={"text": TEXT, "mode": "creative"})).json()
        assert "dimmed" not in answer

        stack.service.dimmer.force(0.5)
        dimmed = (
            await stack.http.post("/v1/briefs", json={"text": "a woody scent for autumn", "mode": "creative"})
        ).json()
        assert dimmed["served_mode"] == "fast"
        assert dimmed["reason"] == "load"
        assert dimmed["dimmed"] == ["creative_hints", "validation"]
        health = (await stack.http.get("/health")).json()
        assert health["dimmer"]["level"] == 2
        assert health["dimmer"]["value"] == 0.5
        assert health["dimmer"]["dimming"] == "validation"
        assert health["dimmer"]["observed_p95"] is not None  # two answers completed in the window

        text = (await stack.http.get("/metrics")).text
        assert "brownout_dimmer_level 2.0" in text
        assert "brownout_dimmer_value 0.5" in text
        assert 'brownout_briefs_dimmed_total{dimmed="creative_hints"} 1.0' in text
        assert 'brownout_briefs_dimmed_total{dimmed="validation"} 1.0' in text
        assert 'brownout_briefs_dimmed_total{dimmed="generation"} 0.0' in text

        snap = stack.runtime.status.snapshot()
        assert snap["dimmer"]["level"] == 2
        assert snap["dimmer"]["dimming"] == "validation"


# -------------------------------------------------------------------------------- config


def test_the_dimmer_section_refuses_bad_values_naming_the_key() -> None:
    assert load_config(None, environ={}).dimmer.target("creative") == 10.0
    env = {"BROWNOUT__DIMMER__TARGETS": "{fast: 3, balanced: 6, creative: 9}"}
    config = load_config(None, environ=env)
    assert (config.dimmer.target("fast"), config.dimmer.target("creative")) == (3.0, 9.0)
    with pytest.raises(ConfigError, match="dimmer"):
        load_config(None, environ={"BROWNOUT__DIMMER__TARGETS": "{turbo: 3}"})
    with pytest.raises(ConfigError, match="positive"):
        load_config(None, environ={"BROWNOUT__DIMMER__TARGETS": "{fast: 0}"})
    with pytest.raises(ConfigError, match="dead_band"):
        load_config(None, environ={"BROWNOUT__DIMMER__DEAD_BAND": "0.9"})
    with pytest.raises(ConfigError, match=r"dimmer\.force_value"):
        load_config(None, environ={"BROWNOUT__DIMMER__FORCE_VALUE": "2"})


# -------------------------------------------------------------------------------- the one rule


@pytest.mark.parametrize(
    ("down", "requested", "ceiling", "served", "reason"),
    [
        ((), "creative", None, "creative", ""),
        ((), "creative", "balanced", "balanced", "load"),
        ((), "balanced", "creative", "balanced", ""),  # a ceiling above the request changes nothing
        (("llama",), "creative", "balanced", "balanced", "load"),  # the load alone explains it
        (("mistral",), "creative", "balanced", "fast", "mistral unavailable"),
        (("qwen",), "creative", "fast", None, "qwen unavailable"),
    ],
)
def test_one_downshift_rule_richest_mode_available_and_fitting_the_load(
    down: tuple[str, ...], requested: str, ceiling: str | None, served: str | None, reason: str
) -> None:
    async def nothing(ctx: PipelineContext) -> None:
        return None

    pipeline: Pipeline[PipelineContext] = Pipeline(
        "p",
        [
            Stage("generate", "qwen", nothing),
            Stage("validate", "mistral", nothing),
            Stage("hint", "llama", nothing),
        ],
        [
            Mode("fast", ("generate",)),
            Mode("balanced", ("generate", "validate")),
            Mode("creative", ("generate", "validate", "hint")),
        ],
        available=lambda role: role not in down,
        events=EventBus(),
    )
    selection = pipeline.select(requested, ceiling=ceiling)
    assert (selection.mode.name if selection.mode else None) == served
    assert selection.reason == reason
    with pytest.raises(ValueError, match="unknown mode 'turbo'"):
        pipeline.select("fast", ceiling="turbo")


# -------------------------------------------------------------------------------- the CPU budget


class _Cpu:
    """A CPU-time counter the test sets: the budget reads it instead of the process's."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def _over_budget(svc: BriefService, clock: FakeClock, cpu: _Cpu, cores: float = 4.0) -> None:
    """Give ``svc`` a CPU budget of 0.25 cores and a process that used ``cores`` for a few steps."""
    svc.cpu_budget = CpuBudget("t", CpuBudgetConfig(budget=0.25), clock=clock, cpu_time=cpu)
    for _ in range(4):
        clock.advance(0.5)
        cpu.seconds += 0.5 * cores
        svc.cpu_budget.share  # noqa: B018 -- a step is taken when the budget is asked


def test_the_cpu_budget_is_on_by_itself_only_beside_a_local_generator() -> None:
    default = load_config(None, environ={})
    assert default.models.local_roles() == list(ROLES)
    assert default.dimmer.effective_cpu_budget(True) == 0.1
    # Cores the local model servers' threads leave free are the service's to use.
    assert default.dimmer.effective_cpu_budget(True, spare_cores=2.0) == 2.1
    assert default.dimmer.effective_cpu_budget(False, spare_cores=2.0) is None
    assert default.dimmer.effective_cpu_budget(False) is None
    pinned = load_config(None, environ={"BROWNOUT__DIMMER__CPU_BUDGET": "0.5"})
    assert pinned.dimmer.effective_cpu_budget(False) == 0.5
    off = load_config(None, environ={"BROWNOUT__DIMMER__CPU_BUDGET": "null"})
    assert off.dimmer.effective_cpu_budget(True) is None
    for bad in ("0", "-1", "lots", "true", "2000"):
        with pytest.raises(ConfigError, match="cpu_budget must be a number of cores above 0, auto or null"):
            load_config(None, environ={"BROWNOUT__DIMMER__CPU_BUDGET": bad})


def test_a_latency_budget_is_seconds_auto_or_null() -> None:
    env = "BROWNOUT__MODELS__ROLES__QWEN__LIMITER__LATENCY_BUDGET"
    assert load_config(None, environ={}).models.roles["qwen"].limiter.latency_budget == "auto"
    assert load_config(None, environ={env: "7.5"}).models.roles["qwen"].limiter.latency_budget == 7.5
    assert load_config(None, environ={env: "null"}).models.roles["qwen"].limiter.latency_budget is None
    for bad in ("0", "-1", "soon", "true", "inf"):
        with pytest.raises(
            ConfigError, match="latency_budget must be a number of seconds above 0, auto or null"
        ):
            load_config(None, environ={env: bad})


async def test_the_automatic_cpu_budget_counts_the_cores_the_local_models_leave_free() -> None:
    default = load_config(None, environ={})
    # The shared server takes up to 4 threads: on 2 cores none is left, on 8 cores 4 are.
    assert default.models.local_threads(2.0) == 2
    assert default.models.local_threads(8.0) == 4
    per_role = load_config(None, environ={"BROWNOUT__MODELS__LOCAL__LAYOUT": "per_role"})
    assert per_role.models.local_threads(8.0) == 3  # a one-thread server per role
    for cores, budget in ((2.0, 0.1), (1.5, 0.6), (8.0, 4.1)):  # 1.5 cores: a 1-thread server
        svc = BriefService(default, {}, cores=cores)
        try:
            assert svc.cpu_budget is not None
            assert svc.cpu_budget.config.budget == budget
        finally:
            await svc.aclose()


async def test_over_the_cpu_budget_an_answer_without_the_model_is_refused_with_retry_after(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        assert svc.cpu_budget is None  # the models are on endpoints: nothing to protect by default
        svc.dimmer.force(1.0)  # every request would get the rules at once
        clock, cpu = FakeClock(), _Cpu()
        _over_budget(svc, clock, cpu)
        assert svc.cpu_budget is not None
        assert svc.cpu_budget.share == 1.0
        with pytest.raises(ServiceUnavailable, match="CPU budget") as refused:
            await svc.create_brief(TEXT, "fast")
        assert refused.value.retry_after is not None
        assert refused.value.retry_after >= 1.0
        assert svc.stats.rejected["cpu_budget"] == 1
        assert calls(fakes) == {"qwen": 0, "mistral": 0, "llama": 0}
        # Back within the budget, the same request gets its answer from the rules at once.
        for _ in range(12):
            clock.advance(0.5)
            cpu.seconds += 0.5 * 0.05
            svc.cpu_budget.share  # noqa: B018
        assert svc.cpu_budget.share == 0.0
        answer = await svc.create_brief(TEXT, "fast")
        assert answer["dimmed"] == ["generation"]
        assert [s["served_by"] for s in answer["stages"]] == ["rules"]
        # It says the generator was busy, not that it failed.
        assert any("Generated from fallback due to the generator being busy" in w for w in answer["warnings"])
        assert not any("model failure" in w for w in answer["warnings"])


async def test_callers_refused_for_the_cpu_budget_take_their_places_in_the_line_of_returns(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # They compete for the same pipelines as the callers the admission refuses: paced the same way,
    # a pipeline run apart over four per run (queue.retry_pacing), not all back together.
    fakes["qwen"].set("slow", delay=1.0)
    async with service_on(fakes, tmp_path) as svc:
        await svc.create_brief(TEXT, "fast")  # one pipeline run measured
        run = svc.admission.service_time
        assert run is not None
        assert run >= 1.0  # places 1/16 s apart or more: refusals a few ms apart would not pass
        svc.dimmer.force(1.0)
        _over_budget(svc, FakeClock(), _Cpu())
        back_at: list[float] = []
        for i in range(4):
            with pytest.raises(ServiceUnavailable, match="CPU budget") as refused:
                await svc.create_brief(distinct_text(i), "fast")
            assert refused.value.retry_after is not None
            back_at.append(time.monotonic() + refused.value.retry_after)
        spacing = run / (svc.config.queue.max_concurrent * 4)
        gaps = [b - a for a, b in itertools.pairwise(back_at)]
        assert gaps == pytest.approx([spacing] * 3, abs=0.01)
        assert svc.stats.rejected["cpu_budget"] == 4


async def test_over_the_cpu_budget_a_request_the_model_would_take_is_not_refused(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        clock, cpu = FakeClock(), _Cpu()
        _over_budget(svc, clock, cpu)
        answer = await svc.create_brief(TEXT, "fast")  # the generator is free: the budget is not asked
        assert [s["served_by"] for s in answer["stages"]] == ["model:qwen"]
        # Generation dimmed, but no similar earlier brief and room at the generator: it still gets
        # the model, never a refusal -- refusing it would leave the generator without work.
        svc.dimmer.force(0.75)
        other = await svc.create_brief("a smoky leather scent for a night out", "fast")
        assert [s["served_by"] for s in other["stages"]] == ["model:qwen"]
        assert svc.stats.rejected["cpu_budget"] == 0


async def test_over_the_cpu_budget_a_request_whose_generator_call_could_not_start_in_time_is_refused(
    fakes: dict[str, FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        # The generator is saturated: a new call would wait a minute for a slot, far beyond the
        # 10 s target, so its call would be refused and the rules would answer at once.
        monkeypatch.setattr(ModelClient, "estimated_wait", lambda self, ahead=0: 60.0)
        monkeypatch.setattr(ModelClient, "service_time", lambda self, quantile=None: 4.0)
        clock, cpu = FakeClock(), _Cpu()
        _over_budget(svc, clock, cpu)
        with pytest.raises(ServiceUnavailable, match="CPU budget"):
            await svc.create_brief(TEXT, "fast")
        assert svc.stats.rejected["cpu_budget"] == 1
        assert calls(fakes)["qwen"] == 0
