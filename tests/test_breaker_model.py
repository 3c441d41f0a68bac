"""The circuit breaker against a reference model of its documented semantics (hypothesis stateful).

The model is written for obviousness, not speed: it keeps every outcome in a list with its time,
recounts the window on every question, and tells a probe from a late call by comparing "eras" (a new
era starts at every state change, as the breaker's module docstring says outcomes from an earlier state
are discarded). Random programs of calls (started, then finished with every kind of outcome, possibly
slowly), clock moves and operator actions run against both, and after every step the state, the
permit decision, the window counts and the counters must agree.

Thresholds are drawn from dyadic fractions (0.25, 0.5, ...) so that ``rate >= threshold`` has one
meaning however it is computed; the rounding of decimal thresholds is tested in ``test_breaker.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from brownout.errors import CircuitOpen
from brownout.events import EventBus
from brownout.policies.breaker import BreakerConfig, BreakerState, CircuitBreaker
from brownout.testing import FakeClock


class Boom(Exception):
    """A recorded failure."""


class Ignored(Exception):
    """Listed in ignore_exceptions: counts as neither success nor failure."""


class NotRecorded(BaseException):
    """Outside record_exceptions: not counted either."""


SLOW = 5.0  # slow_call_duration in every example
# Weighted by repetition: plain successes and failures drive the transitions, the rest are edge cases.
OUTCOMES = ("success",) * 4 + ("failure",) * 4 + (
    "good_result",
    "bad_result",
    "ignored",
    "not_recorded",
    "cancelled",
)
ACTIONS = ("start",) * 6 + ("finish",) * 6 + ("advance",) * 2 + ("force_open", "force_closed", "disable", "reset")


@dataclass
class Outcome:
    at: float
    failed: bool
    slow: bool


@dataclass
class Call:
    era: int
    start: float


@dataclass
class Model:
    """The documented behaviour of a circuit breaker, spelled out plainly."""

    cfg: BreakerConfig
    now: float
    state: str = "closed"
    era: int = 0
    window: list[Outcome] = field(default_factory=list)
    calls: dict[int, Call] = field(default_factory=dict)
    open_until: float = 0.0
    consecutive_opens: int = 0
    probe_successes: int = 0
    rejected: int = 0
    opened: int = 0

    # -- reading

    def current_state(self) -> str:
        if self.state == "open" and self.now >= self.open_until:
            self.change("half_open")
        return self.state

    def counted(self) -> list[Outcome]:
        """The outcomes the window holds now."""
        if self.cfg.window_type == "count":
            return self.window[-self.cfg.window_size :]
        # One bucket per whole second: an outcome counts while fewer than window_size seconds have
        # begun since the second it was recorded in.
        return [o for o in self.window if int(self.now) - int(o.at) < self.cfg.window_size]

    def totals(self) -> tuple[int, int, int]:
        outcomes = self.counted()
        return len(outcomes), sum(o.failed for o in outcomes), sum(o.slow for o in outcomes)

    def probes_in_flight(self) -> int:
        if self.state != "half_open":
            return 0
        return sum(1 for c in self.calls.values() if c.era == self.era)

    def decision(self) -> tuple[str, float] | None:
        """None when a call may start now, else the (state, retry_after) it is rejected with."""
        state = self.current_state()
        if state in ("closed", "forced_closed", "disabled"):
            return None
        if state == "open":
            return ("open", self.open_until - self.now)
        if state == "half_open":
            if self.probes_in_flight() < self.cfg.half_open_max_calls:
                return None
            return ("half_open", self.cfg.half_open_retry_after)
        return ("forced_open", self.cfg.open_wait)

    def retry_after(self) -> float:
        decision = self.decision()
        return 0.0 if decision is None else decision[1]

    # -- changing

    def change(self, state: str) -> None:
        self.state = state
        self.era += 1
        self.probe_successes = 0

    def open(self) -> None:
        self.consecutive_opens += 1
        cfg = self.cfg
        wait = min(cfg.open_wait * cfg.open_wait_multiplier ** (self.consecutive_opens - 1), cfg.open_wait_max)
        self.open_until = self.now + wait
        self.opened += 1
        self.change("open")

    def reset(self) -> None:
        self.window = []
        self.consecutive_opens = 0
        self.change("closed")

    def start(self, call_id: int) -> tuple[str, float] | None:
        decision = self.decision()
        if decision is None:
            self.calls[call_id] = Call(self.era, self.now)
        else:
            self.rejected += 1
        return decision

    def finish(self, call_id: int, kind: str, breaker_opened: Callable[[], bool] | None) -> None:
        """Record the end of a call; ``breaker_opened`` settles the one known divergence (see below)."""
        call = self.calls.pop(call_id)
        if call.era != self.era:
            return  # began under an earlier state
        if kind in ("ignored", "not_recorded", "cancelled"):
            return  # neither success nor failure (a probe's slot is free again: it left self.calls)
        failed = kind in ("failure", "bad_result")
        slow = self.cfg.slow_call_rate_threshold is not None and self.now - call.start >= self.cfg.slow_call_duration
        if self.state == "half_open":
            if failed or slow:
                self.open()
                return
            self.probe_successes += 1
            if self.probe_successes >= self.cfg.success_threshold:
                self.reset_window_and_close()
            return
        if self.state == "disabled":
            return
        self.window.append(Outcome(self.now, failed, slow))
        if self.state != "closed":
            return  # forced closed: recorded, never opens
        if self.should_open():
            if failed or slow or breaker_opened is None or breaker_opened():
                self.open()
            # else: the breaker evaluates its rates only when a call fails or is slow, so a success that
            # brings the window to minimum_calls (or lands after older successes expired) does not open
            # it. The strict test below pins that as a bug; the lenient one accepts either reading.

    def reset_window_and_close(self) -> None:
        self.window = []
        self.consecutive_opens = 0
        self.change("closed")

    def should_open(self) -> bool:
        calls, failures, slows = self.totals()
        cfg = self.cfg
        if calls < cfg.minimum_calls:
            return False
        if failures / calls >= cfg.failure_rate_threshold:
            return True
        return cfg.slow_call_rate_threshold is not None and slows / calls >= cfg.slow_call_rate_threshold


def drive(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    return loop.run_until_complete(coro)


configs = st.builds(
    dict,
    window_type=st.sampled_from(["count", "time"]),
    window_size=st.integers(4, 8),
    minimum_calls=st.integers(2, 4),
    failure_rate_threshold=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    slow_call_rate_threshold=st.sampled_from([None, 0.5, 1.0]),
    half_open_max_calls=st.integers(1, 3),
    success_threshold=st.integers(1, 4),
    open_wait=st.sampled_from([3.0, 10.0]),
    open_wait_multiplier=st.sampled_from([1.0, 2.0]),
    half_open_retry_after=st.sampled_from([0.5, 2.0]),
)


class BreakerMachine(RuleBasedStateMachine):
    """Drives a real CircuitBreaker and the Model with the same operations."""

    strict: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.guards: dict[int, Any] = {}
        self.next_id = 0

    def teardown(self) -> None:
        self.loop.close()

    @initialize(settings=configs)
    def build(self, settings: dict[str, Any]) -> None:
        self.cfg = BreakerConfig(
            **settings,
            slow_call_duration=SLOW,
            open_wait_max=25.0,
            record_exceptions=(Exception,),
            ignore_exceptions=(Ignored,),
            failure_result=lambda r: r == "bad",
        )
        self.breaker = CircuitBreaker("model", self.cfg, clock=self.clock, events=EventBus())
        self.model = Model(self.cfg, self.clock.now())

    # -- rules
    #
    # One rule picks the next action from a weighted list: hypothesis chooses rules uniformly, and forced
    # states last until a reset, so equal odds would spend most steps with the breaker forced.

    @rule(
        action=st.sampled_from(ACTIONS),
        kind=st.sampled_from(OUTCOMES),
        slow=st.booleans(),
        seconds=st.sampled_from([0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        pick=st.integers(0, 1000),
    )
    def step(self, action: str, kind: str, slow: bool, seconds: float, pick: int) -> None:
        if action == "finish" and self.guards:
            self.finish_call(sorted(self.guards)[pick % len(self.guards)], kind, slow)
        elif action in ("start", "finish"):
            self.start_call()
        elif action == "advance":
            self.advance_by(seconds)
        else:
            self.operator(action)

    def start_call(self) -> None:
        call_id = self.next_id
        self.next_id += 1
        expected = self.model.start(call_id)
        guard = self.breaker.guard()
        try:
            drive(self.loop, guard.__aenter__())
        except CircuitOpen as e:
            assert expected is not None, "the breaker rejected a call the model permits"
            assert e.state == expected[0]
            assert e.retry_after == pytest.approx(expected[1])
            return
        assert expected is None, f"the breaker permitted a call the model rejects ({expected})"
        self.guards[call_id] = guard

    def finish_call(self, call_id: int, kind: str, slow: bool) -> None:
        guard = self.guards.pop(call_id)
        if slow:
            self.advance_by(SLOW)
        if kind in ("good_result", "bad_result"):
            guard.record_result("bad" if kind == "bad_result" else "good")
        errors: dict[str, BaseException] = {
            "failure": Boom(),
            "ignored": Ignored(),
            "not_recorded": NotRecorded(),
            "cancelled": asyncio.CancelledError(),
        }
        error = errors.get(kind)
        drive(self.loop, guard.__aexit__(type(error) if error else None, error, None))
        lenient = None if self.strict else (lambda: self.breaker._state is BreakerState.OPEN)
        self.model.finish(call_id, kind, lenient)

    def advance_by(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.model.now = self.clock.now()

    def operator(self, action: str) -> None:
        getattr(self.breaker, action)()
        if action == "reset":
            self.model.reset()
        else:
            self.model.change({"force_open": "forced_open", "force_closed": "forced_closed"}.get(action, action))
            if action == "disable":
                assert self.model.state == "disabled"

    # -- invariants

    @invariant()
    def same_state(self) -> None:
        assert self.breaker.state.value == self.model.current_state()

    @invariant()
    def same_decision(self) -> None:
        assert self.breaker.available == (self.model.decision() is None)
        assert self.breaker.retry_after() == pytest.approx(self.model.retry_after())

    @invariant()
    def same_window_and_counters(self) -> None:
        m = self.breaker.metrics()
        assert (m.calls, m.failures, m.slow_calls) == self.model.totals()
        assert (m.rejected, m.opened) == (self.model.rejected, self.model.opened)

    @invariant()
    def probes_bounded(self) -> None:
        in_flight = self.breaker._half_open_in_flight
        assert in_flight == self.model.probes_in_flight()
        assert in_flight <= self.cfg.half_open_max_calls


class StrictBreakerMachine(BreakerMachine):
    """The model with no leniency: a success is evaluated like any other outcome."""

    strict = True


SETTINGS = settings(max_examples=200, stateful_step_count=50, deadline=None, derandomize=True)


def test_breaker_matches_model() -> None:
    run_state_machine_as_test(BreakerMachine, settings=SETTINGS)


@pytest.mark.xfail(  # FIXED?
    strict=True,
    raises=AssertionError,
    reason="breaker bug: a success that brings the window to minimum_calls never evaluates the rate",
)
def test_breaker_matches_model_strictly() -> None:
    run_state_machine_as_test(StrictBreakerMachine, settings=SETTINGS)
