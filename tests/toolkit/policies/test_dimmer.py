"""The dimmer on the FakeClock, driven by a simulated load (a queueing model of the brief pipeline)."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from brownout.events import DimmerChanged, EventBus
from brownout.policies.dimmer import Dimmer, DimmerConfig
from brownout.testing import FakeClock

STEPS = ("creative_hints", "validation", "generation", "model")

# Seconds of model work per stage on one slot, like the brief pipeline: generating is the big part,
# validating and hinting are each half of it; a similar earlier answer or the rules cost almost nothing.
GENERATE, VALIDATE, HINT, SIMILAR, RULES = 2.0, 1.0, 1.0, 0.05, 0.005


def service_time(dimmed: tuple[str, ...]) -> tuple[float, bool]:
    """(seconds of work, whether the generator ran) of a creative request with ``dimmed`` left out."""
    if "model" in dimmed:
        return RULES, False
    if "generation" in dimmed:
        return SIMILAR, False
    work = GENERATE
    if "validation" not in dimmed:
        work += VALIDATE
    if "creative_hints" not in dimmed:
        work += HINT
    return work, True


@dataclass
class Simulation:
    """A FIFO queue in front of ``slots`` workers; requests arrive at ``rate(t)`` per second (Poisson)."""

    dimmer: Dimmer
    clock: FakeClock
    slots: int
    rng: random.Random
    free_at: list[float] = field(default_factory=list)
    completions: list[tuple[float, float, bool, tuple[str, ...]]] = field(default_factory=list)
    """(arrived at, latency, generated, dimmed) of every request, in arrival order."""
    levels: list[tuple[float, int]] = field(default_factory=list)

    def queue_delay(self) -> float:
        """The wait a request arriving now would have before a worker takes it."""
        return max(0.0, min(self.free_at) - self.clock.now()) if self.free_at else 0.0

    def run(self, rate: Callable[[float], float], until: float) -> None:
        """Run from the clock's time to ``until`` (seconds since start); ``rate(t)`` gives arrivals/s."""
        start = self.clock.now() - self.elapsed
        pending: list[tuple[float, float, float]] = []  # (completes at, latency, waited): for the dimmer
        t = self.elapsed
        while t < until:
            r = rate(t)
            gap = self.rng.expovariate(r) if r > 0 else until - t
            t_next = min(until, t + gap)
            # Deliver the completions and control ticks up to the next arrival, in time order.
            while pending and pending[0][0] <= start + t_next:
                done, latency, waited = heapq.heappop(pending)
                self.clock.advance(done - self.clock.now())
                self.dimmer.observe(latency, waited=waited)
                self.levels.append((self.clock.now() - start, self.dimmer.level))
            # Someone looks at the dimmer every half second (as /health and /metrics do).
            while self.clock.now() + 0.5 < start + t_next:
                self.clock.advance(0.5)
                self.levels.append((self.clock.now() - start, self.dimmer.level))
            self.clock.advance(start + t_next - self.clock.now())
            self.levels.append((t_next, self.dimmer.level))
            t = t_next
            if t >= until or r <= 0:
                continue
            decision = self.dimmer.decide()
            work, generated = service_time(decision.dimmed)
            now = self.clock.now()
            worker = min(range(self.slots), key=lambda i: self.free_at[i])
            begins = max(now, self.free_at[worker])
            self.free_at[worker] = begins + work
            latency = begins + work - now
            heapq.heappush(pending, (begins + work, latency, begins - now))
            self.completions.append((t, latency, generated, decision.dimmed))
        self.elapsed = until

    elapsed: float = 0.0


def make(config: DimmerConfig | None = None, *, seed: int = 7, slots: int = 2) -> Simulation:
    clock = FakeClock(start=0.0)
    sim_rng = random.Random(seed)
    holder: list[Simulation] = []
    dimmer = Dimmer(
        "briefs",
        STEPS,
        config or DimmerConfig(target_p95=10.0),
        clock=clock,
        events=EventBus(),
        rng=random.Random(seed + 1),
        queue_delay=lambda: holder[0].queue_delay(),
    )
    sim = Simulation(dimmer, clock, slots, sim_rng, free_at=[0.0] * slots)
    holder.append(sim)
    return sim


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


# Two slots at 4 s per full creative request serve 0.5 requests/s; generating alone (2 s) serves 1/s.
def rising_then_falling(t: float) -> float:
    if t < 60:
        return 0.1  # light: full service
    if t < 240:
        return 1.5  # three times the full-service capacity, 1.5 x what the generator alone can do
    return 0.1  # light again


def test_overload_dims_holds_the_target_keeps_the_generator_busy_and_recovers() -> None:
    sim = make()
    sim.run(rising_then_falling, 400.0)
    light = [c for c in sim.completions if c[0] < 60]
    assert sum(1 for c in light if c[3] == ()) >= 0.9 * len(light), "light load is served in full"
    overload = [c for c in sim.completions if 120 <= c[0] < 240]  # after the controller settled
    # p95 of answers under the overload is back under the target.
    assert p95([c[1] for c in overload]) <= 10.0
    # The generator stays as busy as it can be: its two slots generate ~1 brief/s at most.
    generated_per_s = sum(1 for c in overload if c[2]) / 120.0
    assert generated_per_s >= 0.8
    # Dimmed in order: the hints go first, and something beyond them was needed.
    dimmed = [c[3] for c in overload if c[3]]
    assert dimmed
    assert all(d == STEPS[: len(d)] for d in dimmed)
    # No flapping: the level settles (bounded changes over two minutes of steady overload).
    changes = [
        b for a, b in zip(sim.levels, sim.levels[1:], strict=False) if 120 <= b[0] < 240 and a[1] != b[1]
    ]
    assert len(changes) <= 20
    pairs = zip(sim.levels, sim.levels[1:], strict=False)
    assert all(abs(b[1] - a[1]) == 1 for a, b in pairs if a[1] != b[1]), "one level at a time"
    # Recovery by itself: full service within the dimmer's recovery time after the queue drains.
    recovered_at = next(t for t, level in sim.levels if t >= 240 and level == 0)
    assert recovered_at - 240 <= 10.0 + sim.dimmer.recovery_time
    after = [c for c in sim.completions if c[0] >= recovered_at]
    assert after
    assert all(c[3] == () for c in after)
    assert sim.dimmer.level == 0
    assert sim.dimmer.value == 0.0


def test_without_the_dimmer_the_same_load_misses_the_target() -> None:
    # The control: the same overload with the dimmer pinned open lets the queue grow without bound.
    sim = make()
    sim.dimmer.force(0.0)
    sim.run(rising_then_falling, 240.0)
    overload = [c for c in sim.completions if 120 <= c[0] < 240]
    assert p95([c[1] for c in overload]) > 30.0


def test_steady_load_within_capacity_never_dims() -> None:
    sim = make()
    sim.run(lambda t: 0.1, 600.0)  # 20 % of full-service capacity: p95 about half the target
    # A burst of arrivals may dim a few requests for a moment, but it does not keep changing.
    assert sim.dimmer.level_changes <= 12
    served_full = sum(1 for c in sim.completions if c[3] == ())
    assert served_full / len(sim.completions) >= 0.95


def test_decisions_follow_the_value_and_keep_the_order() -> None:
    clock = FakeClock(start=0.0)
    dimmer = Dimmer("d", STEPS, clock=clock, events=EventBus(), rng=random.Random(1))
    dimmer.force(0.375)  # hints dimmed for all, validation for half, nothing further
    decisions = [dimmer.decide() for _ in range(4000)]
    assert all(d.level == 2 for d in decisions)
    assert all(d.dims("creative_hints") for d in decisions)
    half = sum(1 for d in decisions if d.dims("validation")) / len(decisions)
    assert 0.45 <= half <= 0.55
    assert not any(d.dims("generation") for d in decisions)
    assert dimmer.share("validation") == pytest.approx(0.5)
    dimmer.force(0.0)
    assert dimmer.decide().dimmed == ()
    dimmer.force(1.0)
    assert dimmer.decide().dimmed == STEPS


def test_a_decision_keeping_a_step_keeps_the_later_ones_and_leaves_the_earlier_dimmed() -> None:
    dimmer = Dimmer("d", STEPS, clock=FakeClock(start=0.0), events=EventBus(), rng=random.Random(1))
    dimmer.force(1.0)
    everything = dimmer.decide()
    kept = everything.keeping("generation")
    assert kept.dimmed == ("creative_hints", "validation")
    assert kept.level == everything.level == 4
    assert not kept.dims("generation")
    assert not kept.dims("model")
    assert everything.dimmed == STEPS  # decisions are values: the original is unchanged
    assert kept.keeping("generation") is kept  # nothing from there on is dimmed: the same decision
    assert everything.keeping("creative_hints").dimmed == ()


def test_a_pinned_value_says_so() -> None:
    dimmer = Dimmer("d", STEPS, clock=FakeClock(start=0.0), events=EventBus())
    assert not dimmer.forced
    dimmer.force(0.0)
    assert dimmer.forced  # pinned at full service is pinned too
    dimmer.force(None)
    assert not dimmer.forced


def test_level_changes_are_events_and_forced_value_hands_back() -> None:
    clock = FakeClock(start=0.0)
    bus = EventBus()
    seen: list[DimmerChanged] = []
    bus.subscribe(seen.append, DimmerChanged)
    dimmer = Dimmer("d", STEPS, DimmerConfig(target_p95=1.0), clock=clock, events=bus)
    for _ in range(40):  # 20 s of answers five times over the target: the value climbs, bounded
        dimmer.observe(5.0)
        clock.advance(0.5)
    assert dimmer.value == 1.0
    assert dimmer.level == 4
    assert [(e.old_level, e.new_level) for e in seen] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert seen[-1].step == "model"
    assert seen[-1].target_p95 == 1.0
    # Nothing completes any more: back to full service within the recovery time, by itself.
    clock.advance(dimmer.recovery_time)
    assert dimmer.level == 0
    assert seen[-1].new_level == 0
    assert seen[-1].step == ""
    dimmer.force(0.6)
    assert dimmer.level == 3
    dimmer.force(None)
    assert dimmer.level == 0


def test_bounded_step_per_tick() -> None:
    clock = FakeClock(start=0.0)
    cfg = DimmerConfig(target_p95=1.0, max_step_up=0.05, interval=1.0, window=5.0)
    dimmer = Dimmer("d", STEPS, cfg, clock=clock, events=EventBus())
    dimmer.observe(100.0)  # one enormous latency cannot swing the value in one step
    clock.advance(1.0)
    assert dimmer.value == pytest.approx(0.05)


def test_per_request_targets() -> None:
    clock = FakeClock(start=0.0)
    dimmer = Dimmer("d", STEPS, DimmerConfig(target_p95=10.0), clock=clock, events=EventBus())
    for _ in range(10):
        dimmer.observe(4.0, target=2.0)  # a fast-mode request over its own 2 s target
    clock.advance(0.5)
    snap = dimmer.snapshot()
    assert snap.observed_ratio == pytest.approx(2.0)
    assert snap.observed_p95 == pytest.approx(4.0)
    assert snap.level == 1
    assert snap.step == "creative_hints"


def test_bad_input_is_refused_clearly() -> None:
    clock = FakeClock(start=0.0)
    with pytest.raises(ValueError, match="at least one step"):
        Dimmer("d", (), clock=clock)
    with pytest.raises(ValueError, match="distinct"):
        Dimmer("d", ("a", "a"), clock=clock)
    dimmer = Dimmer("d", STEPS, clock=clock)
    with pytest.raises(ValueError, match="non-negative"):
        dimmer.observe(-1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dimmer.force(1.5)
    with pytest.raises(ValidationError, match="interval"):
        DimmerConfig(interval=10.0, window=5.0)
    with pytest.raises(ValidationError, match="target_p95"):
        DimmerConfig(target_p95=0)


@settings(max_examples=40, deadline=None)
@given(
    rates=st.lists(st.floats(min_value=0.0, max_value=4.0), min_size=1, max_size=8),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_invariants_over_random_load_traces(rates: list[float], seed: int) -> None:
    sim = make(seed=seed)
    values: list[float] = []
    bus_levels: list[int] = []
    sim.dimmer._events.subscribe(lambda e: bus_levels.append(e.new_level), DimmerChanged)
    for i, rate in enumerate(rates):
        sim.run(lambda t, r=rate: r, 20.0 * (i + 1))
        values.append(sim.dimmer.value)
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(0 <= lv <= len(STEPS) for lv in bus_levels)
    # What a request loses is always a prefix of the order: hints before validation before generation.
    assert all(c[3] == STEPS[: len(c[3])] for c in sim.completions)
    # Quiet afterwards: back to full service within the recovery time (plus the queue draining).
    sim.run(lambda t: 0.0, sim.elapsed + sim.dimmer.recovery_time + max(0.0, sim.queue_delay()) + 10.0)
    assert sim.dimmer.level == 0
