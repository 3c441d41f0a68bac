"""An in-process LRU + TTL cache that protects what it caches.

At its base it is an LRU cache of 1000 entries whose entries live 600 seconds, swept every 60
seconds. On top of that it protects what it caches:

* **Stampede protection**: :meth:`Cache.fetch` computes a missing value through a
  :class:`~brownout.policies.singleflight.Singleflight`, so a thousand concurrent callers of a cold key
  cause one computation.
* **Early refresh** ("XFetch", Vattani et al., *Optimal Probabilistic Cache Stampede Prevention*):
  a fresh hit may start one background refresh shortly before the entry expires, with a probability
  that grows as expiry nears and with how long the value took to compute, so a hot key is usually
  refreshed before anyone sees it expire. A hit is still served at once.
* **Stale-while-revalidate**: for ``stale_while_revalidate`` seconds after expiry the old value is
  served at once while one background refresh runs.
* **Stale-if-error**: for ``stale_if_error`` seconds after expiry the old value is served, flagged
  ``"stale_error"``, when computing a new one fails.

Statuses of :meth:`Cache.fetch` (``CacheResult.status``): ``"hit"`` (fresh), ``"miss"`` (computed for
this call, possibly shared with concurrent callers), ``"stale"`` (stale-while-revalidate) and
``"stale_error"`` (stale-if-error).

Counting: every lookup (:meth:`Cache.get`, :meth:`Cache.fetch`) is either a *hit* (a fresh value) or a
*miss*; ``stale_served`` counts the misses answered with a stale value. ``refreshes`` and
``refresh_failures`` count background refreshes (early or stale-while-revalidate); a failed
foreground computation reaches its callers instead. ``expirations`` counts entries removed because
they were past their last servable moment, ``evictions`` those removed to make room.

An expired entry is kept while it may still be served stale (until ``expires_at`` +
``max(stale_while_revalidate, stale_if_error)``) and removed after that lazily, by the lookup that
finds it, or by :meth:`Cache.sweep`, which the background sweeper started by :meth:`Cache.start` runs
every ``sweep_interval`` seconds of clock time.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import Field

from brownout.background import Periodic
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, CacheRefreshFailed, EventBus
from brownout.policies._base import PolicyConfig
from brownout.policies.singleflight import Singleflight

__all__ = ["Cache", "CacheConfig", "CacheResult", "CacheStats", "CacheStatus"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CacheStatus = Literal["hit", "miss", "stale", "stale_error"]
"""How :meth:`Cache.fetch` answered: fresh, computed now, stale while refreshing, stale after a failure."""

# XFetch refreshes when  now - delta * beta * ln(u) >= expires_at  with u in (0, 1]. Since u is
# 1 - random() and random() < 1 - 2**-53, -ln(u) <= 53 * ln(2) ~= 36.74, so before
# expires_at - delta * beta * 37 the test can never pass and a hit need not draw a random number.
_MAX_NEG_LN_U = 37.0


class CacheConfig(PolicyConfig):
    """Settings of a :class:`Cache`; by default 1000 entries, fresh for 10 minutes, swept every 60 s."""

    max_entries: int = Field(default=1000, ge=1, description="Most entries kept; beyond it the LRU one goes.")
    ttl: float = Field(default=600.0, gt=0, description="Seconds an entry stays fresh, unless set otherwise.")
    sweep_interval: float = Field(
        default=60.0, gt=0, description="Seconds between background sweeps of dead entries."
    )
    stale_while_revalidate: float = Field(
        default=0.0,
        ge=0,
        description="Seconds after expiry during which the stale value is served while one refresh runs.",
    )
    stale_if_error: float = Field(
        default=0.0,
        ge=0,
        description="Seconds after expiry during which the stale value is served when recomputing fails.",
    )
    early_refresh_beta: float = Field(
        default=1.0,
        ge=0,
        description="XFetch eagerness: >1 refreshes earlier, <1 later, 0 never refreshes early.",
    )


@dataclass(frozen=True, slots=True)
class CacheResult(Generic[V]):
    """What :meth:`Cache.fetch` returns: the ``value``, how it was found, and its ``age`` in seconds."""

    value: V
    status: CacheStatus
    age: float


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a cache's counters and size (``utilisation`` = ``size`` / ``max_entries``)."""

    hits: int
    misses: int
    evictions: int
    expirations: int
    stale_served: int
    refreshes: int
    refresh_failures: int
    size: int
    max_entries: int
    utilisation: float
    ttl: float


# Building a frozen dataclass through its __init__ costs a generic object.__setattr__ per field; the
# slot descriptors set the same fields at about half the cost, and fetch() builds one per call.
_new_result = object.__new__
_result_slots = vars(CacheResult)
_set_value = _result_slots["value"].__set__
_set_status = _result_slots["status"].__set__
_set_age = _result_slots["age"].__set__


def _result(value: V, status: CacheStatus, age: float) -> CacheResult[V]:
    result: CacheResult[V] = _new_result(CacheResult)
    _set_value(result, value)
    _set_status(result, status)
    _set_age(result, age)
    return result


class _Entry(Generic[V]):
    """One cached value. ``delta`` is how long computing it took (XFetch weighs refreshes by it)."""

    __slots__ = ("delta", "expires_at", "stored_at", "value", "xfetch_from")

    def __init__(
        self, value: V, stored_at: float, expires_at: float, delta: float, xfetch_from: float
    ) -> None:
        self.value = value
        self.stored_at = stored_at
        self.expires_at = expires_at
        self.delta = delta
        # Before this moment an early refresh cannot fire, so a hit skips the random draw. Equal to
        # expires_at when early refresh is off for this entry.
        self.xfetch_from = xfetch_from


class Cache(Generic[K, V]):
    """LRU + TTL cache with stampede protection, early refresh, stale-while-revalidate, stale-if-error.

    ``rng`` drives the early-refresh draws (pass a seeded :class:`random.Random` for repeatable runs).
    The cache is meant for one event loop; it takes no locks.
    """

    __slots__ = (
        "_background",
        "_beta",
        "_clock",
        "_data",
        "_events",
        "_evictions",
        "_expirations",
        "_flight",
        "_hits",
        "_keep",
        "_max_entries",
        "_misses",
        "_now",
        "_random",
        "_refresh_failures",
        "_refreshes",
        "_sie",
        "_stale_served",
        "_sweeper",
        "_swr",
        "_ttl",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str = "cache",
        config: CacheConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        """Names this cache in events."""
        self.config = config if config is not None else CacheConfig()
        """The validated settings."""
        cfg = self.config
        self._clock = clock
        self._now = clock.now
        self._events = events
        self._random = (rng if rng is not None else random.Random()).random
        # Config values copied to slots: read on every call, and attribute access on a pydantic model
        # is slower than on a slot.
        self._max_entries = cfg.max_entries
        self._ttl = cfg.ttl
        self._swr = cfg.stale_while_revalidate
        self._sie = cfg.stale_if_error
        self._keep = max(self._swr, self._sie)
        self._beta = cfg.early_refresh_beta
        self._data: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._flight: Singleflight[K, V] = Singleflight(f"{name}.compute")
        # Strong references to background refreshes: the event loop keeps only weak ones, and a
        # collected task would silently stop refreshing.
        self._background: set[asyncio.Future[V]] = set()
        self._sweeper = Periodic(
            f"{name}-sweeper", self.sweep, lambda: self.config.sweep_interval, clock=clock, immediately=False
        )
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0
        self._stale_served = 0
        self._refreshes = 0
        self._refresh_failures = 0

    # -- plain mapping operations ---------------------------------------------------------------

    def get(self, key: K) -> V | None:
        """The fresh value for ``key``, or ``None``. Counts a hit or a miss; a hit becomes most recent."""
        entry = self._data.get(key)
        if entry is not None:
            now = self._now()
            if now < entry.expires_at:
                self._data.move_to_end(key)
                self._hits += 1
                return entry.value
            if now >= entry.expires_at + self._keep:
                del self._data[key]
                self._expirations += 1
        self._misses += 1
        return None

    def peek(self, key: K) -> V | None:
        """The fresh value for ``key``, or ``None``, without counting or changing the LRU order."""
        entry = self._data.get(key)
        if entry is not None and self._now() < entry.expires_at:
            return entry.value
        return None

    def set(self, key: K, value: V, *, ttl: float | None = None, delta: float = 0.0) -> None:
        """Store ``value`` for ``ttl`` seconds (default: the config's), as the most recent entry.

        ``delta`` is how many seconds computing the value took; early refresh starts sooner for
        values that are slow to compute. Storing beyond ``max_entries`` evicts the least recently
        used entry.
        """
        if ttl is None:
            ttl = self._ttl
        elif not ttl > 0:
            raise ConfigError("ttl", f"must be > 0, got {ttl!r}")
        now = self._now()
        expires_at = now + ttl
        weight = delta * self._beta
        xfetch_from = expires_at - weight * _MAX_NEG_LN_U if weight > 0 else expires_at
        data = self._data
        if key in data:
            data.move_to_end(key)
            data[key] = _Entry(value, now, expires_at, delta, xfetch_from)
            return
        data[key] = _Entry(value, now, expires_at, delta, xfetch_from)
        if len(data) > self._max_entries:
            data.popitem(last=False)
            self._evictions += 1

    def delete(self, key: K) -> bool:
        """Remove ``key``; returns whether it was there (fresh or stale)."""
        return self._data.pop(key, None) is not None

    def clear(self) -> None:
        """Remove every entry (counters are kept)."""
        self._data.clear()

    def __len__(self) -> int:
        """Entries held, including expired ones still kept to be served stale."""
        return len(self._data)

    def __contains__(self, key: K) -> bool:
        """Whether ``key`` has a fresh value (does not count or touch the LRU order)."""
        entry = self._data.get(key)
        return entry is not None and self._now() < entry.expires_at

    @property
    def ttl(self) -> float:
        """Seconds a new entry stays fresh unless ``set`` says otherwise.

        Assignable: an adaptive TTL changes it at run time; entries already stored keep their expiry.
        """
        return self._ttl

    @ttl.setter
    def ttl(self, value: float) -> None:
        if not value > 0:
            raise ConfigError("ttl", f"must be > 0, got {value!r}")
        self._ttl = float(value)

    def stats(self) -> CacheStats:
        """A snapshot of the counters and the size."""
        size = len(self._data)
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
            stale_served=self._stale_served,
            refreshes=self._refreshes,
            refresh_failures=self._refresh_failures,
            size=size,
            max_entries=self._max_entries,
            utilisation=size / self._max_entries,
            ttl=self._ttl,
        )

    # -- expiry ---------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Remove every entry past its last servable moment; returns how many went."""
        now = self._now()
        keep = self._keep
        dead = [key for key, entry in self._data.items() if now >= entry.expires_at + keep]
        for key in dead:
            del self._data[key]
        self._expirations += len(dead)
        return len(dead)

    def start(self) -> None:
        """Start the background sweeper (idempotent; needs a running event loop)."""
        self._sweeper.start()

    async def aclose(self) -> None:
        """Stop the sweeper and cancel running background refreshes.

        A caller that had joined a cancelled refresh (it found the entry expired mid-refresh) sees
        :class:`asyncio.CancelledError`. The cache stays usable.
        """
        tasks: list[asyncio.Future[Any]] = [*self._background]
        for task in tasks:
            task.cancel()
        await self._sweeper.stop()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        """Start the sweeper."""
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the sweeper and background refreshes."""
        await self.aclose()

    # -- computing through the cache ------------------------------------------------------------

    async def get_or_compute(
        self, key: K, compute: Callable[[], Awaitable[V]], *, ttl: float | None = None
    ) -> V:
        """The value for ``key``: cached, or ``await compute()`` stored; see :meth:`fetch`."""
        # Fast path for the common fresh hit that cannot trigger an early refresh: no result object.
        entry = self._data.get(key)
        if entry is not None and self._now() < entry.xfetch_from:
            self._data.move_to_end(key)
            self._hits += 1
            return entry.value
        return (await self.fetch(key, compute, ttl=ttl)).value

    async def fetch(
        self, key: K, compute: Callable[[], Awaitable[V]], *, ttl: float | None = None
    ) -> CacheResult[V]:
        """The value for ``key`` and how it was found.

        * fresh: returned as ``"hit"``; if the early-refresh draw says so, one background refresh
          starts too.
        * expired less than ``stale_while_revalidate`` ago: returned as ``"stale"`` while one
          background refresh runs.
        * otherwise ``compute()`` runs -- once for all concurrent callers of ``key`` -- and its value is
          stored for ``ttl`` seconds and returned as ``"miss"``. If it raises and the entry expired
          less than ``stale_if_error`` ago, the old value is returned as ``"stale_error"``; else the
          error propagates.

        ``compute`` runs in a task of its own, so a caller that is cancelled does not stop it, and
        its value is stored even if every caller has gone.
        """
        now = self._now()
        entry = self._data.get(key)
        if entry is not None:
            if now < entry.expires_at:
                self._data.move_to_end(key)
                self._hits += 1
                if now >= entry.xfetch_from and self._xfetch_fires(entry, now):
                    self._refresh(key, compute, ttl, stale=False)
                return _result(entry.value, "hit", now - entry.stored_at)
            if now < entry.expires_at + self._swr:
                self._misses += 1
                self._stale_served += 1
                self._refresh(key, compute, ttl, stale=True)
                return _result(entry.value, "stale", now - entry.stored_at)
            if now >= entry.expires_at + self._keep:
                del self._data[key]
                self._expirations += 1
        if ttl is not None and not ttl > 0:
            raise ConfigError("ttl", f"must be > 0, got {ttl!r}")
        self._misses += 1
        try:
            value = await self._flight.do(key, functools.partial(self._load, key, compute, ttl))
        except Exception as exc:
            # Judge the stale-if-error window at failure time, on whatever entry is there now.
            now = self._now()
            entry = self._data.get(key)
            if entry is None or now >= entry.expires_at + self._sie:
                raise
            self._stale_served += 1
            if self._events.active:
                self._events.emit(
                    CacheRefreshFailed(
                        source=self.name,
                        at=now,
                        key=str(key),
                        error=f"{type(exc).__name__}: {exc}",
                        served_stale=True,
                    )
                )
            return CacheResult(entry.value, "stale_error", now - entry.stored_at)
        return CacheResult(value, "miss", 0.0)

    def _xfetch_fires(self, entry: _Entry[V], now: float) -> bool:
        u = 1.0 - self._random()
        if u <= 0.0:  # only a misbehaving rng returns >= 1; treat as the most eager draw
            return True
        return now - entry.delta * self._beta * math.log(u) >= entry.expires_at

    async def _load(self, key: K, compute: Callable[[], Awaitable[V]], ttl: float | None) -> V:
        # Runs inside the singleflight's task: it stores the value itself, so the cache is filled
        # even when every caller waiting for it was cancelled.
        started = self._now()
        value = await compute()
        self.set(key, value, ttl=ttl, delta=max(0.0, self._now() - started))
        return value

    def _refresh(
        self, key: K, compute: Callable[[], Awaitable[V]], ttl: float | None, *, stale: bool
    ) -> None:
        # One refresh per key: if a refresh or a foreground computation is already running, the
        # value it stores is the refresh.
        if key in self._flight:
            return
        task = self._flight.start(key, functools.partial(self._load, key, compute, ttl))
        self._refreshes += 1
        self._background.add(task)
        task.add_done_callback(functools.partial(self._refreshed, key, stale))

    def _refreshed(self, key: K, stale: bool, task: asyncio.Future[V]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        # Retrieving the exception here (the singleflight does too) keeps a failed refresh from being
        # logged as "never retrieved"; the old entry stays and keeps being served.
        exc = task.exception()
        if exc is None:
            return
        self._refresh_failures += 1
        if self._events.active:
            self._events.emit(
                CacheRefreshFailed(
                    source=self.name,
                    at=self._now(),
                    key=str(key),
                    error=f"{type(exc).__name__}: {exc}",
                    served_stale=stale,
                )
            )

    def __repr__(self) -> str:
        return f"Cache({self.name!r}, size={len(self._data)}, max_entries={self._max_entries})"
