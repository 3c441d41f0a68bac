"""A server owns its port, spool and outbox: a second one stops at once, naming the setting; and a
spool that lost acknowledged entries is reported in ``/health``, ``/metrics`` and ``brownout check``.

The process tests run real ``brownout serve`` processes on 127.0.0.1 with each model role on a fake
endpoint, except where the point is that no model server starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from brownout.chaos.fakellm import FakeLLM
from brownout.chaos.servers import free_port
from brownout.checks import run_checks
from brownout.durable.spool import Spool
from brownout.errors import ConfigError
from brownout.events import EventBus
from brownout.server.listener import listen
from brownout.server.runtime import Runtime
from support.stack import make_config, metric_values, serve

MARKER = "BROWNOUT_OWNERSHIP_TEST_MARKER"
"""Set in the environment of a server under test: any process it started carries it."""


def config_file(tmp_path: Path, fakes: dict[str, FakeLLM] | None, port: int, name: str = "c") -> Path:
    """A config on ``port``; roles on ``fakes``, or (None) the embedded local models."""
    models: dict[str, Any] = {"health_interval": 3600.0}
    if fakes is not None:
        models |= {
            "local": {"enabled": False},
            "roles": {r: {"endpoints": [{"url": f.url}]} for r, f in fakes.items()},
        }
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "models": models,
        "database": {
            "url": f"sqlite+aiosqlite:///{tmp_path / 'briefs.db'}",
            "spool_path": str(tmp_path / "spool.db"),
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def run_serve(config: Path, *extra: str, marker: str = "") -> tuple[int, str, str]:
    """``brownout serve`` to its end: (exit status, stdout, stderr). Gives up after 60 s."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BROWNOUT")}
    env[MARKER] = marker
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "brownout",
        "serve",
        "--config",
        str(config),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def running_server(config: Path, port: int) -> AsyncIterator[str]:
    """A first ``brownout serve`` on ``config``, up and answering; yields its URL."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BROWNOUT")}
    log = config.with_suffix(".log")
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "brownout",
            "serve",
            "--config",
            str(config),
            stdout=out,
            stderr=out,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
            for _ in range(600):
                assert proc.returncode is None, log.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/api/v1/status")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the first server did not start:\n{log.read_text()}")
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def processes_with(marker: str) -> list[int]:
    """Processes whose environment carries ``MARKER=marker`` (children inherit it)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
    return found


# ---------------------------------------------------------------------------------------- the port


async def test_a_second_server_on_one_config_stops_at_the_port(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    port = free_port()
    config = config_file(tmp_path, fakes, port)
    async with running_server(config, port) as url:
        status, out, err = await run_serve(config)
        assert status == 2, err
        assert f"server.port: 127.0.0.1:{port} is already in use" in err
        assert "serving briefs" not in out  # it stopped before building the app
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
            assert (await http.get("/health")).status_code == 200  # the first one is unaffected


async def test_port_in_use_fails_before_model_servers_database_or_spool(tmp_path: Path) -> None:
    """The embedded local models are configured; with the port taken none of them may start, and
    neither the database nor the spool file is created."""
    holder = listen("127.0.0.1", 0)
    try:
        port = holder.getsockname()[1]
        config = config_file(tmp_path, None, port)
        marker = uuid.uuid4().hex
        status, _, err = await run_serve(config, marker=marker)
    finally:
        holder.close()
    assert status == 2, err
    assert f"server.port: 127.0.0.1:{port} is already in use" in err
    assert processes_with(marker) == []
    assert names_in(tmp_path) == ["c.yaml"]


def test_listen_names_the_setting_and_the_address() -> None:
    holder = listen("127.0.0.1", 0)
    try:
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            listen("127.0.0.1", port)
    finally:
        holder.close()
    assert caught.value.key == "server.port"
    assert f"127.0.0.1:{port}" in caught.value.message
    with pytest.raises(ConfigError) as bad_host:
        listen("no-such-host.invalid", 0)
    assert bad_host.value.key == "server.host"


# ---------------------------------------------------------------------------------------- the spool


async def test_a_second_runtime_on_the_same_spool_fails_naming_the_key(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    urls = {role: fake.url for role, fake in fakes.items()}
    async with serve(fakes, tmp_path) as stack:
        config = make_config(
            urls, tmp_path / "other.db", {"database": {"spool_path": str(stack.runtime.spool.path)}}
        )
        second = Runtime(config, events=EventBus())
        with pytest.raises(ConfigError) as caught:
            await second.start()
        assert caught.value.key == "database.spool_path"
        assert str(stack.runtime.spool.path) in caught.value.message
        assert f"process {os.getpid()}" in caught.value.message
        # It stopped before any model server started or any model was called.
        assert not second.started
        assert second.service.stats.health == {}
        assert not +second.service.stats.requests
        assert all(s.state == "stopped" for s in second.local.values())
        assert not (tmp_path / "other.db").exists()  # nor did it touch its database


async def test_a_second_server_on_another_port_but_the_same_spool_exits_naming_the_key(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    port = free_port()
    config = config_file(tmp_path, fakes, port)
    async with running_server(config, port):
        other = config_file(tmp_path, fakes, free_port(), name="other")
        status, _, err = await run_serve(other)
    assert status == 2, err
    assert f"cannot start: database.spool_path: {tmp_path / 'spool.db'} is already in use" in err


# ---------------------------------------------------------------------------------------- the report


def lose_everything(spool_path: Path, keys: list[str]) -> None:
    """What the fault injection did: acknowledged entries, a crash, the spool's log truncated."""
    image = spool_path.with_name("image")
    image.mkdir()
    parts = ("", "-wal", ".ledger", ".ledger-wal")

    async def spool_and_crash() -> None:
        spool = Spool(spool_path, name="briefs-spool")
        for key in keys:
            await spool.append(key, "brief", {"request_id": key})
        # A crash image: the files as they are now, before any close or checkpoint.
        await asyncio.to_thread(copy_files, spool_path, image / spool_path.name, parts)
        await spool.aclose()

    asyncio.run(spool_and_crash())
    for suffix in (*parts, "-shm", ".ledger-shm"):
        Path(f"{spool_path}{suffix}").unlink(missing_ok=True)
    copy_files(image / spool_path.name, spool_path, parts)
    shutil.rmtree(image)
    os.truncate(f"{spool_path}-wal", 0)


def copy_files(source: Path, target: Path, suffixes: tuple[str, ...]) -> None:
    """Copy ``source`` with each of its ``suffixes`` files that exists to ``target`` (same suffix)."""
    for suffix in suffixes:
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")


def names_in(directory: Path) -> list[str]:
    """The file names in ``directory``, sorted."""
    return sorted(p.name for p in directory.iterdir())


async def test_lost_briefs_show_in_health_metrics_and_check(
    fakes: dict[str, FakeLLM], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [f"req-{i:02d}" for i in range(30)]
    spool_path = tmp_path / "briefs.spool.db"  # make_config's spool beside the database
    await asyncio.to_thread(lose_everything, spool_path, keys)
    async with serve(fakes, tmp_path) as stack:
        health = (await stack.http.get("/health")).json()
        assert health["spool"]["lost"] == {"count": 30, "ids": keys, "files": [str(spool_path)]}
        assert health["spool"]["pending"] == 0
        assert health["events"] == {"status": "not configured"}
        samples = metric_values((await stack.http.get("/metrics")).text)
        assert samples[("spool_lost_entries", frozenset({("spool", "briefs")}))] == 30
        # The server keeps serving.
        answer = await stack.http.post("/v1/briefs", json={"text": "bergamot at noon", "mode": "fast"})
        assert answer.status_code == 200

        transport = httpx.ASGITransport(app=stack.app)
        results = await asyncio.to_thread(run_checks, "http://brownout", transport=_SyncASGI(transport))
        durable = {r.name: r for r in results}["durable writes"]
        assert not durable.ok
        assert "30 acknowledged briefs lost" in durable.detail
        assert "req-00" in durable.detail

        assert await stack.runtime.spool.clear_lost() == 30
        health = (await stack.http.get("/health")).json()
        assert health["spool"]["lost"] == {"count": 0, "ids": [], "files": []}
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("30 acknowledged entries LOST" in m and str(spool_path) in m for m in errors)


class _SyncASGI(httpx.BaseTransport):
    """The app's ASGI transport for the synchronous client of ``run_checks``, from a worker thread."""

    def __init__(self, transport: httpx.ASGITransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            body = request.read()
            forwarded = httpx.Request(request.method, request.url, headers=request.headers, content=body)
            response = await self.transport.handle_async_request(forwarded)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(60)
