"""Event-loop blocking detection (seed 003 §C): request steps and loop ticks over 100 ms, with the route."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI

from brownout.errors import ConfigError
from brownout.events import EventBus, LoopBlocked
from brownout.health.loop import LoopBlockDetector, LoopBlockMiddleware, current_route
from brownout.testing import FakeClock


def app_with(detector: LoopBlockDetector, clock: FakeClock | None = None) -> FastAPI:
    app = FastAPI()
    seen_routes: list[str] = []
    app.state.seen_routes = seen_routes

    @app.get("/items/{item_id}")
    async def item(item_id: int, block: float = 0.0, wait: float = 0.0) -> dict[str, int]:
        seen_routes.append(current_route.get())
        if wait:
            assert clock is not None
            await clock.sleep(wait)  # waiting is not blocking
        if block:
            assert clock is not None
            clock.advance(block)  # the clock moves while this step runs: as if the CPU were busy
        return {"item": item_id}

    @app.get("/busy")
    async def busy() -> dict[str, str]:
        end = time.perf_counter() + 0.15
        while time.perf_counter() < end:  # a real 150 ms busy-wait on the loop, not a sleep
            pass
        return {"ok": "done"}

    app.add_middleware(LoopBlockMiddleware, detector=detector)
    return app


async def test_a_request_step_over_the_threshold_is_reported_with_its_route(clock: FakeClock) -> None:
    bus = EventBus()
    seen: list[LoopBlocked] = []
    bus.subscribe(seen.append, LoopBlocked)
    detector = LoopBlockDetector(clock=clock, events=bus)
    app = app_with(detector, clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.get("/items/1", params={"block": 0.05})).status_code == 200
        assert detector.total == 0
        assert (await http.get("/items/2", params={"block": 0.15})).status_code == 200
        assert (await http.get("/items/3", params={"block": 0.3})).status_code == 200
    assert detector.blocked == {("request", "GET /items/{item_id}"): 2}
    assert detector.max_block == pytest.approx(0.3)
    assert detector.blocked_seconds["request"] == pytest.approx(0.45)
    assert [(e.kind, e.route, round(e.seconds, 3)) for e in seen] == [
        ("request", "GET /items/{item_id}", 0.15),
        ("request", "GET /items/{item_id}", 0.3),
    ]
    assert app.state.seen_routes == ["GET /items/1", "GET /items/2", "GET /items/3"]
    assert detector.in_flight == {}  # every request finished
    status = detector.status()
    assert status["blocked_total"] == 2
    assert status["by_route"] == {"request:GET /items/{item_id}": 2}


async def test_awaiting_a_long_time_is_not_blocking(clock: FakeClock) -> None:
    detector = LoopBlockDetector(clock=clock)
    app = app_with(detector, clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        request = asyncio.create_task(http.get("/items/9", params={"wait": 5.0}))
        await clock.run(0)
        assert detector.in_flight == {"GET /items/9": 1}
        await clock.run(5.0)
        assert (await request).status_code == 200
    assert detector.total == 0  # seed 003's middleware would have called these 5 s "blocking"


async def test_a_late_loop_tick_is_reported_with_the_routes_in_flight(clock: FakeClock) -> None:
    detector = LoopBlockDetector(threshold=0.1, interval=0.025, clock=clock)
    detector.start()
    await clock.run(0.1)
    ticks = detector.ticks
    assert ticks >= 3
    assert detector.total == 0
    detector.in_flight["GET /v1/briefs"] += 1
    clock.advance(0.025 + 0.2)  # the tick due in 25 ms comes 200 ms late
    await clock.run(0)
    assert detector.blocked == {("loop", "GET /v1/briefs"): 1}
    assert detector.recent[-1].seconds == pytest.approx(0.2)
    clock.advance(0.025 + 0.09)  # late, but under the threshold
    await clock.run(0)
    assert detector.total == 1
    # A block a request step already reported is not counted again by the late tick it caused.
    app = app_with(detector, clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.get("/items/4", params={"block": 0.3})).status_code == 200
    await clock.run(0)
    assert detector.blocked == {("loop", "GET /v1/briefs"): 1, ("request", "GET /items/{item_id}"): 1}
    await detector.aclose()


def test_bad_settings_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"loop_block\.threshold"):
        LoopBlockDetector(threshold=0)
    with pytest.raises(ConfigError, match=r"loop_block\.interval"):
        LoopBlockDetector(threshold=0.1, interval=0.2)


async def test_real_blocking_is_detected_with_the_route() -> None:
    """On the real loop and clock: a request busy-waiting 150 ms, then a background task doing the same."""
    detector = LoopBlockDetector()  # the real clock
    detector.start()
    app = app_with(detector)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get("/busy")).status_code == 200
        busy = [r for r in detector.recent if r.route == "GET /busy"]
        assert len(busy) >= 1
        assert busy[0].kind == "request"
        assert busy[0].seconds >= 0.15
        await asyncio.sleep(0.05)
        loop_blocks = detector.blocked[("loop", "")]

        def spin() -> None:
            end = time.perf_counter() + 0.15
            while time.perf_counter() < end:
                pass

        asyncio.get_running_loop().call_soon(spin)  # blocking outside any request
        await asyncio.sleep(0.1)
        assert detector.blocked[("loop", "")] >= loop_blocks + 1
        assert max(r.seconds for r in detector.recent if r.kind == "loop") > 0.1
    finally:
        await detector.aclose()
