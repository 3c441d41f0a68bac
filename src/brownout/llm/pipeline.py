"""The generic pipeline engine: stages bound to model roles, modes that choose stages, one downshift rule.

A *stage* is one step of a request (generate, validate, hint) bound to a model *role* ("qwen"); it
has a model-backed function and an ordered list of fallback strategies (cache, rules, templates)
tried when the model call fails during the request. A *mode* is the list of stages it runs; modes
are ordered from poorest to richest (``fast`` < ``balanced`` < ``creative``).

The downshift rule is the whole of it: **serve the richest mode not above the one requested whose
roles are all available and fit the load**. What fits the load is the caller's to say: ``ceiling``
names the richest mode the load allows for this request (the brief service asks its dimmer); a
downshift caused by it alone says ``reason`` "load". The usual downshift tree (creative → balanced
when Llama is down, → fast when Mistral is down too, → fallback when Qwen is down) is a consequence.
When no mode is available, :meth:`Pipeline.run` raises :class:`NoModeAvailable` and the caller
decides (the brief service goes to its fallback or emergency path).

Two kinds of degradation are kept apart and both reported:

* *downshift* -- decided before running, from role availability (breakers, health checks): whole
  stages are left out and their features are lost;
* *stage fallback* -- a model call fails while running: that stage is served by its fallback
  strategy (``served_by`` says which), the mode stays.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from brownout import telemetry
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import BrownoutError
from brownout.events import DEFAULT_BUS, EventBus, ModeDownshifted
from brownout.policies.fallback import PRIMARY, FallbackChain, Strategy

__all__ = [
    "Mode",
    "NoModeAvailable",
    "Pipeline",
    "PipelineContext",
    "PipelineResult",
    "Selection",
    "Stage",
    "StageReport",
]


@dataclass
class PipelineContext:
    """What flows through the stages: the request and each stage's value, by stage name."""

    text: str
    requested_mode: str
    values: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", bound=PipelineContext)


@dataclass(frozen=True, slots=True)
class Stage(Generic[C]):
    """One step bound to a model role.

    ``run(ctx)`` calls the model; ``fallbacks`` are tried in order when it fails (each is a
    :class:`~brownout.policies.fallback.Strategy` whose ``fn`` takes the context). ``feature`` names
    what a mode without this stage lacks (reported in ``features_lost``).
    """

    name: str
    role: str
    run: Callable[[C], Awaitable[Any]]
    fallbacks: tuple[Strategy[Any], ...] = ()
    feature: str = ""


@dataclass(frozen=True, slots=True)
class Mode:
    """A named selection of stages, run in order."""

    name: str
    stages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which mode serves a request, and why."""

    requested: str
    mode: Mode | None
    downshifted: bool
    reason: str
    unavailable: tuple[str, ...]
    features_lost: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StageReport:
    """How one stage was served: ``served_by`` is ``"model:<role>"`` or the fallback's name."""

    stage: str
    role: str
    served_by: str
    latency_ms: float
    warnings: tuple[str, ...] = ()
    causes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PipelineResult(Generic[C]):
    """The outcome of :meth:`Pipeline.run`."""

    selection: Selection
    stages: tuple[StageReport, ...]
    warnings: tuple[str, ...]
    context: C

    @property
    def served_mode(self) -> str:
        """The mode that served (never None here: no mode raises NoModeAvailable)."""
        assert self.selection.mode is not None
        return self.selection.mode.name

    @property
    def degraded(self) -> bool:
        """True when downshifted or any stage was served by a fallback."""
        return self.selection.downshifted or any(not s.served_by.startswith("model:") for s in self.stages)


class NoModeAvailable(BrownoutError):
    """No mode at or below the requested one has all its roles available."""

    def __init__(self, selection: Selection) -> None:
        super().__init__(f"no mode available for {selection.requested!r}: {selection.reason}")
        self.selection = selection


class Pipeline(Generic[C]):
    """Stages and modes with the downshift rule; see the module docstring."""

    def __init__(
        self,
        name: str,
        stages: Sequence[Stage[C]],
        modes: Sequence[Mode],
        *,
        available: Callable[[str], bool],
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.name = name
        self.stages = {s.name: s for s in stages}
        if len(self.stages) != len(stages):
            raise ValueError("stage names must be unique")
        self.modes = tuple(modes)
        self._mode_index = {m.name: i for i, m in enumerate(self.modes)}
        for mode in self.modes:
            unknown = [s for s in mode.stages if s not in self.stages]
            if unknown:
                raise ValueError(f"mode {mode.name!r} names unknown stage(s) {unknown}")
        self._available = available
        self._clock = clock
        self._events = events
        self._chains = {
            s.name: FallbackChain(f"{name}.{s.name}", s.fallbacks, clock=clock, events=events) for s in stages
        }

    def roles(self, mode: Mode) -> tuple[str, ...]:
        """The model roles ``mode`` needs, in stage order."""
        return tuple(dict.fromkeys(self.stages[s].role for s in mode.stages))

    def select(self, requested: str, *, ceiling: str | None = None) -> Selection:
        """Apply the downshift rule to ``requested`` with the roles' availability right now.

        ``ceiling``: the richest mode the load allows (None: any); a downshift it alone caused has
        reason ``"load"``.
        """
        index = self._mode_index.get(requested)
        if index is None:
            raise ValueError(f"unknown mode {requested!r}; choose from {list(self._mode_index)}")
        top = index
        if ceiling is not None:
            limit = self._mode_index.get(ceiling)
            if limit is None:
                raise ValueError(f"unknown mode {ceiling!r}; choose from {list(self._mode_index)}")
            top = min(index, limit)
        all_roles = tuple(dict.fromkeys(s.role for s in self.stages.values()))
        unavailable = tuple(r for r in all_roles if not self._available(r))
        wanted = self.modes[index]
        for mode in reversed(self.modes[: top + 1]):
            if not any(r in unavailable for r in self.roles(mode)):
                downshifted = mode is not wanted
                lost = tuple(
                    self.stages[s].feature
                    for s in wanted.stages
                    if s not in mode.stages and self.stages[s].feature
                )
                missing = [r for r in self.roles(self.modes[top]) if r in unavailable]
                if not downshifted:
                    reason = ""
                elif missing:
                    reason = f"{', '.join(missing)} unavailable"
                else:
                    reason = "load"
                return Selection(requested, mode, downshifted, reason, unavailable, lost)
        missing = [r for r in self.roles(self.modes[0]) if r in unavailable]
        lost = tuple(self.stages[s].feature for s in wanted.stages if self.stages[s].feature)
        return Selection(requested, None, True, f"{', '.join(missing)} unavailable", unavailable, lost)

    async def run(self, requested: str, context: C, *, ceiling: str | None = None) -> PipelineResult[C]:
        """Select a mode (see :meth:`select`) and run its stages; raises NoModeAvailable, or
        AllFallbacksFailed from a stage."""
        selection = self.select(requested, ceiling=ceiling)
        if selection.downshifted and self._events.active:
            self._events.emit(
                ModeDownshifted(
                    self.name,
                    self._clock.now(),
                    requested,
                    selection.mode.name if selection.mode else "none",
                    selection.reason,
                )
            )
        if selection.mode is None:
            raise NoModeAvailable(selection)
        reports: list[StageReport] = []
        warnings: list[str] = []
        if selection.downshifted:
            warnings.append(f"Downshifted from {requested} to {selection.mode.name}: {selection.reason}")
        for stage_name in selection.mode.stages:
            stage = self.stages[stage_name]
            started = self._clock.now()
            # A span per stage (tracing on): its model calls, and the fallback that served it when
            # they failed (the chain's FallbackServed event lands on it), nest under it.
            with telemetry.span(
                f"stage {stage_name}", attributes={"brownout.stage": stage_name, "brownout.role": stage.role}
            ) as span:
                result = await self._chains[stage_name].execute(stage.run, context)
                served_by = f"model:{stage.role}" if result.served_by == PRIMARY else result.served_by
                if span is not None:
                    span.set_attribute("brownout.served_by", served_by)
            context.values[stage_name] = result.value
            reports.append(
                StageReport(
                    stage=stage_name,
                    role=stage.role,
                    served_by=served_by,
                    latency_ms=round((self._clock.now() - started) * 1000, 1),
                    warnings=result.warnings,
                    causes=tuple(f"{name}: {type(e).__name__}: {e}" for name, e in result.causes),
                )
            )
            warnings.extend(result.warnings)
        return PipelineResult(selection, tuple(reports), tuple(warnings), context)
