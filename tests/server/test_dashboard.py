"""The ``/dashboard`` page in a real headless Chromium (Debian's package), updating live.

The app runs on uvicorn over fake model servers; Chromium loads the page and is driven through the
DevTools protocol over a WebSocket (no Node toolchain). The test waits for the page to show every
model's breaker closed, makes the hinter fail until its breaker opens, and asserts that the page --
without a reload -- shows the open breaker, the unhealthy model, the degraded mode and the transition
in its event feed; then it takes a screenshot and checks it is a real, non-trivial PNG. No script
error, console error or Content-Security-Policy violation may occur.

Chromium is installed by ``scripts/chromium install`` when missing (:mod:`support.chromium`).
The README's picture is taken by ``tests/server/test_dashboard_charts.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from brownout.policies.breaker import BreakerState
from support.chromium import QUIET_FLAGS, chromium_or_skip
from support.live import live_stack
from support.wait import until

TRIP: dict[str, Any] = {
    "circuit_breaker": {"minimum_calls": 2, "window_size": 4, "timeout": 3600},
    "server": {"live_interval": 0.5},
    "modes": {"interval": 0.2},
}
WIDTH, HEIGHT = 1280, 960


class CDP:
    """A minimal DevTools-protocol session on one page: commands with ids, events collected."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            future = self.pending.pop(message.get("id", -1), None)
            if future is not None:
                future.set_result(message)
            else:
                self.events.append(message)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 30)
        assert "error" not in answer, f"{method}: {answer['error']}"
        result: dict[str, Any] = answer["result"]
        return result

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_js(self, expression: str, what: str, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not await self.js(expression):
            if loop.time() > end:
                body = await self.js("document.body.innerText")
                raise AssertionError(f"timed out waiting for {what}; the page shows:\n{body}")
            await asyncio.sleep(0.05)

    def problems(self) -> list[str]:
        """Script exceptions, console errors and browser log errors (CSP violations among them)."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"{params['entry'].get('source')}: {params['entry'].get('text')}")
        return out


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path, binary: str) -> AsyncIterator[CDP]:
    """Headless Chromium with remote debugging on a free port; yields a session on its first page."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        *QUIET_FLAGS,
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its helper processes share the group and go with it
    )
    try:
        port_file = profile / "DevToolsActivePort"
        await until(
            lambda: port_file.exists() and len(port_file.read_text().splitlines()) >= 2,
            "DevTools",
            timeout=30,
        )
        port = int(port_file.read_text().splitlines()[0])
        async with httpx.AsyncClient(timeout=10) as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        async with ws_connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20) as ws:
            session = CDP(ws)
            try:
                for domain in ("Page", "Runtime", "Log"):
                    await session.send(f"{domain}.enable")
                await session.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=WIDTH,
                    height=HEIGHT,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield session
            finally:
                session.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await session.reader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.timeout(900)  # the first run on a new machine installs Chromium
async def test_dashboard_shows_a_breaker_opening_live(tmp_path: Path) -> None:
    binary = await asyncio.to_thread(chromium_or_skip)  # before the servers start: it may install for a while
    async with (
        live_stack(tmp_path, TRIP) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http,
        chromium(tmp_path, binary) as page,
    ):
        # Some traffic first, so the cache hit rate means something: 2 misses, then 4 hits.
        for text in ("a fresh citrus cologne", "a warm amber and vanilla perfume"):
            for _ in range(3):
                assert (
                    await http.post("/v1/briefs", json={"text": text, "mode": "balanced"})
                ).status_code == 200

        await page.send("Page.navigate", url=f"{stack.url}/dashboard")
        await page.wait_js(
            "document.getElementById('connection')?.dataset.state === 'live' && "
            "document.querySelector('[data-role=llama] .breaker')?.textContent === 'closed'",
            "the page to connect and show the llama breaker closed",
        )
        assert await page.js("document.getElementById('system-mode').textContent") == "normal"
        # 2 misses then 4 hits when every answer is full quality (66.7 %); on a loaded machine a model
        # can time out, and a degraded answer is not cached: the page must show what the server counted.
        cache = (await http.get("/health")).json()["cache"]
        expected = f"{100 * cache['hits'] / (cache['hits'] + cache['misses']):.1f} %"
        # Snapshots are pushed every live_interval: wait for one taken after the last request.
        await page.wait_js(
            f"document.getElementById('cache-hit-rate').textContent === {expected!r}",
            f"the page to show the cache hit rate {expected}",
        )
        assert await page.js("document.querySelectorAll('#models-body tr').length") == 3

        # The hinter fails; one creative request opens its breaker (TRIP). No reload from here on.
        stack.fakes["llama"].set("error")
        answer = await http.post(
            "/v1/briefs", json={"text": "a green tea and fig perfume", "mode": "creative"}
        )
        assert answer.status_code == 200
        assert stack.breaker("llama").state is BreakerState.OPEN

        await page.wait_js(
            "document.querySelector('[data-role=llama] .breaker')?.textContent === 'open' && "
            "document.querySelector('#feed li[data-name=BreakerStateChanged]') !== null && "
            "document.querySelector('#feed li[data-type=alert]') !== null && "
            "document.getElementById('system-mode').textContent === 'degraded'",
            "the page to show the open breaker, its event, its alert and the degraded mode",
        )
        dom = await page.js("document.documentElement.outerHTML")
        row = await page.js("document.querySelector('[data-role=llama]').innerText")
        assert "unhealthy" in row
        assert await page.js("document.querySelector('[data-role=qwen] .breaker').textContent") == "closed"
        assert await page.js("document.getElementById('system-mode').textContent") == "degraded"
        assert await page.js("document.getElementById('available-modes').textContent") == "fast, balanced"
        assert "breaker llama: closed -&gt; open" in dom
        assert "CircuitBreakerOpen: circuit breaker llama is OPEN" in dom
        # The open breaker is drawn red (its state drives the badge colour).
        colour = await page.js(
            "getComputedStyle(document.querySelector('[data-role=llama] .breaker')).backgroundColor"
        )
        assert colour == "rgb(204, 31, 26)"

        shot = await page.send("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        assert page.problems() == []

    assert png_size(png) == (WIDTH, HEIGHT)
    assert len(png) > 20_000  # a rendered page with text and colour, not a blank canvas
    (tmp_path / "dashboard.png").write_bytes(png)


async def test_dashboard_assets_are_local_and_locked_down(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack, httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http:
        page = await http.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        # Works offline: no asset from another host.
        assert "http://" not in page.text
        assert "https://" not in page.text
        for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            response = await http.get(f"/dashboard/{asset}")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(kind)
            assert "https://" not in response.text
        js = (await http.get("/dashboard/dashboard.js")).text
        assert "innerHTML" not in js  # server data goes in as text, never as markup
        assert (await http.get("/dashboard/../config.py")).status_code == 404
        assert (await http.get("/dashboard/other.js")).status_code == 404
