"""``brownout bench durable``: spool replay into PostgreSQL, and cache reads through Redis.

Two measurements of the durability and shared-state layers, on real servers:

* **Spool replay.** ``records`` brief-sized writes are appended to a :class:`~brownout.durable.spool.Spool`
  (an SQLite file on disk, fsync'd per group commit, appended concurrently as under load). The first
  ``per_entry`` of them are replayed with one write per transaction (:meth:`BriefStore.save
  <brownout.durable.store.BriefStore.save>`, what the spool falls back to when a batch fails), the
  rest by a :class:`~brownout.durable.spool.SpoolReplayer` with a *batch sink*, :meth:`BriefStore.save_many
  <brownout.durable.store.BriefStore.save_many>`, ``batch`` entries per transaction -- as the brief server
  replays (``BriefRecords._save_batch``, batches of ``REPLAY_BATCH`` = 500). Reported: appends/s, writes/s of
  both replays, and the share of each replay's time spent inside the sink (the rest is the spool's: reading,
  decoding and deleting entries, one fsync per batch). The run checks that every record is in the
  database exactly once.
* **Cache reads.** ``hot_keys`` brief-sized values are put in Redis through a
  :class:`~brownout.state.redis.SharedCache`; then ``reads`` reads, round-robin over those keys, one at
  a time: through a SharedCache whose local front holds one entry (so every read goes to Redis), through
  one with its default front (hot keys are served from process memory), and with plain redis-py
  ``GET`` + ``json.loads`` as the floor of a Redis round trip. The variants take turns in 5 rounds, so
  a busy moment of a shared machine hits all of them. Reported: reads/s and p50/p99 per read.

By default the bench starts a private PostgreSQL (on disk, ``fsync=on``: commits cost what they cost in
production) and a private Redis on free ports of 127.0.0.1, and removes them afterwards;
``postgres_url`` / ``redis_url`` use existing servers instead (the run's rows and keys are removed).
The whole run is bounded by ``budget`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from brownout.bench import percentile
from brownout.durable.spool import Spool, SpoolReplayer
from brownout.durable.store import BriefPayload, BriefRecord, BriefStore, briefs

__all__ = ["GOAL_REPLAY_WRITES_PER_S", "run"]

GOAL_REPLAY_WRITES_PER_S = 5_000
"""Issue 3's goal for spool replay into a local PostgreSQL."""

_APPEND_WAVE = 1_000
"""Appends in flight at once (the spool commits those that arrive together in one transaction)."""


def _payload(run_id: str, index: int) -> dict[str, Any]:
    """A spooled brief write shaped like the server's (``Runtime.record``): about 1.2 KB of JSON."""
    request_id = f"{run_id}-{index:07d}"
    brief = {
        "style": "fresh",
        "intensity": 0.62,
        "complexity": 0.48,
        "notes_preference": {
            "citrus": 0.9,
            "marine": 0.7,
            "green": 0.4,
            "floral": 0.3,
            "woody": 0.2,
            "musky": 0.1,
        },
        "product_category": "eau_de_toilette",
        "longevity": "moderate",
        "description": (
            "A bright daytime scent that opens on sparkling lemon and bergamot over a cool sea-breeze "
            "accord, settling into soft green leaves and a clean musky trail that stays close to the "
            f"skin through a warm afternoon (variant {index})."
        ),
        "creative_hints": [
            "Try a salted-lime twist in the opening to echo the seaside theme.",
            "A touch of fig leaf would bridge the citrus and the green heart.",
            "Keep the base light: white musk rather than amber for a daytime wear.",
        ],
    }
    response = {
        "request_id": request_id,
        "requested_mode": "balanced",
        "served_mode": "balanced",
        "degraded": False,
        "brief": brief,
        "warnings": [],
        "sources": {"generator": "model", "validator": "model"},
    }
    return {
        "request_id": request_id,
        "text": "A fresh summer scent with lemon and sea breeze for daytime, not too sweet, for the office",
        "requested_mode": "balanced",
        "served_mode": "balanced",
        "degraded": False,
        "response": response,
        "created_at": datetime.now(UTC).isoformat(),
    }


@contextlib.contextmanager
def _servers(
    postgres_url: str | None, redis_url: str | None, durable: bool
) -> Iterator[tuple[str, str, str]]:
    """Yield (postgres_url, redis_url, what_postgres_is), starting private servers where no URL is given."""
    from brownout.chaos.servers import PostgresServer, RedisServer

    with contextlib.ExitStack() as stack:
        where = "url"
        if postgres_url is None:
            pg = stack.enter_context(PostgresServer(durable=durable))
            postgres_url = pg.url
            where = "private, on disk" if durable else "private, in memory"
        if redis_url is None:
            redis_url = stack.enter_context(RedisServer()).url
        yield postgres_url, redis_url, where


async def _bounded_wait(condition: Callable[[], bool], budget_at: float, what: str) -> None:
    # A benchmark polling its own progress, not a policy: real time is what it measures.
    while not condition():
        if time.perf_counter() > budget_at:
            raise TimeoutError(f"bench durable: {what} did not finish within the time budget")
        await asyncio.sleep(0.002)


class _Timed:
    """The replay's sinks, adding up the time spent inside them (the database's share of a replay)."""

    def __init__(self, store: BriefStore) -> None:
        self.store = store
        self.seconds = 0.0
        self.calls = 0
        self.rows = 0

    async def one(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        """One write per transaction: :meth:`BriefStore.save` (the server's per-entry sink)."""
        t0 = time.perf_counter()
        await self.store.save(BriefRecord.from_payload(cast(BriefPayload, payload)))
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += 1

    async def many(self, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
        """A batch in one transaction: :meth:`BriefStore.save_many`, as ``BriefRecords._save_batch`` does."""
        t0 = time.perf_counter()
        await self.store.save_many(
            [BriefRecord.from_payload(cast(BriefPayload, payload)) for _, _, payload in entries]
        )
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += len(entries)


async def _replay(
    postgres_url: str, records: int, per_entry: int, batch: int, run_id: str, budget_at: float
) -> dict[str, Any]:
    payloads = [_payload(run_id, i) for i in range(records)]
    # On disk, not /dev/shm: the spool's fsync is part of what an append (and a replay's delete) costs.
    spool_dir = Path(tempfile.mkdtemp(prefix="brownout-bench-spool-"))
    store = BriefStore(postgres_url)
    # For what the store does not offer: the server's settings, counting and removing the run's rows.
    engine = create_async_engine(postgres_url)
    out: dict[str, Any] = {"records": records, "batch": batch}
    try:
        await store.init()
        async with engine.connect() as conn:
            out["postgres_fsync"] = (await conn.execute(text("SHOW fsync"))).scalar_one()
            out["postgres_synchronous_commit"] = (
                await conn.execute(text("SHOW synchronous_commit"))
            ).scalar_one()
        spool = Spool(spool_dir / "spool.db", name="bench-spool", max_pending=records + 1)
        async with spool:
            start = time.perf_counter()
            for i in range(0, records, _APPEND_WAVE):
                wave = payloads[i : i + _APPEND_WAVE]
                await asyncio.gather(*(spool.append(p["request_id"], "brief", p) for p in wave))
            out["spool_appends_per_s"] = round(records / (time.perf_counter() - start), 1)
            out["spooled"] = spool.pending

            # 1. The first `per_entry` records one write per transaction, as the server's sink does now.
            single = _Timed(store)
            if per_entry:
                start = time.perf_counter()
                result = await spool.replay(single.one, batch=batch, limit=per_entry)
                elapsed = time.perf_counter() - start
                if not result.ok:
                    raise RuntimeError(f"bench durable: replay failed: {result.error}")
                out["per_entry_records"] = result.replayed
                out["replay_writes_per_s_per_entry"] = round(result.replayed / elapsed, 1)
                out["per_entry_sink_share"] = round(single.seconds / elapsed, 3)

            # 2. The rest by the background replayer with a batch sink: one transaction per batch.
            many = _Timed(store)
            rest = spool.pending
            replayer = SpoolReplayer(spool, single.one, batch_sink=many.many, batch=batch)
            start = time.perf_counter()
            replayer.start()
            try:
                # Idle: the replay run has ended (its counters are final) and nothing is pending.
                await _bounded_wait(lambda: replayer.idle and spool.pending == 0, budget_at, "the replay")
                elapsed = time.perf_counter() - start
            finally:
                await replayer.aclose()
            out["batched_records"] = rest
            out["replay_seconds"] = round(elapsed, 3)
            out["replay_writes_per_s"] = round(rest / elapsed, 1) if rest else None
            out["replay_sink_share"] = round(many.seconds / elapsed, 3) if rest else None
            out["batch_sink_calls"] = many.calls
            stats = spool.stats()
            out["replayed"] = stats.replayed
            out["spool_pending_after"] = stats.pending
            out["dead_lettered"] = stats.dead

        like = f"{run_id}-%"
        count_run = select(func.count()).select_from(briefs).where(briefs.c.request_id.like(like))
        async with engine.begin() as conn:
            out["rows_in_database"] = int((await conn.execute(count_run)).scalar_one())
            await conn.execute(delete(briefs).where(briefs.c.request_id.like(like)))
    finally:
        await store.aclose()
        await engine.dispose()
        shutil.rmtree(spool_dir, ignore_errors=True)
    return out


_ROUNDS = 5
"""Cache reads alternate between the variants in this many rounds, so a busy moment hits them all."""


class _Reads:
    """One cache variant's reads: latencies and misses, gathered over the rounds."""

    def __init__(self, get: Callable[[str], Awaitable[Any]], keys: list[str]) -> None:
        self.get = get
        self.keys = keys
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.misses = 0
        self._next = 0  # the round-robin goes on across rounds: a one-entry front never hits

    async def read(self, count: int, *, record: bool = True) -> None:
        """``count`` reads round-robin over the keys, one at a time."""
        get, keys, nkeys, first = self.get, self.keys, len(self.keys), self._next
        latencies: list[float] = []
        misses = 0
        start = time.perf_counter()
        for i in range(first, first + count):
            t0 = time.perf_counter()
            value = await get(keys[i % nkeys])
            latencies.append(time.perf_counter() - t0)
            misses += value is None
        self._next = (first + count) % nkeys
        if record:
            self.seconds += time.perf_counter() - start
            self.latencies += latencies
            self.misses += misses

    def summary(self) -> dict[str, Any]:
        """Reads/s over the recorded reads, p50 and p99 in microseconds, misses."""
        return {
            "reads_per_s": round(len(self.latencies) / self.seconds, 1),
            "p50_us": round(percentile(self.latencies, 50) * 1e6, 1),
            "p99_us": round(percentile(self.latencies, 99) * 1e6, 1),
            "misses": self.misses,
        }


async def _cache(redis_url: str, reads: int, hot_keys: int, run_id: str) -> dict[str, Any]:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from brownout.policies.cache import Cache, CacheConfig
    from brownout.state.redis import SharedCache

    prefix = f"brownout:bench:{run_id}:"
    keys = [f"hot-{i}" for i in range(hot_keys)]
    client: Redis = Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)
    try:
        writer = SharedCache(client, name="bench-writer", prefix=prefix)
        for i, key in enumerate(keys):
            if not await writer.set(key, _payload(run_id, i)["response"]):
                raise RuntimeError(f"bench durable: Redis at {redis_url} did not take the hot keys")

        # A front of one entry never holds the next key of a round-robin over 2+ keys: every read
        # goes to Redis, through the same SharedCache code path as a front miss.
        one_entry = Cache[str, Any]("bench-redis.local", CacheConfig(max_entries=1))
        through_redis = SharedCache(client, name="bench-redis", prefix=prefix, local=one_entry)
        with_front = SharedCache(client, name="bench-front", prefix=prefix)

        async def raw_get(key: str) -> Any:
            raw = await client.get(prefix + key)
            return None if raw is None else json.loads(raw)

        variants = {
            "raw_redis": (_Reads(raw_get, keys), None),
            "redis": (_Reads(through_redis.get, keys), through_redis),
            "front": (_Reads(with_front.get, keys), with_front),
        }
        for reader, _ in variants.values():
            await reader.read(len(keys), record=False)  # warm-up: connections, the front's first fill
        before = {name: cache.stats() for name, (_, cache) in variants.items() if cache is not None}
        per_round = [reads // _ROUNDS + (i < reads % _ROUNDS) for i in range(_ROUNDS)]
        for count in per_round:
            for reader, _ in variants.values():
                if count:
                    await reader.read(count)
        rows: dict[str, dict[str, Any]] = {}
        for name, (reader, cache) in variants.items():
            row = rows[name] = reader.summary()
            if cache is not None:
                after = cache.stats()
                row["local_hits"] = after.local_hits - before[name].local_hits
                row["redis_hits"] = after.redis_hits - before[name].redis_hits
                row["redis_errors"] = after.redis_errors - before[name].redis_errors
        await client.delete(*(prefix + key for key in keys))
    finally:
        await client.aclose()
    return rows


async def _run_async(
    postgres_url: str,
    redis_url: str,
    sizes: tuple[int, int, int, int, int],
    budget: float,
) -> dict[str, Any]:
    records, per_entry, batch, reads, hot_keys = sizes
    run_id = f"bench-{uuid.uuid4().hex[:10]}"
    budget_at = time.perf_counter() + budget
    async with asyncio.timeout(budget):
        replay = await _replay(postgres_url, records, per_entry, batch, run_id, budget_at)
        cache = await _cache(redis_url, reads, hot_keys, run_id)
    return {"replay": replay, "cache": cache}


def run(
    *,
    records: int = 20_000,
    per_entry: int = 2_000,
    batch: int = 500,
    reads: int = 20_000,
    hot_keys: int = 100,
    postgres_url: str | None = None,
    redis_url: str | None = None,
    durable: bool = True,
    budget: float = 600.0,
) -> dict[str, Any]:
    """Run the benchmark; returns the ``--json`` output.

    ``records`` are spooled; the first ``per_entry`` of them (at most half) are replayed one write per
    transaction, the rest by a :class:`~brownout.durable.spool.SpoolReplayer` with a batch sink, ``batch``
    entries per transaction. ``reads`` cache reads go round-robin over ``hot_keys`` keys. ``durable``
    runs the private PostgreSQL on disk with ``fsync=on`` (else in memory, ``fsync=off``).

    Top-level keys: ``replay_writes_per_s`` (batched), ``replay_writes_per_s_per_entry``,
    ``spool_appends_per_s``, ``cache_reads_per_s_redis`` / ``_front`` / ``_raw_redis`` with their
    ``cache_p50_us_*`` / ``cache_p99_us_*``, the detailed ``replay`` and ``cache`` sections, and
    ``goals``. Raises ``ValueError`` for bad sizes, ``TimeoutError`` when the run exceeds ``budget``
    seconds, and :class:`~brownout.chaos.servers.ServerBinaryMissing` when a private server is needed
    and not installed.
    """
    if records < 2:
        raise ValueError(f"records must be at least 2, got {records}")
    if per_entry < 0:
        raise ValueError(f"per_entry must not be negative, got {per_entry}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if reads < 1:
        raise ValueError(f"reads must be at least 1, got {reads}")
    if hot_keys < 2:
        raise ValueError(
            f"hot_keys must be at least 2 (round-robin defeats a one-entry front), got {hot_keys}"
        )
    if not budget > 0:
        raise ValueError(f"budget must be greater than 0, got {budget}")
    per_entry = min(per_entry, records // 2)
    started = time.perf_counter()
    with _servers(postgres_url, redis_url, durable) as (pg_url, r_url, where):
        sizes = (records, per_entry, batch, reads, hot_keys)
        detail = asyncio.run(_run_async(pg_url, r_url, sizes, budget))
    replay, cache = detail["replay"], detail["cache"]
    replay["postgres"] = where
    out: dict[str, Any] = {
        "replay_writes_per_s": replay["replay_writes_per_s"],
        "replay_writes_per_s_per_entry": replay.get("replay_writes_per_s_per_entry"),
        "spool_appends_per_s": replay["spool_appends_per_s"],
    }
    for name in ("redis", "front", "raw_redis"):
        out[f"cache_reads_per_s_{name}"] = cache[name]["reads_per_s"]
        out[f"cache_p50_us_{name}"] = cache[name]["p50_us"]
        out[f"cache_p99_us_{name}"] = cache[name]["p99_us"]
    stored_once = replay["rows_in_database"] == records == replay["replayed"] and replay["dead_lettered"] == 0
    out |= {
        "records": records,
        "reads": reads,
        "hot_keys": hot_keys,
        "replay": replay,
        "cache": cache,
        "goals": {
            f"replay_writes_per_s >= {GOAL_REPLAY_WRITES_PER_S}": (
                (replay["replay_writes_per_s"] or 0) >= GOAL_REPLAY_WRITES_PER_S
            ),
            "every_record_stored_once": stored_once,
            "front_over_redis_reads": round(cache["front"]["reads_per_s"] / cache["redis"]["reads_per_s"], 1),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    return out
