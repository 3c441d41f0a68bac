"""The dashboard charts' history: quantiles from buckets, rates from counters, a bounded ring of points,
the points on the live channel for the clients that asked, and what the server's counters give."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from brownout.chaos.fakellm import FakeLLM
from brownout.config import BrownoutConfig, load_config
from brownout.errors import ConfigError
from brownout.gateway.stats import Histogram
from brownout.server.history import (
    ANSWER_KINDS,
    LATENCY_BUCKETS,
    LiveHistory,
    Reading,
    new_latency_histogram,
    quantile,
    read_parts,
)
from brownout.server.live import LiveClient, LiveHub
from brownout.testing import FakeClock
from support.live import live_stack
from support.stack import serve
from support.wait import until


def reading(answers: dict[str, int] | None = None, latency: list[float] = (), **fields: Any) -> Reading:
    hist = new_latency_histogram()
    for seconds in latency:
        hist.observe(seconds)
    return Reading(answers=answers or {}, latency=list(hist.counts), **fields)


class Script:
    """Readings handed out in order (None while "the server starts")."""

    def __init__(self, *readings: Reading | None) -> None:
        self.readings: Iterator[Reading | None] = iter(readings)

    def __call__(self) -> Reading | None:
        return next(self.readings)


# ------------------------------------------------------------------------------------ quantiles


def test_quantile_interpolates_within_the_bucket_as_prometheus_does() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(1.5)
    assert quantile(0.95, bounds, [0, 10, 0, 0]) == pytest.approx(1.95)
    # Half the answers under 1 s, half between 2 and 4: the median is the top of the first bucket.
    assert quantile(0.5, bounds, [5, 0, 5, 0]) == pytest.approx(1.0)
    assert quantile(0.75, bounds, [5, 0, 5, 0]) == pytest.approx(3.0)
    # Beyond the last bound: the last bound (Prometheus says the same); nothing counted: no quantile.
    assert quantile(0.95, bounds, [0, 0, 0, 3]) == 4.0
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None


@given(
    st.lists(st.floats(min_value=0.0, max_value=100.0, allow_nan=False), min_size=1, max_size=200),
    st.sampled_from([0.5, 0.9, 0.95, 0.99]),
)
def test_quantile_lies_in_the_bucket_of_the_true_quantile(samples: list[float], q: float) -> None:
    hist = Histogram(LATENCY_BUCKETS)
    for s in samples:
        hist.observe(s)
    estimate = quantile(q, LATENCY_BUCKETS, hist.counts)
    assert estimate is not None
    # The sample at rank ceil(q * n) is the true quantile; the estimate is within its bucket.
    true = sorted(samples)[max(0, math.ceil(q * len(samples)) - 1)]
    edges = (0.0, *LATENCY_BUCKETS)
    index = min(sum(1 for b in LATENCY_BUCKETS if b < true), len(LATENCY_BUCKETS) - 1)
    assert edges[index] <= estimate <= LATENCY_BUCKETS[index]


# ------------------------------------------------------------------------------------ the ring of points


def test_points_are_rates_between_readings_and_the_ring_is_bounded(clock: FakeClock) -> None:
    wall = FakeClock(start=1_700_000_000.0)
    published: list[dict[str, Any]] = []
    script = Script(
        None,  # starting: no reading, no point
        reading({"full": 10, "rejected": 1}, [0.1] * 10, gateway={"chat/served": 4}),
        reading(
            {"full": 30, "downshifted": 4, "rejected": 1},
            [0.1] * 10 + [0.2] * 20 + [3.0] * 4,
            breakers={"llama": "open"},
            queue=7,
            in_flight=2,
            dimmer=1,
            dimmer_value=0.31234,
            spool=3,
            gateway={"chat/served": 14, "chat/unavailable": 2},
        ),
        reading({"full": 2}, []),  # counters reset (a part restarted): counted from zero
        *[reading({"full": 2}, []) for _ in range(10)],
    )
    history = LiveHistory(
        script, interval=2.0, window=10.0, clock=clock, wall_clock=wall, publish=published.append
    )
    assert history.sample() is None
    clock.advance(2.0)
    assert history.sample() is None  # the baseline: a rate needs two readings
    clock.advance(2.0)
    wall.advance(4.0)
    point = history.sample()
    assert point is not None
    assert point["t"] == 1_700_000_004.0
    assert point["answers"] == {
        "full": 10.0,
        "downshifted": 2.0,
        "fallback": 0.0,
        "emergency": 0.0,
        "cached": 0.0,
        "rejected": 0.0,
    }
    assert list(point["answers"]) == list(ANSWER_KINDS)
    # 24 answers in the interval: 20 in (0.1, 0.25], 4 in (2, 3]. p50 falls in the first of them.
    assert 0.1 < point["latency"]["p50"] <= 0.25
    assert 2.0 < point["latency"]["p95"] <= 3.0
    assert point["breakers"] == {"llama": "open"}
    assert (point["queue"], point["in_flight"], point["dimmer"], point["spool"]) == (7, 2, 1, 3)
    assert point["dimmer_value"] == 0.312
    assert point["gateway"] == {"chat/served": 5.0, "chat/unavailable": 1.0}
    assert published == [point]

    clock.advance(2.0)
    reset = history.sample()
    assert reset is not None
    assert reset["answers"]["full"] == 1.0  # 2 since the reset, over 2 s
    assert reset["latency"] == {"p50": None, "p95": None}  # nothing answered
    assert reset["gateway"] == {}

    for _ in range(10):
        clock.advance(2.0)
        history.sample()
    assert len(history.points) == 5  # 10 s of points every 2 s
    exported = history.export()
    assert exported["interval"] == 2.0
    assert exported["window"] == 10.0
    assert exported["answer_kinds"] == list(ANSWER_KINDS)
    assert exported["points"] == list(history.points)
    json.dumps(exported)  # what the stream and /api/v1/history send


async def test_points_are_taken_in_the_background_on_the_clock(clock: FakeClock) -> None:
    n = 0

    def read() -> Reading:
        nonlocal n
        n += 1
        return reading({"full": 3 * n})

    history = LiveHistory(read, interval=1.0, window=60.0, clock=clock)
    history.start()
    try:
        await clock.run(5.0)
    finally:
        await history.stop()
    assert len(history.points) >= 4
    assert all(p["answers"]["full"] == 3.0 for p in history.points)


def test_the_window_must_hold_more_than_one_interval(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="window"):
        LiveHistory(lambda: None, interval=5.0, window=1.0, clock=clock)
    with pytest.raises(ConfigError, match="history_window"):
        load_config(
            None, environ={"BROWNOUT__SERVER__HISTORY_WINDOW": "1", "BROWNOUT__SERVER__HISTORY_INTERVAL": "2"}
        )
    server = BrownoutConfig().server
    assert (server.history_interval, server.history_window) == (2.0, 900.0)


# ------------------------------------------------------------------------------------ the live channel


def messages(client: LiveClient) -> list[dict[str, Any]]:
    out = []
    while not client.queue.empty():
        message = client.queue.get_nowait()
        assert message is not None
        out.append(json.loads(message.data))
    return out


async def test_dashboards_get_the_history_then_each_point_and_others_get_none(clock: FakeClock) -> None:
    history = LiveHistory(Script(*[reading({"full": 5 * i}) for i in range(10)]), interval=1.0, clock=clock)
    for _ in range(3):
        history.sample()
        clock.advance(1.0)
    hub = LiveHub(lambda clients: {"status": "starting"}, clock=clock, client_queue=8, charts=history)
    charted = hub.connect(charts=True)
    plain = hub.connect()
    first = messages(charted)
    assert [m["type"] for m in first] == ["snapshot", "history"]
    assert first[1]["data"]["points"] == list(history.points)
    assert len(first[1]["data"]["points"]) == 2
    assert [m["type"] for m in messages(plain)] == ["snapshot"]

    point = history.sample()
    sent = messages(charted)
    assert [m["type"] for m in sent] == ["sample"]
    assert sent[0]["data"] == point
    assert messages(plain) == []
    # Without a history, a client that asks for charts gets the usual stream.
    bare = LiveHub(lambda clients: {"status": "starting"}, clock=clock)
    assert [m["type"] for m in messages(bare.connect(charts=True))] == ["snapshot"]


async def test_the_server_counts_answers_by_how_they_were_served(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    trip = {"circuit_breaker": {"minimum_calls": 2, "window_size": 4, "timeout": 3600}}
    async with serve(fakes, tmp_path, trip) as stack:
        rt = stack.runtime
        assert (
            await stack.http.post("/v1/briefs", json={"text": "a fresh citrus cologne", "mode": "balanced"})
        ).status_code == 200
        assert (
            await stack.http.post("/v1/briefs", json={"text": "a fresh citrus cologne", "mode": "balanced"})
        ).status_code == 200
        fakes["llama"].set("error")
        for i in range(3):
            answer = await stack.http.post(
                "/v1/briefs", json={"text": f"a fig and tea perfume {i}", "mode": "creative"}
            )
            assert answer.status_code == 200
        got = read_parts(rt.status, rt.http.briefs)
        assert got is not None
        stats = rt.service.stats
        assert got.answers["full"] + got.answers["downshifted"] == sum(
            n for mode, n in stats.served.items() if mode not in ("fallback", "emergency")
        )
        assert got.answers["downshifted"] >= 1  # creative served as balanced once the hinter's breaker opened
        assert got.answers["full"] >= 1
        assert got.answers["cached"] == 1
        assert got.answers["rejected"] == 0
        assert got.breakers["llama"] == "open"
        assert got.breakers["qwen"] == "closed"
        # Every 200 of POST /v1/briefs was timed, the cached one too.
        assert sum(got.latency) == 5
        assert len(got.latency) == len(LATENCY_BUCKETS) + 1


async def test_history_route_and_the_charts_stream(tmp_path: Path) -> None:
    fast = {"server": {"history_interval": 0.1, "history_window": 60.0}}
    async with (
        live_stack(tmp_path, fast) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http,
    ):
        assert (
            await http.post("/v1/briefs", json={"text": "a warm amber perfume", "mode": "fast"})
        ).status_code == 200
        history = stack.runtime.live.charts
        assert history is not None
        await until(lambda: len(history.points) >= 3, "three points")
        body = (await http.get("/api/v1/history")).json()
        assert body["interval"] == 0.1
        assert len(body["points"]) >= 3
        assert set(body["points"][-1]) >= {
            "t",
            "answers",
            "latency",
            "breakers",
            "queue",
            "dimmer",
            "spool",
            "gateway",
        }
        assert any(p["answers"]["full"] > 0 for p in body["points"])
        async with http.stream("GET", "/api/v1/events", params={"charts": "1"}) as response:
            kinds: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kinds.append(line[7:])
                if "sample" in kinds:
                    break
        assert kinds[:2] == ["snapshot", "history"]
        async with http.stream("GET", "/api/v1/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    assert line == "event: snapshot"
                    break
        for asset in ("vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css", "charts.js"):
            response = await http.get(f"/dashboard/{asset}")
            assert response.status_code == 200, asset
            assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert (await http.get("/dashboard/vendor/uplot/LICENSE")).status_code == 404
        assert (await http.get("/dashboard/vendor/uplot/../../dashboard.html")).status_code == 404
