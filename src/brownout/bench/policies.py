"""``brownout bench policies``: nanoseconds each library adds to one successful call.

Every case wraps the same trivial coroutine (``async def op(): return 1``) and times ``n`` awaited
calls through the wrapper against ``n`` bare awaited calls, in alternating rounds; the figure is the
difference of the best rounds divided by ``n``. Libraries are measured in the form their users write
(a decorator for most). pybreaker has no asyncio support (its ``call_async`` needs Tornado), so it is
measured on a plain function against a bare plain call -- the overhead it adds all the same.

Cases:

* ``breaker``: brownout's CircuitBreaker against pybreaker, aiobreaker, purgatory, circuitbreaker;
* ``retry``: brownout's Retry against tenacity and stamina (3 attempts, first one succeeds);
* ``deadline``: brownout's Deadline against ``asyncio.timeout`` and ``asyncio.wait_for``;
* ``composition``: brownout's Deadline → CircuitBreaker → Retry stack, the whole thing.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from brownout.policies.breaker import CircuitBreaker
from brownout.policies.compose import compose
from brownout.policies.deadline import Deadline, DeadlineConfig
from brownout.policies.retry import Retry

__all__ = ["Row", "run"]


@dataclass(frozen=True, slots=True)
class Row:
    """One measurement: ``added_ns`` per successful call, or ``error`` when the peer could not run."""

    case: str
    library: str
    added_ns: float | None
    note: str = ""
    error: str = ""


async def _op() -> int:
    return 1


def _sync_op() -> int:
    return 1


AsyncOp = Callable[[], Awaitable[Any]]


async def _time_async(op: AsyncOp, n: int) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await op()
    return time.perf_counter_ns() - t0


def _time_sync(op: Callable[[], Any], n: int) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        op()
    return time.perf_counter_ns() - t0


async def _added_async(op: AsyncOp, n: int, rounds: int) -> float:
    await op()  # warm up, and fail early if the wrapper does not work
    best_bare = best_op = float("inf")
    for _ in range(rounds):
        gc.collect()
        best_bare = min(best_bare, await _time_async(_op, n))
        best_op = min(best_op, await _time_async(op, n))
    return max(0.0, (best_op - best_bare) / n)


def _added_sync(op: Callable[[], Any], n: int, rounds: int) -> float:
    op()
    best_bare = best_op = float("inf")
    for _ in range(rounds):
        gc.collect()
        best_bare = min(best_bare, _time_sync(_sync_op, n))
        best_op = min(best_op, _time_sync(op, n))
    return max(0.0, (best_op - best_bare) / n)


# ---------------------------------------------------------------------------------------- builders
# Each returns (callable, is_async, note). Imports of peers happen here so a missing peer only
# affects its own row.


def _brownout_breaker() -> tuple[Callable[[], Any], bool, str]:
    return CircuitBreaker("bench")(_op), True, "decorator, count window"


def _pybreaker() -> tuple[Callable[[], Any], bool, str]:
    import pybreaker

    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    return breaker(_sync_op), False, "sync (no asyncio support)"


def _aiobreaker() -> tuple[Callable[[], Any], bool, str]:
    from datetime import timedelta

    import aiobreaker

    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=60))

    async def op() -> Any:
        return await breaker.call_async(_op)

    return op, True, "call_async"


def _purgatory() -> tuple[Callable[[], Any], bool, str]:
    import purgatory

    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    return factory("bench")(_op), True, "decorator, in-memory"


def _circuitbreaker() -> tuple[Callable[[], Any], bool, str]:
    import circuitbreaker

    return circuitbreaker.circuit(failure_threshold=5, recovery_timeout=60)(_op), True, "decorator"


def _brownout_retry() -> tuple[Callable[[], Any], bool, str]:
    return Retry("bench")(_op), True, "decorator, 3 attempts, with retry budget"


def _tenacity() -> tuple[Callable[[], Any], bool, str]:
    import tenacity

    return tenacity.retry(stop=tenacity.stop_after_attempt(3))(_op), True, "decorator, 3 attempts"


def _stamina() -> tuple[Callable[[], Any], bool, str]:
    import stamina

    return stamina.retry(on=Exception, attempts=3)(_op), True, "decorator, 3 attempts"


def _brownout_deadline() -> tuple[Callable[[], Any], bool, str]:
    return Deadline("bench", DeadlineConfig(timeout=30))(_op), True, "decorator, 30 s"


def _asyncio_timeout() -> tuple[Callable[[], Any], bool, str]:
    async def op() -> Any:
        async with asyncio.timeout(30):
            return await _op()

    return op, True, "async with asyncio.timeout(30)"


def _asyncio_wait_for() -> tuple[Callable[[], Any], bool, str]:
    async def op() -> Any:
        return await asyncio.wait_for(_op(), 30)

    return op, True, "asyncio.wait_for(..., 30)"


def _brownout_composition() -> tuple[Callable[[], Any], bool, str]:
    stack = compose(Deadline("bench", DeadlineConfig(timeout=30)), CircuitBreaker("bench"), Retry("bench"))
    return stack(_op), True, "Deadline → CircuitBreaker → Retry, decorator"


CASES: dict[str, list[tuple[str, Callable[[], tuple[Callable[[], Any], bool, str]]]]] = {
    "breaker": [
        ("brownout", _brownout_breaker),
        ("pybreaker", _pybreaker),
        ("aiobreaker", _aiobreaker),
        ("purgatory", _purgatory),
        ("circuitbreaker", _circuitbreaker),
    ],
    "retry": [("brownout", _brownout_retry), ("tenacity", _tenacity), ("stamina", _stamina)],
    "deadline": [
        ("brownout", _brownout_deadline),
        ("asyncio.timeout", _asyncio_timeout),
        ("asyncio.wait_for", _asyncio_wait_for),
    ],
    "composition": [("brownout", _brownout_composition)],
}


async def _run_async(calls: int, rounds: int, cases: list[str]) -> list[Row]:
    rows: list[Row] = []
    for case in cases:
        for library, build in CASES[case]:
            try:
                op, is_async, note = build()
                if is_async:
                    added = await _added_async(op, calls, rounds)
                else:
                    added = _added_sync(op, calls, rounds)
            except Exception as e:  # a missing or broken peer is reported, not fatal
                rows.append(Row(case, library, None, error=f"{type(e).__name__}: {e}"))
                continue
            rows.append(Row(case, library, round(added, 1), note=note))
    return rows


def run(calls: int = 20_000, rounds: int = 5, cases: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], "goals": {...}}`` (the ``--json`` output)."""
    chosen = cases or list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    rows = asyncio.run(_run_async(calls, rounds, chosen))
    return {"rows": [asdict(r) for r in rows], "goals": _goals(rows), "calls": calls, "rounds": rounds}


def _goals(rows: list[Row]) -> dict[str, Any]:
    def added(case: str, library: str) -> float | None:
        for r in rows:
            if r.case == case and r.library == library:
                return r.added_ns
        return None

    goals: dict[str, Any] = {}
    ours = added("breaker", "brownout")
    pyb = added("breaker", "pybreaker")
    if ours is not None and pyb:
        goals["breaker_vs_pybreaker_ratio"] = round(ours / pyb, 3)
        goals["breaker_at_most_quarter_of_pybreaker"] = ours <= pyb / 4
    peers = [
        r.added_ns for r in rows if r.case == "breaker" and r.library != "brownout" and r.added_ns is not None
    ]
    comp = added("composition", "brownout")
    if comp is not None and peers:
        fastest = min(peers)
        goals["composition_vs_fastest_peer_breaker_ratio"] = round(comp / fastest, 3) if fastest else None
        goals["composition_below_fastest_peer_breaker"] = comp < fastest
    return goals
