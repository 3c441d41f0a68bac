"""The endpoint picker (brownout.policies.balance): the load statistics and the choice among replicas."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.errors import ConfigError
from brownout.policies.balance import LATENCY_ALPHA, EndpointLoad, pick
from brownout.policies.limiter import AdaptiveLimiter, LimiterConfig, Permit
from brownout.testing import FakeClock


@dataclass(eq=False)
class Replica:
    """The smallest endpoint the picker accepts: a load and whether it may take a call."""

    name: str
    load: EndpointLoad = field(default_factory=EndpointLoad)
    available: bool = True

    def __repr__(self) -> str:
        return f"Replica({self.name!r}, {self.load!r}, available={self.available})"


def replicas(*names: str) -> list[Replica]:
    return [Replica(name) for name in names]


def busy(replica: Replica, calls: int) -> Replica:
    for _ in range(calls):
        replica.load.begin()
    return replica


def limited(name: str, limit: int, *, clock: FakeClock) -> Replica:
    config = LimiterConfig(min_limit=1, max_limit=limit, initial_limit=limit)
    return Replica(name, EndpointLoad(AdaptiveLimiter(name, config, clock=clock)))


def take_slot(replica: Replica) -> Permit:
    limiter = replica.load.limiter
    assert limiter is not None
    permit = limiter.try_acquire()
    assert permit is not None
    return permit


# -- the statistics -------------------------------------------------------------------------------------


def test_the_latency_average_starts_at_the_first_answer_then_moves_towards_new_ones() -> None:
    load = EndpointLoad()
    assert load.ewma is None
    load.observe(1.0)
    assert load.ewma == 1.0
    load.observe(0.0)
    assert load.ewma == pytest.approx(1.0 - LATENCY_ALPHA)
    fast = EndpointLoad(alpha=1.0)
    fast.observe(2.0)
    fast.observe(0.5)
    assert fast.ewma == 0.5  # alpha 1: the newest answer alone


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_an_alpha_outside_zero_to_one_is_refused(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        EndpointLoad(alpha=alpha)


def test_without_a_limiter_the_calls_in_flight_are_those_counted() -> None:
    load = EndpointLoad()
    load.begin()
    load.begin()
    assert load.in_flight == 2
    load.end()
    assert load.in_flight == 1
    assert load.rank() == (False, 0.0, 0.0, 1)  # no wait for a slot; latency unknown
    load.observe(0.2)
    tried, wait, expected, in_flight = load.rank(tried=True)
    assert (tried, wait, in_flight) == (True, 0.0, 1)
    assert expected == pytest.approx(0.4)  # (1 + 1) * 0.2


def test_with_a_limiter_its_permits_are_the_calls_in_flight_and_its_wait_ranks_first() -> None:
    clock = FakeClock()
    replica = limited("a", 2, clock=clock)
    load = replica.load
    first = take_slot(replica)
    assert load.in_flight == 1  # a call counts from its grant, before anything is sent
    assert load.rank()[1] == 0.0  # a slot is still free
    second = take_slot(replica)
    assert load.rank()[1] > 0.0  # both taken: a newcomer would wait
    first.release()
    second.release()
    assert load.in_flight == 0
    assert "in_flight=0" in repr(load)


# -- the choice -------------------------------------------------------------------------------------------


def test_nothing_available_is_none() -> None:
    assert pick([]) is None
    a, b = replicas("a", "b")
    a.available = b.available = False
    assert pick([a, b]) is None
    b.available = True
    assert pick([a, b]) is b


def test_with_nothing_known_the_order_given_decides_and_ties_spread_by_calls_in_flight() -> None:
    a, b, c = replicas("a", "b", "c")
    assert pick([a, b, c]) is a
    busy(a, 1)
    assert pick([a, b, c]) is b
    busy(b, 1)
    assert pick([a, b, c]) is c


def test_a_tried_endpoint_goes_last_and_is_chosen_only_when_no_other_is_available() -> None:
    a, b = replicas("a", "b")
    a.load.observe(0.01)
    b.load.observe(5.0)
    busy(b, 10)
    assert pick([a, b]) is a
    assert pick([a, b], [a]) is b  # however slow and loaded the other one is
    b.available = False
    assert pick([a, b], [a]) is a  # the only one left: tried again
    assert pick([a, b], [a, b]) is a


def test_the_least_expected_latency_wins_so_a_slower_replica_gets_calls_once_the_fast_one_is_loaded() -> None:
    fast, slow = replicas("fast", "slow")
    fast.load.observe(0.1)
    slow.load.observe(0.3)
    assert pick([slow, fast]) is fast  # idle: the fastest
    busy(fast, 2)  # (2 + 1) * 0.1 = 0.3 ties slow's (0 + 1) * 0.3: fewer in flight wins
    assert pick([fast, slow]) is slow
    busy(slow, 1)  # slow: (1 + 1) * 0.3 = 0.6 > fast's 0.3
    assert pick([fast, slow]) is fast


def test_an_endpoint_that_has_not_answered_yet_counts_as_the_fastest() -> None:
    known, new = replicas("known", "new")
    known.load.observe(0.001)
    assert pick([known, new]) is new


def test_a_free_slot_beats_a_lower_latency_and_the_shorter_wait_wins_among_full_ones() -> None:
    clock = FakeClock()
    narrow = limited("narrow", 1, clock=clock)
    wide = limited("wide", 2, clock=clock)
    narrow.load.observe(0.01)
    wide.load.observe(10.0)
    assert pick([narrow, wide]) is narrow
    held = [take_slot(narrow)]
    assert pick([narrow, wide]) is wide  # narrow has no free slot: its calls would wait here
    held += [take_slot(wide), take_slot(wide)]
    # Both full: a new call waits about (1 - 0) * 1 s / 1 slot on narrow, 1 s / 2 slots on wide.
    assert pick([narrow, wide]) is wide
    for permit in held:
        permit.release()


# -- properties ---------------------------------------------------------------------------------------------

_latencies = st.none() | st.floats(0.0, 10.0, allow_nan=False)


@st.composite
def _replica(draw: st.DrawFn) -> Replica:
    replica = Replica(draw(st.text("abcdefgh", min_size=1, max_size=3)))
    ewma = draw(_latencies)
    if ewma is not None:
        replica.load.observe(ewma)
    busy(replica, draw(st.integers(0, 8)))
    replica.available = draw(st.booleans())
    return replica


@settings(max_examples=300, deadline=None)
@given(group=st.lists(_replica(), max_size=8), data=st.data())
def test_never_a_tried_endpoint_while_an_untried_available_one_exists(
    group: list[Replica], data: st.DataObject
) -> None:
    tried = data.draw(st.lists(st.sampled_from(group), unique_by=id) if group else st.just([]), label="tried")
    chosen = pick(group, tried)
    available = [r for r in group if r.available]
    if not available:
        assert chosen is None
        return
    assert chosen is not None
    assert chosen.available
    untried = [r for r in available if all(r is not t for t in tried)]
    if untried:
        assert all(chosen is not t for t in tried)
    # And it is the best of the endpoints it was chosen among, by the documented order.
    among = untried or available
    assert chosen.load.rank() == min(r.load.rank() for r in among)
    assert chosen is next(r for r in among if r.load.rank() == chosen.load.rank())  # first in order


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 6),
    latency=_latencies,
    ops=st.lists(st.one_of(st.just(-1), st.integers(0, 5)), max_size=60),
)
def test_among_equal_endpoints_calls_spread_evenly(n: int, latency: float | None, ops: list[int]) -> None:
    """Equal replicas stay within one call of each other, whatever calls start and finish (-1 picks and
    starts a call; k finishes one on the k-th replica, when it has one in flight)."""
    group = [Replica(str(i)) for i in range(n)]
    if latency is not None:
        for r in group:
            r.load.observe(latency)
    for op in ops:
        if op == -1:
            chosen = pick(group)
            assert chosen is not None
            # Never a replica with more calls than another: at most one more than the least loaded.
            assert chosen.load.in_flight == min(r.load.in_flight for r in group)
            chosen.load.begin()
        elif group[op % n].load.in_flight > 0:
            group[op % n].load.end()
    started = [r.load.in_flight for r in group]
    if all(op == -1 for op in ops):
        assert max(started) - min(started) <= 1


def test_the_latency_quantile_is_over_the_recent_answers() -> None:
    from brownout.policies.balance import RECENT_LATENCIES, EndpointLoad

    load = EndpointLoad()
    assert load.quantile(0.75) is None
    for seconds in (4.0, 1.0, 3.0, 2.0):
        load.observe(seconds)
    assert (load.quantile(0.0), load.quantile(0.5), load.quantile(0.75), load.quantile(1.0)) == (
        1.0,
        2.0,
        3.0,
        4.0,
    )
    for _ in range(RECENT_LATENCIES):
        load.observe(10.0)  # the older answers fall out
    assert load.quantile(0.0) == 10.0
