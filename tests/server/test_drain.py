"""Graceful drain on SIGTERM/SIGINT (brownout.server.drain): no new work, in-flight requests finish
within ``server.drain_timeout``, the rest are answered 503 + Retry-After -- never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, load_config
from brownout.llm.local import free_port
from brownout.server.drain import Drain, DrainMiddleware
from brownout.testing import FakeClock
from support.wait import until

# ---------------------------------------------------------------- the middleware, in one process


class _App:
    """An ASGI app whose ``/slow`` answers once ``release`` is set; ``/fast`` and ``/health`` at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/slow":
            self.entered += 1
            await self.release.wait()
        body = b'{"ok": true}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def _client(drain: Drain, app: _App) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=DrainMiddleware(app, drain))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def _assert_draining_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "draining"
    assert error["retry_after"] == int(response.headers["retry-after"])


async def test_new_requests_are_refused_while_draining_and_health_paths_still_answer() -> None:
    clock = FakeClock(autojump=False)
    drain, app = Drain(clock=clock, retry_after=7), _App()
    async with _client(drain, app) as client:
        assert (await client.get("/fast")).status_code == 200
        task = asyncio.create_task(drain.drain(30.0))
        await until(lambda: drain.state != "serving", "the drain to begin", interval=0)
        refused = await client.get("/fast")
        _assert_draining_503(refused)
        assert refused.headers["retry-after"] == "7"
        assert refused.headers["connection"] == "close"
        ok = await client.get("/health")  # the route itself says "draining" (see the app's tests)
        assert ok.status_code == 200
        assert ok.headers["connection"] == "close"
        assert drain.refused == 1
        assert await task == 0
        assert drain.state == "stopped"
        _assert_draining_503(await client.get("/slow"))
        assert app.entered == 0


async def test_in_flight_requests_finish_within_the_drain_time() -> None:
    clock = FakeClock()
    drain, app = Drain(clock=clock), _App()
    async with _client(drain, app) as client:
        requests = [asyncio.create_task(client.get("/slow")) for _ in range(5)]
        await until(lambda: app.entered == 5, "five requests in flight", interval=0)
        assert drain.in_flight == 5
        task = asyncio.create_task(drain.drain(60.0))
        await until(lambda: drain.state == "draining", "the drain to begin", interval=0)
        clock.advance(59.0)  # not over yet: the drain still waits for them
        await asyncio.sleep(0)
        assert not task.done()
        app.release.set()
        answers = await asyncio.gather(*requests)
        assert [r.status_code for r in answers] == [200] * 5
        assert await task == 0
        assert drain.cut_short == 0


async def test_requests_left_when_the_drain_time_runs_out_get_503_json() -> None:
    clock = FakeClock()
    drain, app = Drain(clock=clock, retry_after=3), _App()
    async with _client(drain, app) as client:
        requests = [asyncio.create_task(client.get("/slow")) for _ in range(4)]
        await until(lambda: app.entered == 4, "four requests in flight", interval=0)
        task = asyncio.create_task(drain.drain(10.0))
        await until(lambda: drain.state == "draining" and bool(clock.sleeps), "the drain to wait", interval=0)
        clock.advance(10.0)
        answers = await asyncio.gather(*requests)
        for response in answers:
            _assert_draining_503(response)
        assert await task == 4
        assert drain.cut_short == 4
        assert drain.in_flight == 0


class _TimedApp:
    """``/work?seconds=N`` answers after N seconds of the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seconds = float(scope["query_string"].decode().partition("=")[2] or 0)
        await self.clock.sleep(seconds)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    durations=st.lists(st.integers(min_value=0, max_value=20), max_size=12),
    late=st.integers(min_value=0, max_value=4),
    timeout=st.integers(min_value=0, max_value=20),
)
async def test_every_request_gets_its_answer_or_a_503_never_anything_else(
    durations: list[int], late: int, timeout: int
) -> None:
    """Whatever the mix: a request in flight at the signal is answered if it finishes within the drain
    time, else 503; a request that arrives during the drain is refused 503. Nothing else, none lost."""
    clock = FakeClock()
    drain = Drain(clock=clock)
    app = DrainMiddleware(_TimedApp(clock), drain)
    limit = timeout + 0.5  # never a tie between a request's end and the drain's
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        flying = [asyncio.create_task(client.get(f"/work?seconds={d}")) for d in durations]
        await until(lambda: drain.in_flight == len(durations), "every request in flight", interval=0)
        task = asyncio.create_task(drain.drain(limit))
        await until(lambda: drain.state != "serving", "the drain to begin", interval=0)
        refused = [await client.get("/work?seconds=0") for _ in range(late)]
        await until(lambda: limit in clock.sleeps, "the drain to wait", interval=0)
        # Half a second at a time: the requests end on whole seconds, the drain time half-way between.
        for _ in range(2 * timeout + 4):
            clock.advance(0.5)
            for _ in range(50):  # let every task woken by this step run to its next wait
                await asyncio.sleep(0)
        answers = await asyncio.gather(*flying)
        cut = await task
    assert [r.status_code for r in answers] == [200 if d < limit else 503 for d in durations]
    assert cut == sum(d > limit for d in durations)
    for response in [*refused, *(r for r in answers if r.status_code == 503)]:
        _assert_draining_503(response)
    assert drain.refused == late
    assert drain.in_flight == 0


def test_default_drain_time_is_the_longest_request_deadline() -> None:
    defaults = load_config(None, environ={})
    # The embedded model's gateway group: 120 s without a byte x 1 attempt, over a brief's 60 s.
    assert defaults.drain_seconds == 120.0
    no_local = load_config(
        None,
        environ={"BROWNOUT__GATEWAY__LOCAL__ENABLED": "false", "BROWNOUT__SERVER__REQUEST_TIMEOUT": "45"},
    )
    assert no_local.drain_seconds == 45.0
    explicit = load_config(None, environ={"BROWNOUT__SERVER__DRAIN_TIMEOUT": "7.5"})
    assert explicit.drain_seconds == 7.5


# ------------------------------------------------- a real `brownout serve` under SIGTERM, end to end

ANSWER_SECONDS = 3.0
IN_FLIGHT = 20


@pytest.fixture
async def slow_fakes() -> AsyncIterator[dict[str, FakeLLM]]:
    """One fake model per role, each answering after ANSWER_SECONDS."""
    started: dict[str, FakeLLM] = {}
    try:
        for role in ROLES:
            fake = FakeLLM(model=role, delay=ANSWER_SECONDS)
            await fake.start()
            started[role] = fake
        yield started
    finally:
        await asyncio.gather(*(fake.stop() for fake in started.values()))


@contextlib.asynccontextmanager
async def _serve(
    tmp_path: Path, fakes: dict[str, FakeLLM], server: dict[str, Any]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = free_port()
    config = {
        "server": {"port": port, **server},
        "models": {
            "local": {"enabled": False},
            "health_interval": 3600.0,
            "roles": {
                # Every brief at its model at once: the drain is under test, not the limiter's slow
                # start, which would take the 20 briefs a few at a time.
                role: {
                    "endpoints": [{"url": fake.url}],
                    "timeout": 20.0,
                    "limiter": {"initial_limit": IN_FLIGHT, "min_limit": IN_FLIGHT},
                }
                for role, fake in fakes.items()
            },
        },
        "queue": {"max_concurrent": 32},
        "loop_block": {"enabled": False},
        "resources": {"enabled": False},
        # Every brief waits for its (slow, fake) model: the drain is under test, not load shedding,
        # which would answer the later ones from the rules at once.
        "dimmer": {"shed_late": False},
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "brownout",
            "serve",
            "--config",
            str(tmp_path / "c.yaml"),
            stdout=log,
            stderr=log,
        )
        try:
            async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
                for _ in range(300):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get("/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(log_path.read_text())
            yield proc, url
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _sse(url: str, opened: asyncio.Event) -> int:
    """Read one live stream to its end; returns the messages seen."""
    messages = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=30.0) as http,
        http.stream("GET", "/api/v1/events") as response,
    ):
        assert response.status_code == 200
        opened.set()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                messages += 1
    return messages


async def _sigterm_under_load(
    tmp_path: Path, fakes: dict[str, FakeLLM], server: dict[str, Any], sig: int = signal.SIGTERM
) -> tuple[list[httpx.Response], list[httpx.Response], int, str]:
    """20 briefs in flight and 2 SSE clients, then SIGTERM: (in-flight answers, answers to requests
    sent after the signal, exit status, log)."""
    async with _serve(tmp_path, fakes, server) as (proc, url):
        limits = httpx.Limits(max_connections=IN_FLIGHT + 5)
        async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as http:
            opened = [asyncio.Event(), asyncio.Event()]
            streams = [asyncio.create_task(_sse(url, e)) for e in opened]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 10)
            before = sum(f.chat_requests for f in fakes.values())
            briefs = [
                asyncio.create_task(
                    http.post("/v1/briefs", json={"text": f"rose and oud, take {i}", "mode": "fast"})
                )
                for i in range(IN_FLIGHT)
            ]
            # Every brief is in flight in the server before the signal: at its model, or waiting for
            # one in the model's concurrency limiter (which starts below 20 and adapts).
            for _ in range(200):
                health = (await http.get("/health")).json()
                at_models = sum(f.chat_requests for f in fakes.values()) - before
                if health["in_flight"] + health["queue_size"] >= IN_FLIGHT and at_models > 0:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the briefs never reached the server")
            proc.send_signal(sig)
            await asyncio.sleep(0.3)
            after: list[httpx.Response] = []
            async with httpx.AsyncClient(base_url=url, timeout=10.0) as late:
                after.append(
                    await late.post("/v1/briefs", json={"text": "sent after the signal", "mode": "fast"})
                )
                after.append(await late.post("/v1/chat/completions", json={"model": "x", "messages": []}))
                after.append(await late.get("/health"))
            answers = list(await asyncio.gather(*briefs))
            # The live streams were ended by the signal, cleanly.
            await asyncio.wait_for(asyncio.gather(*streams), 10)
        status = await asyncio.wait_for(proc.wait(), 30)
    return answers, after, status, (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_lets_in_flight_briefs_finish_and_refuses_new_ones(
    slow_fakes: dict[str, FakeLLM], tmp_path: Path, sig: signal.Signals
) -> None:
    answers, after, status, log = await _sigterm_under_load(tmp_path, slow_fakes, {}, sig)
    assert [r.status_code for r in answers] == [200] * IN_FLIGHT, log
    assert all(r.json()["served_mode"] == "fast" for r in answers)
    brief, chat, health = after
    _assert_draining_503(brief)
    _assert_draining_503(chat)
    assert health.status_code == 503
    assert health.json()["status"] == "draining"
    assert health.headers["retry-after"]
    assert status == 0, log
    assert "Internal Server Error" not in log, log
    assert "Traceback" not in log, log


async def test_sigterm_with_a_short_drain_answers_the_leftovers_503_never_500(
    slow_fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    answers, after, status, log = await _sigterm_under_load(tmp_path, slow_fakes, {"drain_timeout": 0.5})
    assert {r.status_code for r in answers} == {503}, log
    for response in answers:
        _assert_draining_503(response)
    _assert_draining_503(after[0])
    assert status == 0, log
    assert "Internal Server Error" not in log, log
