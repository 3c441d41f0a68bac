"""The dashboard's charts in a real headless Chromium (Debian's package, driven by Playwright).

The app runs on uvicorn over fake model servers, with a point every quarter of a second. The page is
opened at 1280x800: its six charts must be drawn (uPlot canvases with pixels on them) before any
traffic. Then a bounded burst of brief requests and gateway chats goes to 127.0.0.1, the hinter's
breaker is made to open, and -- without a reload -- the charts must move: more points plotted, the
answers chart gains the green of full answers and the amber of downshifted ones, the breaker timeline
gains the red of an open breaker, and the gateway chart gains a line. No script error, console error
or Content-Security-Policy violation may occur. A screenshot of the page at 1280x800 is checked and,
with ``BROWNOUT_DASHBOARD_PNG=docs/dashboard.png``, saved there (the README's picture).
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import ConsoleMessage, Page, async_playwright

from brownout.chaos.fakellm import FakeLLM
from brownout.policies.breaker import BreakerState
from support import ROOT
from support.chromium import QUIET_FLAGS, chromium_or_skip
from support.live import live_stack

WIDTH, HEIGHT = 1280, 800
CHARTS = ("answers", "latency", "breakers", "load", "spool", "gateway")
GREEN, AMBER, RED = (31, 157, 85), (217, 142, 4), (204, 31, 26)

# Points every 0.25 s; the hinter's breaker opens after 2 failures; the mode follows fast.
FAST: dict[str, Any] = {
    "server": {"live_interval": 0.5, "history_interval": 0.25, "history_window": 120.0},
    "circuit_breaker": {"minimum_calls": 2, "window_size": 4, "timeout": 3600},
    "modes": {"interval": 0.2},
}

# Counts pixels of one colour (exactly, as uPlot strokes it) on a chart's canvas.
COUNT_COLOUR = """([id, r, g, b]) => {
  const canvas = document.querySelector('#chart-' + id + ' canvas');
  if (!canvas) return -1;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] === r && data[i + 1] === g && data[i + 2] === b && data[i + 3] === 255) n++;
  }
  return n;
}"""
# Pixels that are not transparent: axes, grid and labels are drawn on the canvas too.
INKED = """(id) => {
  const canvas = document.querySelector('#chart-' + id + ' canvas');
  if (!canvas) return -1;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) n++;
  return n;
}"""


async def colour(page: Page, chart: str, rgb: tuple[int, int, int]) -> int:
    n: int = await page.evaluate(COUNT_COLOUR, [chart, *rgb])
    return n


async def points(page: Page) -> int:
    return int(await page.get_attribute("#charts", "data-points") or 0)


async def until_page(page: Page, expression: str, what: str, timeout: float = 20.0) -> None:
    """Poll ``expression`` in the page until it is true. (Playwright's wait_for_function compiles its
    predicate with eval in the page, which the dashboard's Content-Security-Policy rightly refuses.)"""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await page.evaluate(expression):
        if loop.time() > end:
            shown = await page.evaluate("document.body.innerText")
            raise AssertionError(f"timed out waiting for {what}; the page shows:\n{shown[:2000]}")
        await asyncio.sleep(0.05)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.timeout(900)  # the first run on a new machine installs Chromium
async def test_dashboard_charts_draw_and_move_under_load(tmp_path: Path) -> None:
    binary = await asyncio.to_thread(chromium_or_skip)  # before the servers start: it may install for a while
    problems: list[str] = []
    # The gateway serves a "chat" group on a fake of its own, so its chart has traffic to draw.
    upstream = FakeLLM(model="chat")
    await upstream.start()
    try:
        shot = await exercise(tmp_path, binary, upstream.url, problems.append)
    finally:
        await upstream.stop()
    assert problems == []
    assert png_size(shot) == (WIDTH, HEIGHT)
    assert len(shot) > 40_000  # charts, text and colour, not a blank page
    (tmp_path / "dashboard.png").write_bytes(shot)
    target = os.environ.get("BROWNOUT_DASHBOARD_PNG")
    if target:
        (ROOT / target).write_bytes(shot)


async def exercise(tmp_path: Path, binary: str, chat_url: str, problem: Callable[[str], None]) -> bytes:
    """The page before and under load; returns its screenshot at the end."""

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problem(f"console: {message.text}")

    overrides = {**FAST, "gateway": {"groups": {"chat": {"endpoints": [{"url": chat_url}]}}}}
    async with live_stack(tmp_path, overrides) as stack, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=binary, args=list(QUIET_FLAGS))
        try:
            page = await browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            page.on("console", console)
            page.on("pageerror", lambda e: problem(f"page error: {e}"))
            await page.goto(f"{stack.url}/dashboard")
            await until_page(
                page,
                "document.getElementById('connection').dataset.state === 'live' && "
                "Number(document.getElementById('charts').dataset.points) >= 2",
                "the page to connect and draw its first points",
            )
            # Drawn before any traffic: a canvas per chart, with axes and grid on it.
            for chart in CHARTS:
                assert await page.evaluate(INKED, chart) > 500, f"the {chart} chart is blank"
            assert await colour(page, "breakers", GREEN) > 0  # every breaker closed: green lanes
            assert await colour(page, "breakers", RED) == 0
            assert await page.get_attribute("#chart-gateway", "data-series") == "0"
            quiet_green = await colour(page, "answers", GREEN)
            quiet_amber = await colour(page, "answers", AMBER)
            before = await points(page)
            shot_before = await page.screenshot()

            async with httpx.AsyncClient(base_url=stack.url, timeout=30.0) as http:
                # A bounded burst: 6 rounds of 8 different briefs at once, then the hinter fails and
                # creative briefs are downshifted (its breaker opens after 2 failures).
                for round_ in range(6):
                    answers = await asyncio.gather(
                        *(
                            http.post(
                                "/v1/briefs",
                                json={"text": f"a citrus cologne no {round_}-{i}", "mode": "balanced"},
                            )
                            for i in range(8)
                        )
                    )
                    assert all(a.status_code == 200 for a in answers)
                    await asyncio.sleep(0.1)
                stack.fakes["llama"].set("error")
                for i in range(6):
                    answer = await http.post(
                        "/v1/briefs", json={"text": f"a green tea and fig perfume {i}", "mode": "creative"}
                    )
                    assert answer.status_code == 200
                    await asyncio.sleep(0.1)
                assert stack.breaker("llama").state is BreakerState.OPEN
                chats = await asyncio.gather(
                    *(
                        http.post(
                            "/v1/chat/completions",
                            json={"model": "chat", "messages": [{"role": "user", "content": f"hi {i}"}]},
                        )
                        for i in range(10)
                    )
                )
                assert all(c.status_code == 200 for c in chats)
                # A job: its row comes from the live channel's progress messages, with its bar.
                items = [{"text": f"a vetiver and rain candle {i}", "mode": "fast"} for i in range(4)]
                submitted = await http.post("/v1/jobs", json={"type": "briefs", "items": items})
                assert submitted.status_code == 202, submitted.text
                job = submitted.json()["id"]

            row = f"document.querySelector('#jobs-body tr[data-job=\"{job}\"]')"
            await until_page(
                page, f"{row} !== null && {row}.dataset.jobState === 'succeeded'", "the job's row"
            )
            widths = await page.evaluate(
                f"[...{row}.querySelectorAll('.progress span')].map((s) => parseFloat(s.style.width))"
            )
            assert sum(widths) == pytest.approx(100.0)  # done (by a model or by the rules): the whole bar
            assert "1 succeeded" in ((await page.text_content("#jobs-counts")) or "")

            await until_page(
                page,
                f"Number(document.getElementById('charts').dataset.points) >= {before + 8}",
                "more points",
            )
            await page.wait_for_timeout(600)  # two more points: the last requests are in the curves
            after = await points(page)
            assert after > before
            assert await colour(page, "answers", GREEN) > quiet_green, "no full answers drawn"
            assert await colour(page, "answers", AMBER) > quiet_amber, "no downshifted answers drawn"
            assert await colour(page, "breakers", RED) > 0, "the open breaker is not on the timeline"
            assert await page.get_attribute("#chart-latency", "data-series") == "2"
            assert await page.get_attribute("#chart-gateway", "data-series") == "1"  # chat/served
            shot = await page.screenshot()
            assert shot != shot_before
            return shot
        finally:
            await browser.close()
