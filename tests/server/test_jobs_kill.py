"""A real ``brownout serve`` killed with SIGKILL in the middle of a job, then started again on the
same database: the job ends ``succeeded`` with every item stored exactly once, the items finished
before the kill untouched, and the progress seen on the live channel.

The brief roles point at :class:`~brownout.chaos.fakellm.FakeLLM` servers on 127.0.0.1 answering after
a short delay, so the 40-item job is still running when the kill comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES
from brownout.durable.jobs import JobStore
from brownout.durable.store import BriefStore
from brownout.llm.local import free_port
from support.stack import distinct_text
from support.wait import until

ITEMS = 40


@pytest.fixture
async def slow_fakes() -> AsyncIterator[dict[str, FakeLLM]]:
    """One fake model per role, each answering after 0.1 s."""
    started: dict[str, FakeLLM] = {}
    try:
        for role in ROLES:
            fake = FakeLLM(model=role, delay=0.1)
            await fake.start()
            started[role] = fake
        yield started
    finally:
        await asyncio.gather(*(fake.stop() for fake in started.values()))


def _write_config(tmp_path: Path, fakes: dict[str, FakeLLM], port: int) -> Path:
    config = {
        "server": {"port": port},
        "models": {
            "local": {"enabled": False},
            "health_interval": 3600.0,
            "roles": {
                role: {"endpoints": [{"url": fake.url}], "timeout": 5.0} for role, fake in fakes.items()
            },
        },
        "loop_block": {"enabled": False},
        "resources": {"enabled": False},
        "jobs": {"poll_interval": 0.1},
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def _serve(config: Path, port: int, log: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "brownout", "serve", "--config", str(config), stdout=out, stderr=out
        )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(_read(log))
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _job_messages(url: str, job_id: str, seen: list[dict[str, Any]]) -> None:
    """Follow the live channel, keeping this job's messages, until it ends."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=60.0) as http,
        http.stream("GET", "/api/v1/events") as response,
    ):
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "job":
                job = json.loads(line.split(":", 1)[1])["job"]
                if job["id"] == job_id:
                    seen.append(job)
                    if job["state"] not in ("queued", "running"):
                        return


async def test_a_job_survives_kill_9_and_every_item_is_stored_exactly_once(
    slow_fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    port = free_port()
    config = _write_config(tmp_path, slow_fakes, port)
    log = tmp_path / "serve.log"
    items = [{"text": distinct_text(i), "mode": "fast"} for i in range(ITEMS)]
    async with (
        _serve(config, port, log) as (proc, url),
        httpx.AsyncClient(base_url=url, timeout=10.0) as http,
    ):
        response = await http.post("/v1/jobs", json={"type": "briefs", "items": items})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        async def some_done() -> bool:
            return bool((await http.get(f"/v1/jobs/{job_id}")).json()["progress"]["done"] >= 8)

        await until(some_done, "a few items to finish", timeout=30.0, interval=0.02)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    # Between the lives: what the first one checkpointed.
    store = BriefStore(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        before = {i.index: i.result for i in await JobStore(store).items(job_id) if i.state == "succeeded"}
    finally:
        await store.aclose()
    assert 8 <= len(before) < ITEMS, "the kill came too late to prove anything"
    async with _serve(config, port, log) as (_, url), httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        seen: list[dict[str, Any]] = []
        follow = asyncio.create_task(_job_messages(url, job_id, seen))
        await asyncio.wait_for(follow, 60.0)
        job = (await http.get(f"/v1/jobs/{job_id}", params={"limit": 1000})).json()
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"done": ITEMS, "failed": 0, "total": ITEMS, "mock": 0, "pending": 0}
    assert [i["index"] for i in job["items"]] == list(range(ITEMS))
    assert all(i["state"] == "succeeded" and i["served_by"] == "model:qwen" for i in job["items"])
    # The items finished before the kill were not done again: the same answers, the same request ids.
    for index, result in before.items():
        assert job["items"][index]["result"] == result
    assert len({i["result"]["request_id"] for i in job["items"]}) == ITEMS
    # Progress went out on the live channel of the second life, up to the end.
    assert seen[-1]["state"] == "succeeded"
    assert seen[-1]["progress"]["done"] == ITEMS
    store = BriefStore(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        assert await JobStore(store).item_counts(job_id) == {"succeeded": ITEMS}
    finally:
        await store.aclose()
