"""RedisSingleflight against a real (private) redis-server: one computation per key across replicas."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from brownout.chaos.servers import RedisServer
from brownout.errors import ConfigError, DeadlineExceeded
from brownout.policies.deadline import deadline
from brownout.state.singleflight import RedisSingleflight, RemoteComputationFailed
from support.wait import until

Value = dict[str, int]


def lock_key(name: str, key: str) -> str:
    return f"brownout:sf:{{{name}:{key}}}:lock"


async def lock_taken(client: redis.asyncio.Redis, key: str, name: str = "singleflight") -> None:
    """Wait until some replica holds the lock of ``key`` (so which replica computes is known)."""
    await until(
        lambda: client.exists(lock_key(name, key)), f"a replica to take the lock of {key!r}", interval=0.005
    )


@pytest.fixture
async def clients(fresh_redis: RedisServer) -> AsyncIterator[list[redis.asyncio.Redis]]:
    """Two clients of the private Redis: one per simulated replica (the second decodes responses)."""
    made = [
        redis.asyncio.Redis.from_url(fresh_redis.url),
        redis.asyncio.Redis.from_url(fresh_redis.url, decode_responses=True),
    ]
    yield made
    for client in made:
        await client.aclose()


class Counting:
    """A computation that counts its runs, takes ``delay`` seconds (or, given ``until``, runs until that
    event is set) and then returns or raises."""

    def __init__(
        self,
        delay: float = 0.2,
        value: Any = None,
        error: Exception | None = None,
        until: asyncio.Event | None = None,
    ) -> None:
        self.delay = delay
        self.value = {"answer": 42} if value is None else value
        self.error = error
        self.until = until
        self.runs = 0

    async def __call__(self) -> Any:
        self.runs += 1
        if self.until is not None:
            await self.until.wait()
        else:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.value


def replicas(
    clients: list[redis.asyncio.Redis], **kwargs: Any
) -> tuple[RedisSingleflight[Any], RedisSingleflight[Any]]:
    kwargs.setdefault("poll_interval", 0.02)
    return RedisSingleflight(clients[0], **kwargs), RedisSingleflight(clients[1], **kwargs)


async def test_two_replicas_1000_callers_one_computation(clients: list[redis.asyncio.Redis]) -> None:
    a, b = replicas(clients)
    compute = Counting()
    results = await asyncio.gather(*((a if i % 2 else b).do("hot", compute) for i in range(1000)))
    assert compute.runs == 1
    assert results == [{"answer": 42}] * 1000
    assert a.stats.computations + b.stats.computations == 1
    assert a.stats.remote_waits + b.stats.remote_waits == 1
    assert a.stats.calls == b.stats.calls == 500
    assert a.stats.redis_errors == b.stats.redis_errors == 0
    assert a.stats.takeovers == b.stats.takeovers == 0
    # The lock is released once the result is handed over.
    assert await clients[0].exists(lock_key("singleflight", "hot")) == 0


async def test_next_call_computes_again_and_keys_are_independent(
    clients: list[redis.asyncio.Redis],
) -> None:
    a, b = replicas(clients)
    compute = Counting(delay=0.01)
    assert "k" not in a
    running = asyncio.create_task(a.do("k", compute))
    await asyncio.sleep(0)
    assert "k" in a  # this process runs it: its callers join
    assert "k" not in b  # another replica's flight is not known without asking Redis
    assert await running == {"answer": 42}
    assert "k" not in a
    compute.runs = 0
    assert await a.do("k", compute) == {"answer": 42}
    assert await b.do("k", compute) == {"answer": 42}
    assert compute.runs == 2  # no caching: the earlier result is not mistaken for a new one
    other = Counting(delay=0.05)
    await asyncio.gather(a.do("x", other), b.do("y", other), a.do("x", other), b.do("y", other))
    assert other.runs == 2


_PROCESS_SCRIPT = textwrap.dedent(
    """
    import asyncio, dataclasses, json, sys
    import redis.asyncio
    from brownout.state.singleflight import RedisSingleflight

    async def main(url: str, callers: int, processes: int) -> None:
        client = redis.asyncio.Redis.from_url(url)
        flight = RedisSingleflight(client, name="stampede", poll_interval=0.02)

        async def compute():
            await client.incr("computations")
            # Finish only once every other process is waiting on this flight (a caller arriving after
            # the result was handed over would rightly compute again): a condition, not a guess.
            while int(await client.get("joined") or 0) < processes - 1:
                await asyncio.sleep(0.002)
            return {"answer": 42}

        # Barrier: every process starts its callers once all of them are ready.
        await client.incr("ready")
        while int(await client.get("ready")) < processes:
            await asyncio.sleep(0.002)
        calls = asyncio.gather(*(flight.do("hot", compute) for _ in range(callers)))
        while flight.stats.remote_waits == 0 and flight.stats.computations == 0:
            await asyncio.sleep(0.002)
        if flight.stats.remote_waits:  # this process waits on another's computation
            await client.incr("joined")
        results = await calls
        got = sum(1 for result in results if result == {"answer": 42})
        print(json.dumps({"got": got, **dataclasses.asdict(flight.stats)}))
        await client.aclose()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


def test_four_processes_1000_callers_one_computation(fresh_redis: RedisServer, tmp_path: Path) -> None:
    script = tmp_path / "replica.py"
    script.write_text(_PROCESS_SCRIPT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), fresh_redis.url, "250", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert fresh_redis.command("GET", "computations") in (b"1", "1")
    assert [report["got"] for report in reports] == [250] * 4
    assert sum(report["computations"] for report in reports) == 1
    assert sum(report["remote_waits"] for report in reports) == 3
    assert sum(report["redis_errors"] for report in reports) == 0


async def test_error_is_shared_across_replicas(clients: list[redis.asyncio.Redis]) -> None:
    a, b = replicas(clients)
    compute = Counting(error=ValueError("boom"))
    local = [asyncio.ensure_future(a.do("bad", compute)) for _ in range(10)]
    await lock_taken(clients[0], "bad")  # a holds the lock now
    remote = [asyncio.ensure_future(b.do("bad", compute)) for _ in range(10)]
    local_outcomes = await asyncio.gather(*local, return_exceptions=True)
    remote_outcomes = await asyncio.gather(*remote, return_exceptions=True)
    assert compute.runs == 1
    assert all(isinstance(e, ValueError) and str(e) == "boom" for e in local_outcomes)
    for error in remote_outcomes:
        assert isinstance(error, RemoteComputationFailed)
        assert (error.error_type, error.remote_message, error.key) == ("ValueError", "boom", "bad")
    assert b.stats.remote_waits == 1
    assert b.stats.computations == 0


async def test_unencodable_result_reaches_local_callers_and_fails_remote_ones(
    clients: list[redis.asyncio.Redis],
) -> None:
    a, b = replicas(clients)
    compute = Counting(value={1, 2})  # a set: JSON cannot carry it
    local = asyncio.ensure_future(a.do("odd", compute))
    await lock_taken(clients[0], "odd")
    with pytest.raises(RemoteComputationFailed) as caught:
        await b.do("odd", compute)
    assert caught.value.error_type == "TypeError"
    assert await local == {1, 2}
    assert compute.runs == 1


async def test_dead_holder_blocks_until_lock_expiry_then_one_takeover(
    clients: list[redis.asyncio.Redis],
) -> None:
    # A replica died holding the lock: a foreign token that nobody will release, expiring in 1 s.
    await clients[0].set(lock_key("singleflight", "orphan"), "dead-replica", px=1000)
    a, b = replicas(clients, lock_ttl=1.0)
    compute = Counting(delay=0.1)
    results = await asyncio.gather(*((a if i % 2 else b).do("orphan", compute) for i in range(200)))
    assert results == [{"answer": 42}] * 200
    assert compute.runs == 1
    assert a.stats.takeovers + b.stats.takeovers == 1
    assert a.stats.remote_waits == b.stats.remote_waits == 1
    assert a.stats.redis_errors == b.stats.redis_errors == 0


async def test_slow_live_holder_keeps_its_lock(clients: list[redis.asyncio.Redis]) -> None:
    a, b = replicas(clients, lock_ttl=0.3)
    done = asyncio.Event()
    compute = Counting(until=done)  # runs until the lock has outlived its ttl (below)
    holder = [asyncio.ensure_future(a.do("slow", compute)) for _ in range(10)]
    await lock_taken(clients[0], "slow")
    waiters = [asyncio.ensure_future(b.do("slow", compute)) for _ in range(10)]
    # Wait for the watchdog to extend the lock twice (every ttl / 2): by then more than the 0.3 s ttl
    # has passed, so without the extensions the lock would have expired.
    key = lock_key("singleflight", "slow")
    try:
        extensions, last = 0, await clients[0].pttl(key)
        for _ in range(400):
            ttl = await clients[0].pttl(key)
            if ttl > last:
                extensions += 1
            last = ttl
            if extensions == 2:
                break
            await asyncio.sleep(0.005)
        assert extensions == 2
        assert await clients[0].get(key) is not None
    finally:
        done.set()  # the computation ends here, whether or not the lock held
    results = await asyncio.gather(*holder, *waiters)
    assert results == [{"answer": 42}] * 20
    assert compute.runs == 1
    assert a.stats.takeovers == b.stats.takeovers == 0
    assert b.stats.remote_waits == 1


async def test_redis_down_computes_locally(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        flight: RedisSingleflight[Value] = RedisSingleflight(client, redis_backoff=0.0)
        server.stop()
        compute = Counting(delay=0.05)
        results = await asyncio.gather(*(flight.do("k", compute) for _ in range(100)))
        assert results == [{"answer": 42}] * 100
        assert compute.runs == 1  # still coalesced within the process
        assert flight.stats.redis_errors == 1
        # Redis is back: the next call goes through it again (its result lands there).
        server.start()
        assert await flight.do("k", compute) == {"answer": 42}
        assert await client.keys("brownout:sf:*:result:*")
        assert flight.stats.redis_errors == 1
    finally:
        await client.aclose()


async def test_redis_lost_while_waiting_computes_locally(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server()
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        await client.set(lock_key("singleflight", "k"), "other-replica", px=30_000)
        flight: RedisSingleflight[Value] = RedisSingleflight(client, poll_interval=0.02)
        compute = Counting(delay=0.01)
        callers = [asyncio.ensure_future(flight.do("k", compute)) for _ in range(50)]
        await asyncio.sleep(0.1)
        assert compute.runs == 0
        assert flight.stats.remote_waits == 1
        server.stop()
        assert await asyncio.gather(*callers) == [{"answer": 42}] * 50
        assert compute.runs == 1
        assert flight.stats.redis_errors == 1
    finally:
        await client.aclose()


async def test_deadline_bounds_the_wait_but_not_the_flight(clients: list[redis.asyncio.Redis]) -> None:
    lock = lock_key("singleflight", "held")
    await clients[0].set(lock, "busy-replica", px=30_000)
    a, _ = replicas(clients)
    compute = Counting(delay=0.01)
    patient = asyncio.ensure_future(a.do("held", compute))
    with pytest.raises(DeadlineExceeded):
        async with deadline(0.2):
            await a.do("held", compute)
    assert compute.runs == 0
    assert not patient.done()
    # The holder goes away (its lock disappears): the shared flight takes over for the patient caller.
    await clients[0].delete(lock)
    assert await patient == {"answer": 42}
    assert compute.runs == 1
    assert a.stats.takeovers == 1


async def test_an_error_reaches_a_caller_with_a_deadline(clients: list[redis.asyncio.Redis]) -> None:
    a, _ = replicas(clients)
    with pytest.raises(ValueError, match="bad input"):
        async with deadline(5.0):
            await a.do("k", Counting(delay=0.01, error=ValueError("bad input")))
    async with deadline(5.0):
        assert await a.do("k", Counting(delay=0.01)) == {"answer": 42}
    assert repr(a) == "RedisSingleflight('singleflight', in_flight=0)"


def test_invalid_settings_name_the_field() -> None:
    client = redis.asyncio.Redis()
    for field in ("lock_ttl", "result_ttl", "poll_interval"):
        settings: dict[str, Any] = {field: 0}
        with pytest.raises(ConfigError) as caught:
            RedisSingleflight(client, **settings)
        assert caught.value.key == field
    with pytest.raises(ConfigError) as caught:
        RedisSingleflight(client, redis_backoff=-1)
    assert caught.value.key == "redis_backoff"
