"""The adaptive concurrency limiter, on the FakeClock against a simulated model server.

The simulated server has ``slots`` request slots: with up to ``slots`` requests in flight each takes
``base`` seconds; beyond that it queues them inside itself, so each one takes ``base * n / slots``
(the latency rises linearly past the knee while the throughput stays flat).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pydantic import ValidationError

from brownout import AdaptiveLimiter, LimiterConfig
from brownout.errors import Overloaded
from brownout.events import CallRejected, Event, EventBus
from brownout.policies.limiter import LimitChanged, Permit
from brownout.testing import FakeClock


class SimServer:
    """A model server on the fake clock whose latency grows linearly past ``slots`` in flight."""

    def __init__(self, clock: FakeClock, slots: int, base: float = 1.0) -> None:
        self.clock = clock
        self.slots = slots
        self.base = base
        self.slowdown = 1.0
        self.in_flight = 0
        self.peak = 0
        self.served = 0

    def latency(self) -> float:
        """Seconds a call takes with ``in_flight`` calls in the server (itself included)."""
        return self.base * self.slowdown * max(1.0, self.in_flight / self.slots)

    async def serve(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.clock.sleep(self.latency())
        finally:
            self.in_flight -= 1
        self.served += 1


class Load:
    """``callers`` closed-loop callers sending to ``server`` through ``limiter`` until stopped."""

    def __init__(self, limiter: AdaptiveLimiter, server: SimServer, callers: int) -> None:
        self.limiter = limiter
        self.server = server
        self.stopped = False
        self.max_in_flight = 0
        self.tasks = [asyncio.create_task(self._caller()) for _ in range(callers)]

    async def _caller(self) -> None:
        while not self.stopped:
            async with self.limiter:
                self.max_in_flight = max(self.max_in_flight, self.limiter.in_flight)
                assert self.limiter.in_flight <= self.limiter.limit
                await self.server.serve()

    async def stop(self, clock: FakeClock) -> None:
        self.stopped = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def make(clock: FakeClock, bus: EventBus | None = None, **config: Any) -> AdaptiveLimiter:
    return AdaptiveLimiter("model", LimiterConfig(**config), clock=clock, events=bus or EventBus())


def time_at_limit(changes: list[LimitChanged], initial: int, start: float, end: float) -> dict[int, float]:
    """Seconds spent at each limit between clock times ``start`` and ``end``."""
    spent: dict[int, float] = {}
    limit, since = initial, float("-inf")
    for change in [*changes, LimitChanged("end", end, -1, -1, "")]:
        lo, hi = max(since, start), min(change.at, end)
        if hi > lo:
            spent[limit] = spent.get(limit, 0.0) + hi - lo
        limit, since = change.new, change.at
    return spent


async def test_limit_converges_near_the_knee_from_below() -> None:
    clock = FakeClock()
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter = make(clock, bus, initial_limit=1, max_limit=32, max_wait=3600)
    server = SimServer(clock, slots=4)
    load = Load(limiter, server, callers=40)
    start = clock.now()
    await clock.run(600, step_yields=20)
    await load.stop(clock)
    assert changes[0].old == 1
    assert changes[0].new == 2
    spent = time_at_limit(changes, 1, start + 200, start + 600)
    # At the knee (4) or just above it (one or two requests queued in the server: the dead band, and
    # the step that finds its edge) nearly all the time; the rest is the short dips that measure the
    # no-load latency again.
    assert sum(spent.get(n, 0.0) for n in (4, 5, 6)) / 400 >= 0.9, spent
    assert spent.get(5, 0.0) > spent.get(6, 0.0)
    assert max(spent) <= 6
    assert server.peak <= 6  # 40 callers, yet the server never holds more than 6 requests
    # The server runs at its full rate (4 requests per second) nearly all the time.
    assert server.served >= 0.9 * 4 * 600


async def test_limit_comes_down_to_the_knee_from_above() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=24, max_limit=32, max_wait=3600)
    server = SimServer(clock, slots=3)
    load = Load(limiter, server, callers=40)
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter._events = bus
    start = clock.now()
    await clock.run(600, step_yields=20)
    await load.stop(clock)
    spent = time_at_limit(changes, 24, start + 400, start + 600)
    assert sum(spent.get(n, 0.0) for n in (3, 4, 5)) / 200 >= 0.9, spent
    assert max(spent) <= 5


async def test_a_limit_at_the_servers_slots_stays_there_without_dips_to_measure_the_baseline() -> None:
    # A local model server's limiter is capped at its slots: once there, a fresh no-load latency
    # could only allow growth the cap forbids, and each measurement would idle a slot for a round.
    clock = FakeClock()
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter = make(clock, bus, initial_limit=1, max_limit=2, max_wait=3600, baseline_rounds=5)
    server = SimServer(clock, slots=2)
    load = Load(limiter, server, callers=10)
    await clock.run(300, step_yields=20)
    await load.stop(clock)
    assert [(c.old, c.new) for c in changes] == [(1, 2)]
    assert server.served >= 2 * 300 - 4  # both slots busy all the time after the first round


class SharingServer(SimServer):
    """A server on the fake clock that runs up to ``len(sharing)`` calls at once, each in its own
    slot, none queued: ``n`` calls share its compute and each takes ``base * sharing[n]`` seconds (a
    llama.cpp server decoding ``n`` answers as one batch)."""

    def __init__(self, clock: FakeClock, sharing: dict[int, float], base: float = 1.0) -> None:
        super().__init__(clock, slots=len(sharing), base=base)
        self.sharing = sharing

    def latency(self) -> float:
        return self.base * self.sharing[self.in_flight]


# Measured on a 2-thread llama.cpp server (the embedded model): 73, 105 and 118 tokens/s with one, two
# and four slots busy -- each call slower, the server faster.
_BATCHING = {1: 1.0, 2: 1.4, 3: 2.0, 4: 2.5}


@pytest.mark.parametrize("slots", [None, 4])
async def test_within_its_slots_a_sharing_server_is_run_at_all_of_them(slots: int | None) -> None:
    # Each call at four slots takes 2.5 times a lone call's time, and the server does 1.6 times the
    # work a second. Vegas (slots unknown) reads the slowdown as calls queued inside the server and
    # holds it below its slots; told its slots, the limiter follows the work done a second to all four.
    clock = FakeClock()
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter = make(clock, bus, initial_limit=1, max_limit=4, max_wait=3600, slots=slots)
    server = SharingServer(clock, _BATCHING)
    load = Load(limiter, server, callers=12)
    start = clock.now()
    await clock.run(600, step_yields=20)
    await load.stop(clock)
    spent = time_at_limit(changes, 1, start + 100, start + 600)
    if slots is None:
        assert spent.get(4, 0.0) / 500 < 0.5, spent
    else:
        assert spent.get(4, 0.0) / 500 >= 0.95, spent
        assert server.served >= 0.95 * 4 / 2.5 * 500
    assert server.peak <= 4


async def test_within_its_slots_the_limit_stops_where_more_calls_do_less_work() -> None:
    # Past two calls this server does less work a second (three calls take 3.6 times one call's
    # time, four 6 times): the limit settles at two, trying three again now and then but not four.
    clock = FakeClock()
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter = make(clock, bus, initial_limit=1, max_limit=4, max_wait=3600, slots=4, baseline_rounds=20)
    server = SharingServer(clock, {1: 1.0, 2: 1.5, 3: 3.6, 4: 6.0})
    load = Load(limiter, server, callers=12)
    start = clock.now()
    await clock.run(900, step_yields=20)
    await load.stop(clock)
    spent = time_at_limit(changes, 1, start + 100, start + 900)
    assert spent.get(2, 0.0) / 800 >= 0.8, spent
    assert spent.get(4, 0.0) == 0.0, spent
    assert server.peak <= 3


class SimModel:
    """A language model server on the fake clock: answers of 60 to 300 tokens (seeded), written at
    ``tpot`` seconds a token alone, 1.5 times that each with every slot busy (batched), and slower
    still past its slots (the extra requests wait inside it)."""

    def __init__(self, clock: FakeClock, slots: int, tpot: float = 0.02, seed: int = 7) -> None:
        self.first = True
        self.clock = clock
        self.slots = slots
        self.tpot = tpot
        self.rng = random.Random(seed)
        self.in_flight = 0
        self.tokens = 0

    async def answer(self) -> int:
        # A short start-up check first (as the service's constraint check), then briefs.
        tokens = 23 if self.first else self.rng.randint(60, 300)
        self.first = False
        self.in_flight += 1
        n = self.in_flight
        per_token = self.tpot * (1 + 0.5 * (min(n, self.slots) - 1) / max(1, self.slots - 1))
        try:
            await self.clock.sleep(tokens * per_token * max(1.0, n / self.slots))
        finally:
            self.in_flight -= 1
        self.tokens += tokens
        return tokens


async def _model_load(clock: FakeClock, limiter: AdaptiveLimiter, model: SimModel, *, sized: bool) -> None:
    async def caller() -> None:
        while True:
            permit = await limiter.acquire()
            try:
                tokens = await model.answer()
            except BaseException:
                permit.release(sample=False)
                raise
            permit.release(work=tokens if sized else None)

    tasks = [asyncio.create_task(caller()) for _ in range(10)]
    await clock.run(600, step_yields=20)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_calls_that_say_their_size_keep_the_limit_steady_whatever_their_length() -> None:
    # Answers five times longer than others are not load: judged per token, the limit finds the
    # server's two slots and stays; judged per call, the lengths alone move it.
    changes: dict[bool, list[LimitChanged]] = {}
    for sized in (True, False):
        clock = FakeClock()
        bus = EventBus()
        changes[sized] = []
        bus.subscribe(changes[sized].append, LimitChanged)
        limiter = make(clock, bus, initial_limit=1, max_limit=2, max_wait=3600)
        model = SimModel(clock, slots=2)
        await _model_load(clock, limiter, model, sized=sized)
        if sized:
            assert limiter.stats.per_work
            assert limiter.stats.baseline == pytest.approx(0.02)
    assert [(c.old, c.new) for c in changes[True]] == [(1, 2)]
    assert len(changes[False]) > 3  # down to one slot and back, on answer lengths alone


async def test_calls_that_say_their_size_still_find_queueing_inside_the_server() -> None:
    # Past two slots each token comes more slowly (the extra requests wait inside the server): the
    # limit settles at the knee or one above it, as with whole calls.
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=6, max_wait=3600)
    model = SimModel(clock, slots=2)
    await _model_load(clock, limiter, model, sized=True)
    assert limiter.limit in (2, 3)


async def test_the_first_sized_sample_switches_to_per_unit_latency_for_good() -> None:
    clock = FakeClock(autojump=True)
    limiter = make(clock, initial_limit=1, max_limit=1)  # every call a round of its own
    for _ in range(2):
        permit = await limiter.acquire()
        await clock.sleep(2.0)
        permit.release()  # per call: 2 s
    assert limiter.stats.baseline == pytest.approx(2.0)
    assert not limiter.stats.per_work
    permit = await limiter.acquire()
    await clock.sleep(2.0)
    permit.release(work=100)  # 20 ms a token: what was learned per call no longer applies
    assert limiter.stats.per_work
    assert limiter.stats.baseline == pytest.approx(0.02)
    permit = await limiter.acquire()
    await clock.sleep(50.0)
    permit.release()  # a call without its size says nothing now
    assert limiter.stats.baseline == pytest.approx(0.02)


class SlowSharingModel:
    """A 2-thread model server on a slow machine, on the fake clock: answers of 100 to 250 tokens
    (seeded) at ``tpot`` seconds a token alone; ``n`` calls at once share its compute, each token of
    each taking ``sharing[n]`` times as long (``_BATCHING`` unless a test sets another: four calls do
    the most work a second, but each call then takes 2.5 times as long). Its callers cut a call at
    ``cut`` seconds (their latency target) and keep what it wrote."""

    def __init__(self, clock: FakeClock, tpot: float, cut: float, seed: int = 11) -> None:
        self.clock = clock
        self.tpot = tpot
        self.cut = cut
        self.rng = random.Random(seed)
        self.in_flight = 0
        self.whole = 0
        self.cut_short = 0
        self.sharing = dict(_BATCHING)

    async def answer(self) -> tuple[float, int]:
        """Serve one call: (seconds it held its slot, tokens written)."""
        tokens = self.rng.randint(100, 250)
        self.in_flight += 1
        start = self.clock.now()
        try:
            # The pace is set when the call starts (a steady load keeps it about the same).
            per_token = self.tpot * self.sharing[min(self.in_flight, 4)]
            took = tokens * per_token
            if took > self.cut:
                await self.clock.sleep(self.cut)
                self.cut_short += 1
                return self.clock.now() - start, int(self.cut / per_token)
            await self.clock.sleep(took)
            self.whole += 1
            return self.clock.now() - start, tokens
        finally:
            self.in_flight -= 1


async def _slow_model_load(
    clock: FakeClock, limiter: AdaptiveLimiter, model: SlowSharingModel, seconds: float, callers: int = 12
) -> None:
    async def caller() -> None:
        while True:
            permit = await limiter.acquire()
            try:
                _, tokens = await model.answer()
            except BaseException:
                permit.release(sample=False)
                raise
            permit.release(work=tokens)

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    await clock.run(seconds, step_yields=20)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("budget", [None, 8.0])
async def test_a_latency_budget_holds_the_limit_where_calls_finish_in_time(budget: float | None) -> None:
    # Four calls at once do the most work a second, and the work rate alone runs the server at all four
    # slots -- where a third of the calls are cut at their callers' 9 s. Told that a call held 8 s or
    # more is late, the limiter comes down to where (almost) every call finishes whole, and stays there.
    clock = FakeClock()
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter = make(clock, bus, initial_limit=1, max_limit=4, max_wait=3600, slots=4, latency_budget=budget)
    model = SlowSharingModel(clock, tpot=0.02, cut=9.0)
    start = clock.now()
    await _slow_model_load(clock, limiter, model, 900)
    spent = time_at_limit(changes, 1, start + 200, start + 900)
    calls = model.whole + model.cut_short
    if budget is None:
        assert spent.get(4, 0.0) / 700 >= 0.9, spent
        assert model.cut_short / calls > 0.25
        assert limiter.ceiling is None
    else:
        assert spent.get(2, 0.0) / 700 >= 0.9, spent
        assert limiter.limit == limiter.ceiling == 2
        assert model.cut_short / calls < 0.05
        assert limiter.stats.late > 0  # it found out by running late, at three and four calls
        down = [c for c in changes if c.new < c.old]
        assert down
        assert "calls held their permit 8s or more" in down[0].reason
        # It does not flap: once down, it looks at three again only once what it measured there is
        # ten windows old (a window of ten calls at three, every few minutes).
        rises = [c for c in changes if c.at > start + 200 and c.new > 2]
        assert 1 <= len(rises) <= 3, changes


async def test_calls_run_late_where_that_still_makes_the_most_answers_in_time() -> None:
    # A server that gains much from sharing (four calls at once do 3.5 times the work of one): at four
    # an eighth of the calls run late, at three half as many -- but three do a sixth less work in time
    # than four. The limit comes down to look, and goes back up to four, where it stays most of the
    # time (looking again once what it measured at three is ten windows old).
    clock = FakeClock()
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter = make(clock, bus, initial_limit=1, max_limit=4, max_wait=3600, slots=4, latency_budget=8.0)
    model = SlowSharingModel(clock, tpot=0.03, cut=9.0)
    model.sharing = {1: 1.0, 2: 1.05, 3: 1.1, 4: 1.15}
    start = clock.now()
    await _slow_model_load(clock, limiter, model, 900)
    spent = time_at_limit(changes, 1, start + 200, start + 900)
    assert spent.get(4, 0.0) / 700 >= 0.7, spent
    assert [c for c in changes if c.new == 3]  # it did look one lower
    assert limiter.stats.late / (model.whole + model.cut_short) > 0.08  # late calls, and worth it


async def test_the_latency_ceiling_rises_again_when_calls_get_faster() -> None:
    # The machine was slow (the limit held at two); then its neighbour leaves and each token takes
    # less than half the time: with every call well inside the budget the ceiling rises a step at a
    # time and the work rate takes the limit back to all four slots.
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=4, max_wait=3600, slots=4, latency_budget=8.0)
    model = SlowSharingModel(clock, tpot=0.02, cut=9.0)
    await _slow_model_load(clock, limiter, model, 400)
    assert limiter.limit == limiter.ceiling == 2
    model.tpot = 0.008
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter._events = bus
    start = clock.now()
    await _slow_model_load(clock, limiter, model, 600)
    assert limiter.ceiling is None
    spent = time_at_limit(changes, 2, start + 300, start + 600)
    assert spent.get(4, 0.0) / 300 >= 0.9, spent


@pytest.mark.parametrize(("one_call_seconds", "back_to_two"), [(2.0, True), (1.5, False)])
def test_where_two_limits_do_as_much_in_time_the_higher_one_wins(
    one_call_seconds: float, back_to_two: bool
) -> None:
    # Windows of two calls, late from 5 s. At two calls at once one of two runs late: goodput half of
    # 20 tokens/s. One at once: 20 tokens in 2 s (10 tokens/s in time, as much -- back to two, whose
    # late calls are answers too), or in 1.5 s (13.3, clearly more -- it stays at one).
    clock = FakeClock()
    limiter = make(clock, initial_limit=2, max_limit=2, slots=2, latency_budget=5.0, late_window=2)

    def call(seconds: float, tokens: int) -> None:
        permit = limiter.try_acquire()
        assert permit is not None
        clock.advance(seconds)
        permit.release(work=tokens)

    call(4.0, 40)
    call(6.0, 60)
    assert (limiter.limit, limiter.ceiling) == (1, 1)  # what one call at once does is not known yet
    call(one_call_seconds, 20)
    call(one_call_seconds, 20)
    if back_to_two:
        assert (limiter.limit, limiter.ceiling) == (2, None)
        call(4.0, 40)
        call(6.0, 60)
        assert limiter.limit == 2  # late again, but one at once is known to do no more in time
    else:
        assert (limiter.limit, limiter.ceiling) == (1, 1)
    assert limiter.stats.late == (2 if back_to_two else 1)


@pytest.mark.parametrize(("late_value", "stays_at_two"), [(0.0, False), (1.0, True)])
def test_what_a_late_call_is_worth_decides_whether_the_limit_comes_down(
    late_value: float, stays_at_two: bool
) -> None:
    # As above: two calls at once, one of them late, then one at once as good, and back to two. Now
    # both calls at two run late. Missed (worth nothing), two at once did less in time than one: down.
    # Served all the same (worth a whole call), two at once did twice the work: it stays.
    clock = FakeClock()
    limiter = make(
        clock, initial_limit=2, max_limit=2, slots=2, latency_budget=5.0, late_window=2, late_value=late_value
    )

    def call(seconds: float, tokens: int) -> None:
        permit = limiter.try_acquire()
        assert permit is not None
        clock.advance(seconds)
        permit.release(work=tokens)

    for seconds, tokens in [(4.0, 40), (6.0, 60), (2.0, 20), (2.0, 20)]:
        call(seconds, tokens)
    assert limiter.limit == 2
    call(6.0, 60)
    call(6.0, 60)
    assert limiter.limit == (2 if stays_at_two else 1)


def test_a_hopeless_window_closes_early_and_the_lowest_limit_holds() -> None:
    # Every call late (twice the 1 s budget). Twice as many late calls as a window of twenty may
    # have -- five -- close it early: the limit comes down after five calls, not twenty. At min_limit
    # it cannot go lower, and nothing else happens.
    clock = FakeClock()
    limiter = make(clock, initial_limit=2, max_limit=2, latency_budget=1.0)

    def late_call() -> None:
        permit = limiter.try_acquire()
        assert permit is not None
        clock.advance(2.0)
        permit.release(sample=True)

    for _ in range(4):
        late_call()
    assert limiter.limit == 2
    late_call()
    assert (limiter.limit, limiter.ceiling) == (1, 1)
    for _ in range(10):
        late_call()
    assert (limiter.limit, limiter.ceiling, limiter.stats.late) == (1, 1, 15)


async def test_limit_never_exceeds_max_limit_even_without_a_knee() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=6, max_wait=3600)
    server = SimServer(clock, slots=1000)  # latency never rises: the limit would grow for ever
    load = Load(limiter, server, callers=20)
    await clock.run(300, step_yields=20)
    await load.stop(clock)
    assert limiter.limit == 6
    assert server.peak == 6
    assert load.max_in_flight == 6


async def test_limit_recovers_after_a_latency_spike() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=4, max_limit=16, max_wait=3600, baseline_rounds=1000)
    server = SimServer(clock, slots=4)
    load = Load(limiter, server, callers=20)
    await clock.run(200, step_yields=20)
    assert 4 <= limiter.limit <= 5
    server.slowdown = 4.0  # the server gets four times slower for a while
    await clock.run(120, step_yields=20)
    during = limiter.limit
    server.slowdown = 1.0
    await clock.run(300, step_yields=20)
    after = limiter.limit
    await load.stop(clock)
    assert during < 4
    assert 4 <= after <= 5


async def test_waiters_get_permits_in_arrival_order() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1)
    first = await limiter.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        permit = await limiter.acquire()
        order.append(i)
        await clock.sleep(1)
        permit.release()

    tasks = [asyncio.create_task(waiter(i)) for i in range(6)]
    await clock.run(0)
    assert limiter.queued == 6
    # A newcomer while others wait cannot barge in, even at the moment a permit comes free.
    assert limiter.try_acquire() is None
    first.release()
    await clock.run(10)
    await asyncio.gather(*tasks)
    assert order == list(range(6))
    assert limiter.in_flight == 0
    assert limiter.queued == 0


async def test_a_more_important_waiter_is_served_first_and_each_priority_in_arrival_order() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1)
    held = await limiter.acquire()
    order: list[str] = []

    async def waiter(name: str, priority: int) -> None:
        permit = await limiter.acquire(priority=priority)
        order.append(name)
        await clock.sleep(1)
        permit.release()

    tasks = [asyncio.create_task(waiter(n, p)) for n, p in [("low1", 2), ("mid", 1), ("low2", 2)]]
    await clock.run(0)
    tasks.append(asyncio.create_task(waiter("top", 0)))  # arrives last, served first
    await clock.run(0)
    assert limiter.queued == 4
    assert [limiter.queued_before(p) for p in (0, 1, 2)] == [1, 2, 4]
    held.release()
    await clock.run(10)
    await asyncio.gather(*tasks)
    assert order == ["top", "mid", "low1", "low2"]
    assert limiter.queued == 0
    assert limiter.in_flight == 0


async def test_estimated_wait_and_shedding_count_only_the_waiters_that_come_first() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1)
    first = await limiter.acquire()
    clock.advance(2)
    first.release()  # a 2 s service time
    held = await limiter.acquire()
    optional = [asyncio.create_task(limiter.acquire(priority=1)) for _ in range(3)]
    await clock.run(0)
    assert limiter.estimated_wait(priority=1) == pytest.approx(8.0)  # behind three of its own
    assert limiter.estimated_wait(priority=0) == pytest.approx(2.0)  # the optional ones do not count
    assert limiter.estimated_wait() == pytest.approx(2.0)
    # A more important caller is not refused for the less important queue...
    task = asyncio.create_task(limiter.acquire(timeout=3.0, shed_late=True, priority=0))
    await clock.run(0)
    assert limiter.queued == 4
    # ...while another optional one is, at once, with the wait it would have had as its retry_after.
    with pytest.raises(Overloaded) as info:
        await limiter.acquire(timeout=3.0, shed_late=True, priority=1)
    assert info.value.reason == "deadline"
    assert info.value.retry_after == pytest.approx(10.0)
    clock.advance(2)
    held.release()
    important = await task
    assert limiter.queued == 3
    important.release()
    for t in optional:
        t.cancel()
    await asyncio.gather(*optional, return_exceptions=True)
    assert limiter.queued == 0


async def test_a_less_important_waiter_times_out_while_important_calls_keep_the_server_busy() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1)
    stop = False

    async def important() -> None:
        while not stop:
            permit = await limiter.acquire(priority=0)
            await clock.sleep(1)
            permit.release()

    busy = [asyncio.create_task(important()) for _ in range(2)]
    await clock.run(0)
    optional = asyncio.create_task(limiter.acquire(timeout=5.0, priority=1))
    await clock.run(6)
    with pytest.raises(Overloaded) as info:
        await optional
    assert info.value.reason == "queue_timeout"
    stop = True
    await clock.run(3)
    await asyncio.gather(*busy)
    assert limiter.queued == 0
    assert limiter.in_flight == 0


async def test_a_waiter_whose_time_runs_out_leaves_overloaded_with_an_estimate() -> None:
    clock = FakeClock()
    bus = EventBus()
    rejected: list[CallRejected] = []
    bus.subscribe(rejected.append, CallRejected)
    limiter = make(clock, bus, initial_limit=1, max_limit=1)
    # Measure a service time of 2 s.
    permit = await limiter.acquire()
    clock.advance(2)
    permit.release()
    busy = await limiter.acquire()
    task = asyncio.create_task(limiter.acquire(timeout=1.5))
    await clock.run(0)
    assert limiter.queued == 1
    assert limiter.estimated_wait() == pytest.approx(4.0)  # itself and the one queued ahead of it
    await clock.run(1.5)
    with pytest.raises(Overloaded) as info:
        await task
    assert info.value.reason == "queue_timeout"
    # The estimate for a caller now: one call in flight, nobody queued: one service time.
    assert info.value.retry_after == pytest.approx(2.0)
    assert limiter.queued == 0
    assert limiter.in_flight == 1
    assert [(r.kind, r.reason) for r in rejected] == [("limiter", "queue_timeout")]
    busy.release()
    assert limiter.stats.rejected == {"queue_full": 0, "queue_timeout": 1, "deadline": 0}


async def test_shed_late_refuses_at_once_a_caller_whose_expected_wait_exceeds_its_timeout() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1)
    held = await limiter.acquire()
    # No service time measured yet: no estimate, so nobody is refused for a deadline.
    early = asyncio.create_task(limiter.acquire(timeout=0.5, shed_late=True))
    await clock.run(0)
    assert limiter.queued == 1
    await clock.run(0.5)
    with pytest.raises(Overloaded) as first:
        await early
    assert first.value.reason == "queue_timeout"
    clock.advance(1.5)
    held.release()  # a 2 s service time
    held = await limiter.acquire()
    started = clock.now()
    with pytest.raises(Overloaded) as info:
        await limiter.acquire(timeout=1.0, shed_late=True)  # expects to wait 2 s
    assert info.value.reason == "deadline"
    assert clock.now() == started  # told at once, nothing queued
    assert limiter.queued == 0
    # A caller with time enough for the expected wait queues as usual.
    patient = asyncio.create_task(limiter.acquire(timeout=3.0, shed_late=True))
    await clock.run(0)
    assert limiter.queued == 1
    clock.advance(2)
    held.release()
    (await patient).release()
    assert limiter.stats.rejected == {"queue_full": 0, "queue_timeout": 1, "deadline": 1}


async def test_a_full_queue_rejects_at_once() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1, max_queue=1)
    held = await limiter.acquire()
    waiting = asyncio.create_task(limiter.acquire())
    await clock.run(0)
    with pytest.raises(Overloaded) as info:
        await limiter.acquire()
    assert info.value.reason == "queue_full"
    held.release()
    (await waiting).release()
    assert limiter.stats.rejected["queue_full"] == 1


async def test_max_queue_zero_means_never_wait() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1, max_queue=0)
    held = await limiter.acquire()
    with pytest.raises(Overloaded):
        await limiter.acquire()
    held.release()
    (await limiter.acquire()).release()


async def test_a_cancelled_waiter_leaves_the_queue_and_one_cancelled_after_the_hand_off_passes_it_on() -> (
    None
):
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1)
    held = await limiter.acquire()
    a = asyncio.create_task(limiter.acquire())
    b = asyncio.create_task(limiter.acquire())
    c = asyncio.create_task(limiter.acquire())
    await clock.run(0)
    a.cancel()
    await asyncio.gather(a, return_exceptions=True)
    assert limiter.queued == 2
    held.release()  # hands the permit to b ...
    b.cancel()  # ... which is cancelled before it resumes: the permit goes on to c
    await asyncio.gather(b, return_exceptions=True)
    permit = await c
    assert limiter.in_flight == 1
    assert limiter.queued == 0
    permit.release()
    permit.release()  # twice does nothing
    assert limiter.in_flight == 0


async def test_a_drop_shrinks_the_limit_but_never_below_the_calls_in_flight() -> None:
    clock = FakeClock()
    bus = EventBus()
    changes: list[LimitChanged] = []
    bus.subscribe(changes.append, LimitChanged)
    limiter = make(clock, bus, initial_limit=8, max_limit=8, drop_ratio=0.5)
    permits = [await limiter.acquire() for _ in range(8)]
    permits[0].release(dropped=True)  # 7 still in flight: the limit can only go to 7
    assert limiter.limit == 7
    for p in permits[1:5]:
        p.release()
    permits[5].release(dropped=True)  # 2 in flight: halving 7 gives 4 (floor of 3.5 taken off)
    assert limiter.limit == 4
    assert [c.reason for c in changes] == ["drop", "drop"]
    for p in permits[6:]:
        p.release()
    assert limiter.stats.dropped == 2


async def test_estimated_wait_is_zero_with_a_free_permit_and_grows_with_the_queue() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=2, max_limit=2, default_service_time=3.0)
    assert limiter.estimated_wait() == 0.0
    p1 = await limiter.acquire()
    assert limiter.estimated_wait() == 0.0
    p2 = await limiter.acquire()
    assert limiter.estimated_wait() == pytest.approx(1.5)  # one of 2 permits frees per 1.5 s on average
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await clock.run(0)
    assert limiter.estimated_wait() == pytest.approx(4 * 3.0 / 2)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    p1.release()
    p2.release()


async def test_call_forms_share_one_engine() -> None:
    clock = FakeClock()
    limiter = make(clock, initial_limit=1, max_limit=1)

    @limiter
    async def double(x: int) -> int:
        assert limiter.in_flight == 1
        return 2 * x

    assert await double(4) == 8
    assert await limiter.call(double.__wrapped__, 5) == 10  # type: ignore[attr-defined]
    async with limiter:
        assert limiter.in_flight == 1
    assert limiter.in_flight == 0

    async def times_out() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await limiter.call(times_out)
    assert limiter.stats.dropped == 1
    assert limiter.stats.granted == 4


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match="min_limit"):
        LimiterConfig(min_limit=5, max_limit=2)
    with pytest.raises(ValidationError, match="alpha"):
        LimiterConfig(alpha=2.0, beta=1.0)
    with pytest.raises(ValidationError, match="max_limit"):
        LimiterConfig(max_limit=0)
    with pytest.raises(ValidationError, match="extra"):
        LimiterConfig(max=3)  # type: ignore[call-arg]
    # An initial limit outside the bounds is clamped, not refused (a client sets max_limit per endpoint).
    assert AdaptiveLimiter("x", LimiterConfig(initial_limit=10, max_limit=3), events=EventBus()).limit == 3


def test_capped_settings_never_exceed_the_ceiling() -> None:
    config = LimiterConfig(min_limit=2, initial_limit=6, max_limit=8)
    four, one = config.capped(4), config.capped(1)
    assert (four.min_limit, four.initial_limit, four.max_limit) == (2, 4, 4)
    assert (one.min_limit, one.initial_limit, one.max_limit) == (1, 1, 1)
    assert config.capped(32).max_limit == 8  # a ceiling only lowers


# -- a state machine over acquire / release / timeout / cancel ----------------------------------------


class LimiterMachine(RuleBasedStateMachine):
    """Random acquires (with and without timeouts, of three priorities), releases (some as drops),
    cancellations and clock moves. Every caller ends up holding a permit, rejected, cancelled or still
    waiting -- none is lost -- and ``in_flight <= limit`` always."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.limiter: AdaptiveLimiter
        self.tasks: list[asyncio.Task[Permit]] = []
        self.held: list[Permit] = []
        self.rejected = 0
        self.cancelled = 0
        self.granted = 0

    @initialize(
        initial=st.integers(1, 6),
        top=st.integers(1, 6),
        max_queue=st.integers(0, 8),
        alpha=st.sampled_from([0.2, 0.5]),
        budget=st.none() | st.floats(0.5, 10.0),
        slots=st.none() | st.integers(1, 6),
    )
    def build(
        self, initial: int, top: int, max_queue: int, alpha: float, budget: float | None, slots: int | None
    ) -> None:
        self.limiter = AdaptiveLimiter(
            "m",
            LimiterConfig(
                initial_limit=initial,
                max_limit=top,
                max_queue=max_queue,
                max_wait=30,
                alpha=alpha,
                latency_budget=budget,
                late_window=2,
                slots=slots,
            ),
            clock=self.clock,
            events=EventBus(),
        )

    def settle(self) -> None:
        async def yields() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        self.loop.run_until_complete(yields())
        for task in [t for t in self.tasks if t.done()]:
            self.tasks.remove(task)
            if task.cancelled():
                self.cancelled += 1
            elif isinstance(task.exception(), Overloaded):
                self.rejected += 1
            else:
                self.held.append(task.result())
                self.granted += 1

    @rule(timeout=st.none() | st.floats(0.0, 20.0), priority=st.integers(0, 2))
    def acquire(self, timeout: float | None, priority: int) -> None:
        self.tasks.append(self.loop.create_task(self.limiter.acquire(timeout=timeout, priority=priority)))
        self.settle()

    @precondition(lambda self: bool(self.held))
    @rule(
        data=st.data(),
        dropped=st.booleans(),
        work=st.floats(0.0, 5.0),
        size=st.none() | st.floats(0.0, 500.0),
    )
    def release(self, data: st.DataObject, dropped: bool, work: float, size: float | None) -> None:
        self.clock.advance(work)
        permit = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        permit.release(dropped=dropped, work=size)  # calls with and without their size, mixed
        self.settle()

    @precondition(lambda self: bool(self.tasks))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.tasks[data.draw(st.integers(0, len(self.tasks) - 1))].cancel()
        self.settle()

    @rule(seconds=st.floats(0.0, 25.0))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    @invariant()
    def in_flight_within_limit(self) -> None:
        if hasattr(self, "limiter"):
            lim = self.limiter
            assert lim.in_flight <= lim.limit
            assert lim.config.min_limit <= lim.limit <= lim.config.max_limit
            # The latency ceiling is never below min_limit, and the limit never above it.
            assert lim.ceiling is None or lim.config.min_limit <= lim.limit <= lim.ceiling

    @invariant()
    def no_waiter_is_lost(self) -> None:
        if hasattr(self, "limiter"):
            lim = self.limiter
            # Every permit handed out is held by a caller; every queued entry is a waiting caller.
            assert lim.in_flight == len(self.held)
            assert lim.queued == len(self.tasks)
            # Nobody waits while a permit is free.
            assert lim.queued == 0 or lim.in_flight == lim.limit

    def teardown(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.settle()
        for permit in self.held:
            permit.release()
        assert not hasattr(self, "limiter") or (self.limiter.in_flight == 0 and self.limiter.queued == 0)
        self.loop.close()


TestLimiterMachine = LimiterMachine.TestCase
TestLimiterMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_events_are_events() -> None:
    assert issubclass(LimitChanged, Event)
