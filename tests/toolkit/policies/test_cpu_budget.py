"""The CPU budget on the FakeClock, with a CPU-time counter the test drives."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from brownout.policies.cpu_budget import CpuBudget, CpuBudgetConfig
from brownout.testing import FakeClock


class Process:
    """A process's CPU-time counter: ``run(seconds, cores)`` moves the clock and uses that much CPU."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.cpu = 0.0

    def __call__(self) -> float:
        return self.cpu

    def run(self, seconds: float, cores: float) -> None:
        self.clock.advance(seconds)
        self.cpu += seconds * cores


def budget(config: CpuBudgetConfig | None = None, seed: int = 1) -> tuple[CpuBudget, Process]:
    clock = FakeClock()
    process = Process(clock)
    return CpuBudget("t", config, clock=clock, cpu_time=process, rng=random.Random(seed)), process


def test_within_the_budget_nothing_is_refused() -> None:
    b, process = budget(CpuBudgetConfig(budget=0.5))
    for _ in range(40):
        process.run(0.5, 0.45)
        assert not b.refuse()
    snap = b.snapshot()
    assert (snap.budget, snap.used, snap.refusing, snap.refused) == (0.5, 0.45, 0.0, 0)


def test_over_the_budget_the_share_rises_a_bounded_step_per_interval() -> None:
    b, process = budget(CpuBudgetConfig(budget=0.25, gain=0.5, max_step_up=0.25))
    process.run(0.5, 0.3)  # 20 % over: 0.5 * 0.2 = 0.1
    assert b.share == pytest.approx(0.1)
    process.run(0.5, 1.0)  # three times over: the step is capped at 0.25
    assert b.share == pytest.approx(0.35)
    process.run(0.2, 1.0)  # within the interval: no step yet
    assert b.share == pytest.approx(0.35)
    for _ in range(2):
        process.run(0.5, 1.0)
        assert b.share > 0  # the steps are taken when asked: one per interval
    assert b.share == pytest.approx(0.85)
    process.run(5.0, 1.0)  # a long stretch over the budget is still one step up
    assert b.share == 1.0
    assert all(b.refuse() for _ in range(50))
    assert b.snapshot().refused == 50


def test_the_refused_share_matches_the_draws() -> None:
    b, process = budget(CpuBudgetConfig(budget=0.25, gain=0.5, max_step_up=0.25))
    process.run(0.5, 0.35)  # 40 % over: share 0.2
    assert b.share == pytest.approx(0.2)
    refused = sum(b.refuse() for _ in range(5000))
    assert 850 <= refused <= 1150


def test_inside_the_dead_band_the_share_holds() -> None:
    b, process = budget(CpuBudgetConfig(budget=0.5, dead_band=0.2, max_step_up=0.25))
    process.run(0.5, 1.0)
    held = b.share
    assert held > 0
    for _ in range(20):
        process.run(0.5, 0.45)  # between 0.4 and 0.5 cores
        assert b.share == held


def test_after_a_flood_the_share_falls_even_while_nobody_asks() -> None:
    b, process = budget(CpuBudgetConfig(budget=0.25, release=0.1))
    for _ in range(8):
        process.run(0.5, 2.0)
        b.refuse()
    assert b.share == 1.0
    process.run(0.5, 0.0)
    assert b.share == pytest.approx(0.9)
    # Three seconds without a request (six intervals): six steps down at the next one.
    process.run(3.0, 0.05)
    assert b.share == pytest.approx(0.3)
    process.run(10.0, 0.05)
    assert b.share == 0.0
    assert not any(b.refuse() for _ in range(100))


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="budget"):
        CpuBudgetConfig(budget=0)
    with pytest.raises(ValidationError, match="dead_band"):
        CpuBudgetConfig(dead_band=1.0)
    with pytest.raises(ValidationError, match="max_step_up"):
        CpuBudgetConfig(max_step_up=1.5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=5.0), st.floats(min_value=0.0, max_value=4.0)),
        max_size=60,
    ),
    st.floats(min_value=0.05, max_value=2.0),
)
def test_the_share_stays_a_share_and_only_rises_over_the_budget(
    steps: list[tuple[float, float]], limit: float
) -> None:
    b, process = budget(CpuBudgetConfig(budget=limit))
    for seconds, cores in steps:
        before = b.share
        process.run(seconds, cores)
        after = b.share
        assert 0.0 <= after <= 1.0
        used = b.snapshot().used
        if after > before:
            assert used is not None
            assert used >= round(limit, 4) - 1e-4  # above it, before the snapshot rounded it
        if after == 0.0:
            assert not b.refuse()
