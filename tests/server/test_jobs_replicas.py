"""Jobs on several replicas (issue 18): two ``brownout serve`` processes on one private Redis and one
PostgreSQL share a job's items through the Redis stream; the one holding the job is killed with
SIGKILL mid-job and the other finishes it, taking over the dead one's items after the lease, every
item stored once. In one process: Redis stopped mid-job (the job keeps running here, nothing lost),
the models down mid-job (the rest in mock mode, flagged), a cancelled job that stops at once on every
replica, and the configuration rule (sharing needs Redis and PostgreSQL, or the server refuses to start).

Models are :class:`~brownout.chaos.fakellm.FakeLLM` servers on 127.0.0.1 answering after a short
delay, so jobs are still running when the faults come.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from brownout.bench.jobs import Replica, metric, replica_config
from brownout.chaos.fakellm import FakeLLM
from brownout.chaos.servers import PostgresDatabase, RedisServer
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.durable.job_queue import RedisItemQueue
from brownout.durable.jobs import JobStore
from brownout.durable.store import BriefStore
from brownout.events import EventBus
from brownout.server.app import create_app
from brownout.server.runtime import Runtime
from support.stack import distinct_text, merge
from support.wait import until

LEASE = 2.0


@pytest.fixture(autouse=True)
async def _report_a_hang() -> AsyncIterator[None]:
    """A test here still running after 100 s (pytest stops it at 120) prints where every task of its
    event loop waits: twice a test of this file hung with the loop idle, and the threads' stacks
    that pytest prints said nothing about which await never returned."""

    def report() -> None:
        print("---- a test of test_jobs_replicas is hanging; every task's stack:", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)

    # A timer, not a waiting task: it fires only if the test is still running at 100 s.
    timer = asyncio.get_running_loop().call_later(100.0, report)
    yield
    timer.cancel()


@pytest.fixture
async def slow_fakes() -> AsyncIterator[dict[str, FakeLLM]]:
    """One fake model per role, each answering after 0.15 s."""
    started: dict[str, FakeLLM] = {}
    try:
        for role in ROLES:
            fake = FakeLLM(model=role, delay=0.15)
            await fake.start()
            started[role] = fake
        yield started
    finally:
        await asyncio.gather(*(fake.stop() for fake in started.values()))


def _items(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"text": distinct_text(start + i), "mode": "fast"} for i in range(n)]


@contextlib.asynccontextmanager
async def _jobs_db(url: str) -> AsyncIterator[JobStore]:
    store = BriefStore(url)
    try:
        yield JobStore(store)
    finally:
        await store.aclose()


# -------------------------------------------------------------------------------- two processes


async def test_two_replicas_share_a_job_and_the_live_one_finishes_it_after_a_kill_9(
    slow_fakes: dict[str, FakeLLM],
    tmp_path: Path,
    make_redis_server: Callable[..., RedisServer],
    fresh_postgres_db: PostgresDatabase,
) -> None:
    redis = make_redis_server()
    urls = {role: fake.url for role, fake in slow_fakes.items()}
    replicas = [
        Replica(
            tmp_path / name,
            replica_config(
                tmp_path / name,
                redis_url=redis.url,
                database_url=fresh_postgres_db.url,
                model_urls=urls,
                lease=LEASE,
            ),
        )
        for name in ("a", "b")
    ]
    total = 40
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        a, b = replicas
        async with httpx.AsyncClient(timeout=10.0) as http, _jobs_db(fresh_postgres_db.url) as jobs:
            response = await http.post(f"{a.url}/v1/jobs", json={"type": "briefs", "items": _items(total)})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            # The job is visible and readable on the replica it was not submitted to.
            assert (await http.get(f"{b.url}/v1/jobs/{job_id}")).status_code == 200

            async def both_at_work() -> bool:
                texts = [(await http.get(f"{r.url}/metrics")).text for r in replicas]
                job = await jobs.get(job_id)
                took = [metric(t, "brownout_jobs_claims_total", {"what": "item"}) for t in texts]
                return job is not None and min(took) >= 2 and job.done >= 6

            await until(both_at_work, "both replicas to run the job's items", timeout=60.0, interval=0.05)
            job = await jobs.get(job_id)
            assert job is not None
            assert job.owner is not None
            victim, survivor = (a, b) if str(a.home) in job.owner else (b, a)
            assert job.done < total, "the kill came too late to prove anything"
            await victim.kill()
            killed = time.monotonic()

            async def reclaimed() -> bool:
                text = (await http.get(f"{survivor.url}/metrics")).text
                return metric(text, "brownout_jobs_reclaims_total", {"what": "item"}) > 0

            # The dead replica's items (it had some in flight) move to the live one within the lease.
            await until(
                reclaimed, "the dead replica's items to be taken over", timeout=LEASE + 5.0, interval=0.05
            )
            assert time.monotonic() - killed <= LEASE + 3.0

            async def ended() -> bool:
                row = await jobs.get(job_id)
                return row is not None and row.state not in ("queued", "running")

            await until(ended, "the live replica to finish the job", timeout=60.0, interval=0.1)
            view = (await http.get(f"{survivor.url}/v1/jobs/{job_id}", params={"limit": 1000})).json()
            assert view["state"] == "succeeded", view["reason"]
            assert view["progress"] == {"done": total, "failed": 0, "total": total, "mock": 0, "pending": 0}
            assert await jobs.item_counts(job_id) == {"succeeded": total}
            assert len({i["result"]["request_id"] for i in view["items"]}) == total
            text = (await http.get(f"{survivor.url}/metrics")).text
            assert metric(text, "brownout_jobs_reclaims_total", {"what": "job"}) == 1
            assert metric(text, "brownout_jobs_shared") == 1
    finally:
        await asyncio.gather(*(r.stop() for r in replicas))


# -------------------------------------------------------------------------------- in one process


def _config(
    fakes: dict[str, FakeLLM], tmp: Path, redis_url: str, database_url: str, **jobs: Any
) -> BrownoutConfig:
    ours = replica_config(
        tmp,
        redis_url=redis_url,
        database_url=database_url,
        model_urls={role: fake.url for role, fake in fakes.items()},
        lease=LEASE,
    )
    ours = merge(ours, {"redis": {"health_interval": 0.2}, "jobs": jobs})
    return BrownoutConfig.model_validate(merge(load_config(None, environ={}).model_dump(), ours))


@contextlib.asynccontextmanager
async def _app(cfg: BrownoutConfig) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    runtime = Runtime(cfg, events=EventBus())
    app = create_app(cfg, runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://brownout", timeout=30.0) as http:
            yield http, runtime


async def _job(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    return dict((await http.get(f"/v1/jobs/{job_id}", params={"limit": 1000})).json())


async def _wait_end(http: httpx.AsyncClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    async def ended() -> bool:
        return (await _job(http, job_id))["state"] not in ("queued", "running")

    await until(ended, f"job {job_id} to end", timeout=timeout, interval=0.05)
    return await _job(http, job_id)


async def test_redis_down_mid_job_the_holder_runs_the_rest_and_nothing_is_lost(
    slow_fakes: dict[str, FakeLLM],
    tmp_path: Path,
    make_redis_server: Callable[..., RedisServer],
    fresh_postgres_db: PostgresDatabase,
) -> None:
    redis = make_redis_server()
    total = 30
    cfg = _config(slow_fakes, tmp_path, redis.url, fresh_postgres_db.url)
    async with _app(cfg) as (http, runtime):
        assert runtime.jobs.queue is not None
        response = await http.post("/v1/jobs", json={"type": "briefs", "items": _items(total)})
        job_id = response.json()["id"]
        await until(lambda: runtime.jobs.claimed["item"] >= 4, "items from the stream", timeout=30.0)
        await asyncio.to_thread(redis.stop)
        job = await _wait_end(http, job_id)
        assert job["state"] == "succeeded", job["reason"]
        assert job["progress"]["done"] == total
        assert runtime.jobs.queue_error is not None  # it did run without the stream
        assert runtime.jobs.claimed["item"] < total  # some items ran here from the database
        async with _jobs_db(fresh_postgres_db.url) as jobs:
            assert await jobs.item_counts(job_id) == {"succeeded": total}
        # Redis back (empty): the next job goes through the stream again.
        await asyncio.to_thread(redis.start)
        again = (await http.post("/v1/jobs", json={"type": "briefs", "items": _items(4, 100)})).json()
        before = runtime.jobs.claimed["item"]
        assert (await _wait_end(http, again["id"]))["state"] == "succeeded"
        assert runtime.jobs.claimed["item"] >= before + 4
        assert runtime.jobs.shared


async def test_models_down_mid_job_the_rest_is_mock_and_flagged(
    slow_fakes: dict[str, FakeLLM],
    tmp_path: Path,
    make_redis_server: Callable[..., RedisServer],
    fresh_postgres_db: PostgresDatabase,
) -> None:
    redis = make_redis_server()
    total = 20
    cfg = _config(slow_fakes, tmp_path, redis.url, fresh_postgres_db.url, max_attempts=1)
    async with _app(cfg) as (http, runtime):
        job_id = (await http.post("/v1/jobs", json={"type": "briefs", "items": _items(total)})).json()["id"]

        async def some_done() -> bool:
            return bool((await _job(http, job_id))["progress"]["done"] >= 4)

        await until(some_done, "a few items by the models", timeout=30.0, interval=0.02)
        for fake in slow_fakes.values():
            fake.set("error", status=500)
        job = await _wait_end(http, job_id)
        assert job["state"] == "succeeded", job["reason"]
        mock = [i for i in job["items"] if i["mock"]]
        real = [i for i in job["items"] if not i["mock"]]
        assert len(mock) >= 1
        assert len(real) >= 4
        assert job["progress"]["mock"] == len(mock)
        assert f"{len(mock)} in mock mode" in job["reason"]
        assert all(i["served_by"] == "model:qwen" for i in real)
        assert all(i["served_by"] != "model:qwen" for i in mock)
        assert runtime.jobs.claimed["item"] >= 1


async def test_a_cancelled_job_stops_within_a_second_on_every_replica(
    slow_fakes: dict[str, FakeLLM],
    tmp_path: Path,
    make_redis_server: Callable[..., RedisServer],
    fresh_postgres_db: PostgresDatabase,
) -> None:
    redis = make_redis_server()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a = _config(slow_fakes, tmp_path / "a", redis.url, fresh_postgres_db.url)
    cfg_b = _config(slow_fakes, tmp_path / "b", redis.url, fresh_postgres_db.url)
    async with _app(cfg_a) as (a, runtime_a), _app(cfg_b) as (_, runtime_b):
        job_id = (await a.post("/v1/jobs", json={"type": "briefs", "items": _items(60)})).json()["id"]
        await until(
            lambda: runtime_a.jobs.claimed["item"] >= 2 and runtime_b.jobs.claimed["item"] >= 2,
            "both replicas at work",
            timeout=30.0,
        )
        assert (await a.post(f"/v1/jobs/{job_id}/cancel")).json()["state"] == "cancelled"
        # Within a second neither replica runs an item of it any more...
        await until(
            lambda: runtime_a.jobs.in_flight == 0 and runtime_b.jobs.in_flight == 0,
            "both replicas to stop the job's items",
            timeout=1.0,
            interval=0.01,
        )
        async with _jobs_db(fresh_postgres_db.url) as jobs:
            counts = await jobs.item_counts(job_id)
        # ... and nothing is left that could start: every item has an outcome or was cancelled.
        assert counts.get("pending", 0) == 0
        assert counts.get("running", 0) == 0
        assert counts["cancelled"] > 30


def test_sharing_jobs_needs_redis_and_postgresql_or_the_server_does_not_start(tmp_path: Path) -> None:
    base = load_config(None, environ={}).model_dump()
    sqlite = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    with pytest.raises(ValidationError, match=r"needs redis\.url and a PostgreSQL database\.url"):
        BrownoutConfig.model_validate(merge(base, {"jobs": {"distribute": "redis"}}))
    with pytest.raises(ValidationError, match=r"needs a PostgreSQL database\.url"):
        BrownoutConfig.model_validate(
            merge(base, {"jobs": {"distribute": "redis"}, "redis": {"url": "redis://127.0.0.1:1/0"}})
        )
    pg = "postgresql+asyncpg://u@127.0.0.1:1/db"
    shared = BrownoutConfig.model_validate(
        merge(base, {"redis": {"url": "redis://127.0.0.1:1/0"}, "database": {"url": pg}})
    )
    assert shared.jobs_distributed  # auto: both there
    alone = BrownoutConfig.model_validate(
        merge(base, {"redis": {"url": "redis://127.0.0.1:1/0"}, "database": {"url": sqlite}})
    )
    assert not alone.jobs_distributed  # auto with SQLite: each replica its own jobs (and a warning)
    local = BrownoutConfig.model_validate(
        merge(base, {"redis": {"url": "redis://1"}, "database": {"url": pg}, "jobs": {"distribute": "local"}})
    )
    assert not local.jobs_distributed


async def test_the_stream_delivers_once_reclaims_idle_entries_and_survives_an_empty_restart(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    redis = make_redis_server()
    a = RedisItemQueue.from_url(redis.url, prefix="t", consumer="a", block=0.1)
    b = RedisItemQueue.from_url(redis.url, prefix="t", consumer="b", block=0.1)
    try:
        assert await a.dispatch("j", [0, 1, 2, 3], stamp=1.0) == 4
        assert await a.dispatch("j", [0, 1, 2, 3], stamp=2.0) is None  # once per job
        first = await a.read(2, block=0.1)
        second = await b.read(5, block=0.1)
        assert sorted(d.index for d in first + second) == [0, 1, 2, 3]  # each entry to one consumer
        assert await a.own_pending(10) == first  # a returning "a" finds what it held
        assert await b.reclaim(5, idle=60.0) == []  # a heartbeat keeps them; nothing idle yet
        await a.let_go([first[0].entry], lease=0.5)  # a clean stop hands one back at once
        assert await b.reclaim(5, idle=0.5) == [first[0]]
        await b.ack([d.entry for d in second] + [first[0].entry])
        assert await a.backlog() == (1, 1)
        assert await a.dispatched("j")
        await asyncio.to_thread(redis.restart)
        assert not await a.dispatched("j")  # came back empty: the holder puts the open items in again
        assert await a.read(1, block=0.1) == []  # the group is made again, no error
        assert await a.dispatch("j", [3], stamp=3.0) == 1
        (again,) = await b.read(1, block=0.1)
        assert again.index == 3
    finally:
        await a.aclose()
        await b.aclose()
