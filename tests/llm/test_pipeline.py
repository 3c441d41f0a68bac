"""The generic pipeline engine (brownout.llm.pipeline), on made-up stages and roles: the downshift rule,
what a downshift loses and why, stage fallbacks, and the events and warnings it reports."""

from __future__ import annotations

from typing import Any

import pytest

from brownout.errors import AllFallbacksFailed, ModelError
from brownout.events import EventBus, ModeDownshifted
from brownout.llm.pipeline import Mode, NoModeAvailable, Pipeline, PipelineContext, Stage
from brownout.policies.fallback import Strategy
from brownout.testing import FakeClock

MODES = (
    Mode("fast", ("draft",)),
    Mode("balanced", ("draft", "check")),
    Mode("creative", ("draft", "check", "polish")),
)


class World:
    """Roles that are up or down, and model calls that answer or fail."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.failing: set[str] = set()
        self.calls: list[str] = []

    def model(self, stage: str) -> Any:
        async def call(ctx: PipelineContext) -> str:
            self.calls.append(stage)
            if stage in self.failing:
                raise ModelError(f"{stage} model failed")
            return f"{stage}({ctx.text})"

        return call


def pipeline(
    world: World, bus: EventBus | None = None, **fallbacks: tuple[Strategy[Any], ...]
) -> Pipeline[PipelineContext]:
    stages = [
        Stage("draft", "writer", world.model("draft"), fallbacks.get("draft", ())),
        Stage("check", "checker", world.model("check"), fallbacks.get("check", ()), feature="checking"),
        Stage("polish", "stylist", world.model("polish"), fallbacks.get("polish", ()), feature="style hints"),
    ]
    return Pipeline(
        "test",
        stages,
        MODES,
        available=lambda role: role not in world.down,
        clock=FakeClock(),
        events=bus or EventBus(),
    )


def test_stages_and_modes_are_checked_when_built() -> None:
    world = World()
    run = world.model("x")
    with pytest.raises(ValueError, match="stage names must be unique"):
        Pipeline("p", [Stage("a", "r", run), Stage("a", "r", run)], [], available=lambda r: True)
    with pytest.raises(ValueError, match=r"mode 'm' names unknown stage\(s\) \['b'\]"):
        Pipeline("p", [Stage("a", "r", run)], [Mode("m", ("a", "b"))], available=lambda r: True)


def test_the_requested_mode_serves_when_its_roles_are_up() -> None:
    p = pipeline(World())
    selection = p.select("creative")
    assert selection.mode == MODES[2]
    assert (selection.downshifted, selection.reason, selection.unavailable, selection.features_lost) == (
        False,
        "",
        (),
        (),
    )
    assert p.roles(MODES[2]) == ("writer", "checker", "stylist")


@pytest.mark.parametrize(
    ("down", "served", "reason", "lost"),
    [
        ({"stylist"}, "balanced", "stylist unavailable", ("style hints",)),
        ({"checker"}, "fast", "checker unavailable", ("checking", "style hints")),
        ({"checker", "stylist"}, "fast", "checker, stylist unavailable", ("checking", "style hints")),
    ],
)
def test_the_richest_mode_with_every_role_up_serves(
    down: set[str], served: str, reason: str, lost: tuple[str, ...]
) -> None:
    world = World()
    world.down = down
    selection = pipeline(world).select("creative")
    assert selection.mode is not None
    assert (selection.mode.name, selection.downshifted, selection.reason, selection.features_lost) == (
        served,
        True,
        reason,
        lost,
    )


def test_a_downshift_for_load_alone_says_load() -> None:
    p = pipeline(World())
    selection = p.select("creative", ceiling="fast")
    assert selection.mode is not None
    assert (selection.mode.name, selection.reason) == ("fast", "load")
    # A ceiling above the request changes nothing; a role down below the ceiling is named, not the load.
    assert p.select("balanced", ceiling="creative").downshifted is False
    world = World()
    world.down = {"checker"}
    assert pipeline(world).select("creative", ceiling="balanced").reason == "checker unavailable"


def test_unknown_modes_are_refused_naming_the_known_ones() -> None:
    p = pipeline(World())
    with pytest.raises(
        ValueError, match=r"unknown mode 'turbo'; choose from \['fast', 'balanced', 'creative'\]"
    ):
        p.select("turbo")
    with pytest.raises(ValueError, match="unknown mode 'turbo'"):
        p.select("fast", ceiling="turbo")


async def test_without_the_first_role_no_mode_is_available() -> None:
    world = World()
    world.down = {"writer"}
    bus = EventBus()
    seen: list[ModeDownshifted] = []
    bus.subscribe(seen.append, ModeDownshifted)
    with pytest.raises(
        NoModeAvailable, match="no mode available for 'balanced': writer unavailable"
    ) as caught:
        await pipeline(world, bus).run("balanced", PipelineContext("lemon", "balanced"))
    assert caught.value.selection.features_lost == ("checking",)
    assert [(e.requested, e.served, e.reason) for e in seen] == [("balanced", "none", "writer unavailable")]
    assert world.calls == []


async def test_a_run_serves_each_stage_of_the_mode_in_order() -> None:
    world = World()
    ctx = PipelineContext("lemon", "balanced")
    result = await pipeline(world).run("balanced", ctx)
    assert world.calls == ["draft", "check"]
    assert ctx.values == {"draft": "draft(lemon)", "check": "check(lemon)"}
    assert [(s.stage, s.role, s.served_by) for s in result.stages] == [
        ("draft", "writer", "model:writer"),
        ("check", "checker", "model:checker"),
    ]
    assert (result.served_mode, result.degraded, result.warnings) == ("balanced", False, ())
    assert result.context is ctx


async def test_a_downshifted_run_warns_and_emits_once() -> None:
    world = World()
    world.down = {"stylist"}
    bus = EventBus()
    seen: list[ModeDownshifted] = []
    bus.subscribe(seen.append, ModeDownshifted)
    result = await pipeline(world, bus).run("creative", PipelineContext("lemon", "creative"))
    assert result.served_mode == "balanced"
    assert result.degraded
    assert result.warnings == ("Downshifted from creative to balanced: stylist unavailable",)
    assert [(e.source, e.requested, e.served) for e in seen] == [("test", "creative", "balanced")]


async def test_a_failed_model_call_is_served_by_the_stage_s_fallback_and_the_mode_stays() -> None:
    world = World()
    world.failing = {"check"}

    async def rules(ctx: PipelineContext) -> str:
        return "checked by rules"

    fallback = Strategy("rules", rules, warning="checked by rules, not the model")
    result = await pipeline(world, check=(fallback,)).run("balanced", PipelineContext("lemon", "balanced"))
    assert result.served_mode == "balanced"  # a stage fallback is not a downshift
    assert result.selection.downshifted is False
    assert result.degraded
    (draft, check) = result.stages
    assert draft.served_by == "model:writer"
    assert check.served_by == "rules"
    assert check.causes == ("primary: ModelError: check model failed",)
    assert result.warnings == ("checked by rules, not the model",)
    assert result.context.values["check"] == "checked by rules"


async def test_a_stage_with_no_fallback_left_fails_the_run() -> None:
    world = World()
    world.failing = {"draft"}
    with pytest.raises(AllFallbacksFailed):
        await pipeline(world).run("fast", PipelineContext("lemon", "fast"))
