"""Scale-out and durability against real servers, under a bounded load (issue 3, item 6).

* two replicas (two ``brownout serve`` processes) on one Redis share one breaker state and run one
  computation per key;
* PostgreSQL stopped and restarted, and a primary lost and its standby promoted, while requests keep
  coming: every acknowledged brief ends in the database exactly once;
* Redis stopped and restarted: requests keep being answered, Redis is used again afterwards.

Load goes to 127.0.0.1 only and is bounded in count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from brownout.chaos.fakellm import FakeLLM
from brownout.chaos.servers import PostgresDatabase, PostgresServer, RedisServer, free_port
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.events import EventBus
from brownout.server.app import create_app
from brownout.server.runtime import Runtime
from support.stack import merge
from support.wait import until


def config_dict(fakes: Mapping[str, FakeLLM], tmp: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Roles on the fakes, no local models, short waits; ``overrides`` on top."""
    ours: dict[str, Any] = {
        "models": {
            "local": {"enabled": False},
            "health_interval": 3600.0,
            "health_timeout": 2.0,
            "roles": {role: {"endpoints": [{"url": fakes[role].url}], "timeout": 5.0} for role in ROLES},
        },
        "json_guard": {"backoff_base": 0.0, "jitter": 0.0},
        "database": {
            "url": f"sqlite+aiosqlite:///{tmp / 'briefs.db'}",
            "spool_path": str(tmp / "spool.db"),
            "write_timeout": 2.0,
            "check_interval": 0.2,
        },
        "events": {"outbox_path": str(tmp / "events.db")},
    }
    return merge(ours, overrides)


@contextlib.asynccontextmanager
async def app_client(config: dict[str, Any]) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    cfg = BrownoutConfig.model_validate(merge(load_config(None, environ={}).model_dump(), config))
    runtime = Runtime(cfg, events=EventBus())
    app = create_app(cfg, runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://brownout", timeout=30.0) as http:
            # The health loop probes every role once at start; let it finish so it cannot race a test.
            await until(
                lambda: runtime.service is not None and len(runtime.service.stats.health) == len(ROLES),
                "the first probes",
                timeout=30.0,
                interval=0.05,
            )
            yield http, runtime


async def drive(
    http: httpx.AsyncClient,
    total: int,
    *,
    concurrency: int = 4,
    on_sent: Callable[[int], object] | None = None,
) -> tuple[list[str], dict[int, int]]:
    """Send ``total`` distinct fast-mode brief requests; returns acknowledged request ids and statuses."""
    acked: list[str] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))
    sent = 0

    async def worker() -> None:
        nonlocal sent
        for i in counter:
            try:
                async with asyncio.timeout(30.0):
                    response = await http.post(
                        "/v1/briefs", json={"text": f"bergamot and cedar no. {i}", "mode": "fast"}
                    )
            except TimeoutError:
                # A hung request fails the test with every task's stack, not a silent 120 s timeout.
                for task in asyncio.all_tasks():
                    task.print_stack(limit=8, file=sys.stderr)
                raise AssertionError(f"request {i} got no answer within 30 s") from None
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                acked.append(response.json()["request_id"])
            else:
                assert response.status_code == 503, response.text
                assert "retry-after" in response.headers
            sent += 1
            if on_sent is not None:
                result = on_sent(sent)
                if asyncio.iscoroutine(result):
                    await result

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return acked, statuses


# -------------------------------------------------------------------------------- PostgreSQL


async def test_postgres_stop_and_restart_under_load_loses_nothing_and_writes_nothing_twice(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    postgres_server: PostgresServer,
    fresh_postgres_db: PostgresDatabase,
) -> None:
    config = config_dict(fakes, tmp_path, {"database": {"url": fresh_postgres_db.url}})
    async with app_client(config) as (http, runtime):

        async def outage(sent: int) -> None:
            if sent == 30:
                await asyncio.to_thread(postgres_server.stop)
            elif sent == 90:
                health = (await http.get("/health")).json()
                assert health["database"]["status"] == "unhealthy"
                assert health["spool"]["pending"] > 0
                await asyncio.to_thread(postgres_server.start)

        acked, statuses = await drive(http, 150, on_sent=outage)
        assert statuses == {200: 150}  # the outage cost no request its answer
        await until(
            lambda: runtime.spool.pending == 0 and runtime.store_ok,
            "the spool to drain",
            timeout=30.0,
            interval=0.05,
        )
        stored = await runtime.store.request_ids()
        assert len(stored) == len(set(stored))
        assert sorted(stored) == sorted(acked)  # every acknowledged write, once; nothing else
        assert runtime.spool.stats().replayed > 0
        assert runtime.spool.stats().dead == 0


async def test_primary_lost_and_standby_promoted_under_load(
    fakes: dict[str, FakeLLM], tmp_path: Path, make_postgres_server: Callable[..., PostgresServer]
) -> None:
    # Synchronous replication: a commit is acknowledged only once the standby has it, so losing the
    # primary cannot lose an acknowledged brief (seed 003, scenario A).
    primary = make_postgres_server()
    primary.execute("CREATE DATABASE app")
    standby = make_postgres_server(standby_of=primary)
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.execute("SELECT pg_reload_conf()")
    hosts = f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
    config = config_dict(
        fakes, tmp_path, {"database": {"url": f"postgresql+asyncpg://{primary.user}@{hosts}/app"}}
    )
    async with app_client(config) as (http, runtime):
        assert runtime.store.writable_host == primary.url_for("app")

        async def switch(sent: int) -> None:
            if sent == 30:
                await asyncio.to_thread(primary.kill)
            elif sent == 80:
                assert runtime.store.writable_host is None  # read-only mode: writes are spooled
                await asyncio.to_thread(standby.promote)

        acked, statuses = await drive(http, 130, on_sent=switch)
        assert statuses == {200: 130}
        await until(
            lambda: runtime.spool.pending == 0 and runtime.store_ok,
            "the spool to drain",
            timeout=30.0,
            interval=0.05,
        )
        assert runtime.store.writable_host == standby.url_for("app")
        health = (await http.get("/health")).json()
        assert health["database"]["failovers"] == 1
        stored = await runtime.store.request_ids()
        assert len(stored) == len(set(stored))
        assert sorted(stored) == sorted(acked)


# -------------------------------------------------------------------------------- Redis


async def test_redis_stop_and_restart_keeps_answering(
    fakes: dict[str, FakeLLM], tmp_path: Path, make_redis_server: Callable[..., RedisServer]
) -> None:
    redis = make_redis_server()
    config = config_dict(fakes, tmp_path, {"redis": {"url": redis.url, "health_interval": 0.2}})
    async with app_client(config) as (http, runtime):
        assert runtime.shared is not None
        first = await http.post("/v1/briefs", json={"text": "vetiver in the rain", "mode": "fast"})
        assert first.status_code == 200
        await asyncio.to_thread(redis.stop)

        async def check(sent: int) -> None:
            if sent == 20:
                health = (await http.get("/health")).json()
                assert health["redis"]["status"] in ("degraded", "fallback")

        _, statuses = await drive(http, 40, on_sent=check)
        assert statuses == {200: 40}
        await until(
            lambda: runtime.shared is not None and runtime.shared.detector.status == "fallback",
            "fallback",
            timeout=30.0,
            interval=0.05,
        )
        # A repeat is still answered from the local front while Redis is down.
        again = await http.post("/v1/briefs", json={"text": "vetiver in the rain", "mode": "fast"})
        assert again.status_code == 200
        assert again.json()["cached"] is True
        await asyncio.to_thread(redis.start)
        await until(
            lambda: runtime.shared is not None and runtime.shared.detector.status == "healthy",
            "recovery",
            timeout=30.0,
            interval=0.05,
        )
        await until(
            lambda: runtime.shared is not None and runtime.shared.breakers.ok,
            "shared breakers",
            timeout=30.0,
            interval=0.05,
        )
        fresh = await http.post("/v1/briefs", json={"text": "iris and suede", "mode": "fast"})
        assert fresh.status_code == 200
        assert (await asyncio.to_thread(redis.command, "DBSIZE")) not in (0, b"0")  # Redis is written again


# -------------------------------------------------------------------------------- two replicas


def start_replica(config: dict[str, Any], tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merge(config, {"server": {"port": port}})))
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 -- closed with the process below
    process = subprocess.Popen(
        [sys.executable, "-m", "brownout", "serve", "--config", str(path), "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    log.close()
    return process, f"http://127.0.0.1:{port}"


async def test_two_replicas_share_one_breaker_state_and_one_computation_per_key(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    make_redis_server: Callable[..., RedisServer],
    fresh_postgres_db: PostgresDatabase,
) -> None:
    redis = make_redis_server()
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for name in ("a", "b"):
            home = tmp_path / name
            home.mkdir()
            config = config_dict(
                fakes,
                home,
                {
                    "redis": {"url": redis.url, "breaker_sync_interval": 0.2},
                    "database": {"url": fresh_postgres_db.url},
                    "circuit_breaker": {"minimum_calls": 4, "window_size": 10, "timeout": 60},
                },
            )
            process, url = start_replica(config, home, name)
            processes.append(process)
            urls.append(url)
        async with httpx.AsyncClient(timeout=30.0) as http:
            for url in urls:
                await until(
                    lambda url=url: _healthy(http, url), f"replica {url}", timeout=60.0, interval=0.05
                )
            a, b = urls
            generator = fakes["qwen"]

            # 1. One computation for 40 callers spread over both replicas.
            generator.set("ok", delay=1.0)
            before = generator.chat_requests
            body = {"text": "one key for everyone: neroli at dawn", "mode": "fast"}
            answers = await asyncio.gather(
                *(http.post(f"{(a, b)[i % 2]}/v1/briefs", json=body) for i in range(40))
            )
            assert [r.status_code for r in answers] == [200] * 40
            assert generator.chat_requests - before == 1
            assert len({json.dumps(r.json()["brief"], sort_keys=True) for r in answers}) == 1

            # 2. The generator dies; replica A's calls open the breaker -- for B as well.
            generator.set("error", status=500)
            for i in range(10):
                await http.post(f"{a}/v1/briefs", json={"text": f"dead generator {i}", "mode": "fast"})
                if await _breaker(http, a) == "open":
                    break
            assert await _breaker(http, a) == "open"
            await until(
                lambda: _breaker_is(http, b, "open"),
                "replica B to see the open breaker",
                timeout=5.0,
                interval=0.05,
            )
            calls = generator.chat_requests
            for i in range(5):
                r = await http.post(
                    f"{b}/v1/briefs", json={"text": f"served without qwen {i}", "mode": "fast"}
                )
                assert r.status_code in (200, 503)
                if r.status_code == 503:
                    assert "retry-after" in r.headers
            assert generator.chat_requests == calls  # B never called the dead model
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


async def _healthy(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


async def _breaker(http: httpx.AsyncClient, url: str) -> str:
    health = (await http.get(f"{url}/health")).json()
    (state,) = health["models"]["qwen"]["breakers"].values()
    return str(state)


async def _breaker_is(http: httpx.AsyncClient, url: str, state: str) -> bool:
    return await _breaker(http, url) == state


# -------------------------------------------------------------------------------- tiered reads


async def test_emergency_reads_are_labelled_with_their_source_and_freshness(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    make_redis_server: Callable[..., RedisServer],
    postgres_server: PostgresServer,
    fresh_postgres_db: PostgresDatabase,
) -> None:
    redis = make_redis_server()
    known = {"text": "amber, smoke and a little leather", "mode": "fast"}
    overrides = {
        "redis": {"url": redis.url, "health_interval": 0.2},
        "database": {"url": fresh_postgres_db.url},
        "circuit_breaker": {"minimum_calls": 2, "window_size": 10, "timeout": 600},
    }
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    # Replica one serves the request in full: the answer goes to Redis and to the database.
    async with app_client(config_dict(fakes, tmp_path / "one", overrides)) as (http, _):
        full = (await http.post("/v1/briefs", json=known)).json()
        assert full["served_mode"] == "fast"
        assert full["degraded"] is False

    # Replica two starts with an empty memory while every model fails.
    for fake in fakes.values():
        fake.set("error")
    async with app_client(config_dict(fakes, tmp_path / "two", overrides)) as (http, runtime):
        # Every model is down: its breaker open (held open, so no half-open probe lets one through
        # while the test runs, however slow the machine).
        for client in runtime.clients.values():
            for breaker in client.breakers.values():
                breaker.force_open()
        assert runtime.service is not None
        assert not any(runtime.service.role_healthy(role) for role in ROLES)

        # Redis answers: the shared cache serves the full answer itself (real time).
        shared = (await http.post("/v1/briefs", json=known)).json()
        assert shared["cached"] is True
        assert shared["brief"] == full["brief"]
        runtime.service.cache.clear()
        assert runtime.edge is not None
        runtime.edge.clear()

        # Redis down: the database has the last full answer (stale), labelled with why.
        await asyncio.to_thread(redis.stop)
        stale = (await http.post("/v1/briefs", json=known)).json()
        assert stale["served_mode"] == "emergency"
        assert stale["brief"] == full["brief"]
        assert stale["freshness"]["source"] == "database"
        assert stale["freshness"]["freshness"] == "stale"
        assert "redis" in stale["freshness"]["fallback_reason"]

        # The database down too: the value this process last read (very stale).
        await asyncio.to_thread(postgres_server.stop)
        try:
            very = (await http.post("/v1/briefs", json=known)).json()
            assert very["brief"] == full["brief"]
            assert very["freshness"]["source"] == "memory"
            assert very["freshness"]["freshness"] == "very_stale"
            # Never seen anywhere: the template, flagged low confidence.
            new = (await http.post("/v1/briefs", json={"text": "never asked before", "mode": "fast"})).json()
            assert new["served_mode"] == "emergency"
            assert new["freshness"]["source"] == "default"
            assert new["freshness"]["confidence"] == "low"
            assert new["reliability"] == "low"
        finally:
            await asyncio.to_thread(postgres_server.start)


async def test_health_checks_are_shared_by_replicas(
    fakes: dict[str, FakeLLM], tmp_path: Path, make_redis_server: Callable[..., RedisServer]
) -> None:
    redis = make_redis_server()
    overrides = {"redis": {"url": redis.url}, "models": {"health_interval": 30.0}}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    async with (
        app_client(config_dict(fakes, tmp_path / "one", overrides)) as (_, one),
        app_client(config_dict(fakes, tmp_path / "two", overrides)) as (_, two),
    ):
        # Both replicas started, and each ran its first round of probes; now one more round each,
        # inside the same interval: one replica probes, the other takes its results from Redis.
        redis.command("DEL", *[f"brownout:health:{role}:lock" for role in ROLES])
        before = {role: fake.chat_requests for role, fake in fakes.items()}
        await one.probe_all()
        await two.probe_all()
        assert {role: fake.chat_requests - before[role] for role, fake in fakes.items()} == dict.fromkeys(
            ROLES, 1
        )
        assert two.service is not None
        assert all(two.service.role_healthy(role) for role in ROLES)
        # A model fails: the replica that probes next sees it, and so does the other one.
        fakes["llama"].set("error")
        redis.command("DEL", *[f"brownout:health:{role}:lock" for role in ROLES])
        await two.probe_all()
        await one.probe_all()
        assert one.service is not None
        assert not one.service.role_healthy("llama")
        assert one.service.stats.health["llama"].healthy is False
        # Redis gone: each replica probes by itself again.
        redis.stop()
        before = fakes["qwen"].chat_requests
        await one.probe_all()
        await two.probe_all()
        assert fakes["qwen"].chat_requests - before == 2


async def test_cache_disabled_computes_every_request(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with app_client(config_dict(fakes, tmp_path, {"cache": {"enabled": False}})) as (http, _):
        before = fakes["qwen"].chat_requests
        body = {"text": "the same request twice", "mode": "fast"}
        first = (await http.post("/v1/briefs", json=body)).json()
        second = (await http.post("/v1/briefs", json=body)).json()
        assert first["cached"] is False
        assert second["cached"] is False
        assert fakes["qwen"].chat_requests - before == 2
