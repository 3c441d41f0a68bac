"""``brownout bench stampede``: 1000 callers hit one missing key at once (a cache stampede).

Each library gets a fresh cache, the same computation (a 50 ms ``asyncio.sleep`` that counts how
often it runs), and ``callers`` tasks started together that all ask for the same key. Reported per
library: how many computations ran, and the p50/p99 latency each caller saw, from the moment all
callers were released. Ideal: 1 computation, p99 a hair above the computation time.

* brownout: ``Cache.get_or_compute`` (singleflight on a cold miss);
* cashews: ``@cache(ttl, lock=True)`` on an in-memory backend, its documented stampede protection;
* aiocache: ``@cached`` on its in-memory backend;
* cachetools: a ``TTLCache`` used check-then-compute, as is usual with asyncio (it has no async API).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from brownout.bench import percentile
from brownout.policies.cache import Cache, CacheConfig

__all__ = ["Row", "run"]


@dataclass(frozen=True, slots=True)
class Row:
    """One library's result; ``error`` is set when the peer could not run."""

    library: str
    computations: int | None
    compute_ms: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    note: str = ""
    error: str = ""


class _Computation:
    """The expensive call being protected: sleeps ``seconds`` and counts its runs."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs = 0

    async def __call__(self) -> dict[str, Any]:
        self.runs += 1
        await asyncio.sleep(self.seconds)
        return {"prediction": 0.87, "model": "bench"}


Getter = Callable[[], Awaitable[Any]]


async def _brownout(comp: _Computation) -> tuple[Getter, str]:
    cache: Cache[str, dict[str, Any]] = Cache("bench", CacheConfig(ttl=300))

    async def get() -> Any:
        return await cache.get_or_compute("hot-key", comp)

    return get, "Cache.get_or_compute"


async def _cashews(comp: _Computation) -> tuple[Getter, str]:
    from cashews import Cache as CashewsCache

    cache = CashewsCache()
    cache.setup("mem://")

    @cache(ttl="5m", key="hot-key", lock=True)
    async def get() -> Any:
        return await comp()

    return get, "@cache(lock=True), mem://"


async def _aiocache(comp: _Computation) -> tuple[Getter, str]:
    from aiocache import cached

    @cached(ttl=300, key="hot-key")  # type: ignore[untyped-decorator]
    async def get() -> Any:
        return await comp()

    return get, "@cached, SimpleMemoryCache"


async def _cachetools(comp: _Computation) -> tuple[Getter, str]:
    from cachetools import TTLCache

    cache: TTLCache[str, Any] = TTLCache(maxsize=1000, ttl=300)

    async def get() -> Any:
        value = cache.get("hot-key")
        if value is None:
            value = await comp()
            cache["hot-key"] = value
        return value

    return get, "TTLCache, check-then-compute"


LIBRARIES: dict[str, Callable[[_Computation], Awaitable[tuple[Getter, str]]]] = {
    "brownout": _brownout,
    "cashews": _cashews,
    "aiocache": _aiocache,
    "cachetools": _cachetools,
}


async def _one(library: str, callers: int, compute_s: float) -> Row:
    comp = _Computation(compute_s)
    try:
        get, note = await LIBRARIES[library](comp)
    except Exception as e:
        return Row(library, None, compute_s * 1000, None, None, None, error=f"{type(e).__name__}: {e}")
    start = asyncio.Event()
    latencies: list[float] = []

    async def caller() -> None:
        await start.wait()
        t0 = time.perf_counter()
        await get()
        latencies.append((time.perf_counter() - t0) * 1000)

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    await asyncio.sleep(0)  # let every caller reach start.wait()
    start.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        return Row(library, comp.runs, compute_s * 1000, None, None, None, note, error=repr(errors[0]))
    return Row(
        library,
        comp.runs,
        compute_s * 1000,
        round(percentile(latencies, 50), 2),
        round(percentile(latencies, 99), 2),
        round(max(latencies), 2),
        note,
    )


async def _run_async(callers: int, compute_s: float, libraries: list[str]) -> list[Row]:
    return [await _one(lib, callers, compute_s) for lib in libraries]


def run(callers: int = 1000, compute_ms: float = 50.0, libraries: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], "goals": {...}}`` (the ``--json`` output)."""
    chosen = libraries or list(LIBRARIES)
    unknown = [lib for lib in chosen if lib not in LIBRARIES]
    if unknown:
        raise ValueError(f"unknown librar(y/ies) {unknown}; choose from {list(LIBRARIES)}")
    rows = asyncio.run(_run_async(callers, compute_ms / 1000, chosen))
    goals: dict[str, Any] = {}
    for r in rows:
        if r.library == "brownout" and r.p99_ms is not None:
            goals["one_computation"] = r.computations == 1
            goals["p99_above_compute_ms"] = round(r.p99_ms - compute_ms, 2)
            goals["p99_within_10ms_of_compute"] = r.p99_ms - compute_ms <= 10
    return {"rows": [asdict(r) for r in rows], "goals": goals, "callers": callers}
