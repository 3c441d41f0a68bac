"""The drill's child processes: fault-injecting model servers, the brownout server, helpers.

* :class:`FakeModel` -- one ``python -m brownout.chaos.fakellm --port N`` per model role, switched at
  run time through ``POST /_control`` and frozen with SIGSTOP for a hang;
* :class:`BrownoutServer` -- ``python -m brownout serve --config <drill.yaml>`` on a free port;
* :class:`ChildProcess` -- any other child (a helper a play runs), its output in a log file.

Every child still running when the interpreter exits is killed, so an interrupted drill leaves no
server behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from brownout.bench import child_env
from brownout.clock import Clock

__all__ = ["BrownoutServer", "ChildProcess", "DrillError", "FakeModel", "log_tail"]

# Children still running, killed at interpreter exit: a drill interrupted half-way leaves no server.
_LIVE: set[int] = set()


@atexit.register
def _kill_live() -> None:
    for pid in list(_LIVE):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


class DrillError(RuntimeError):
    """The drill could not set up or drive the stack (not a verdict on the server)."""


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (empty when it cannot be read): what a failure shows."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ChildProcess:
    """A child process of the drill, its output in a log file."""

    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name = name
        self.command = command
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.paused = False

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def spawn(self) -> None:
        """Start it, its output appended to its log file."""
        out = await asyncio.to_thread(open, self.log, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=child_env(),
            )
        finally:
            out.close()
        _LIVE.add(self.proc.pid)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` (SIGSTOP freezes, SIGCONT thaws)."""
        pid = self.pid
        if pid is None:
            raise DrillError(f"{self.name} is not running")
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            self.paused = True
        elif sig == signal.SIGCONT:
            self.paused = False

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (after SIGCONT if frozen), then SIGKILL after ``grace`` seconds."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if self.paused:
                    proc.send_signal(signal.SIGCONT)
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        _LIVE.discard(proc.pid)


class FakeModel(ChildProcess):
    """A ``brownout.chaos.fakellm`` process serving one role on 127.0.0.1."""

    def __init__(self, role: str, workdir: Path) -> None:
        from brownout.chaos.servers import free_port

        self.role = role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "brownout.chaos.fakellm", "--port", str(self.port), "--model", role]
        super().__init__(f"fake {role}", command, workdir / f"fake-{role}.log")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=5.0, trust_env=False)

    async def start(self, clock: Clock, timeout: float) -> None:
        """Spawn it and wait until its control API answers."""
        await self.spawn()
        end = clock.now() + timeout
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise DrillError(f"{self.name} exited while starting:\n{log_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self._http.get("/_control")).status_code == 200:
                    return
            if clock.now() > end:
                raise DrillError(f"{self.name} did not answer within {timeout:g}s:\n{log_tail(self.log)}")
            await clock.sleep(0.05)

    async def set(self, behaviour: Mapping[str, Any]) -> None:
        """Switch its behaviour (the whole behaviour: fields left out take their defaults)."""
        response = await self._http.post("/_control", json=dict(behaviour))
        if response.status_code != 200:
            raise DrillError(f"{self.name} refused behaviour {dict(behaviour)}: {response.text}")

    async def counters(self) -> dict[str, Any]:
        """Its behaviour and request counters (``GET /_control``)."""
        data: dict[str, Any] = (await self._http.get("/_control")).json()
        return data

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the process and close the control client."""
        await super().stop(grace)
        await self._http.aclose()


class BrownoutServer(ChildProcess):
    """``python -m brownout serve --config <workdir>/drill.yaml`` on a free port of 127.0.0.1."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        from brownout.config import BrownoutConfig

        # Validate here, so a bad drill config is reported as such and not as a server that died.
        self.config = BrownoutConfig.model_validate(config)
        self.port = int(config["server"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        path = workdir / "drill.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "brownout", "serve", "--config", str(path), "--log-level", "warning"]
        super().__init__("brownout server", command, workdir / "server.log")

    async def start(self, clock: Clock, timeout: float) -> None:
        """Spawn it and wait until ``/health`` answers."""
        await self.spawn()
        end = clock.now() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0, trust_env=False) as http:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise DrillError(f"the brownout server exited while starting:\n{log_tail(self.log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        return
                if clock.now() > end:
                    raise DrillError(
                        f"the brownout server did not answer within {timeout:g}s:\n{log_tail(self.log)}"
                    )
                await clock.sleep(0.1)
