"""The app under the fuzz tests: served by a real uvicorn on 127.0.0.1, in a thread of its own.

Hypothesis and schemathesis drive synchronous tests, so the app runs in a thread with its own event
loop, each model role and a gateway model group (:data:`GROUP`) on a healthy
:class:`~brownout.chaos.fakellm.FakeLLM`: no local model, no real upstream. The server uses the
project's own HTTP protocol and connection limits (:func:`brownout.server.connections.uvicorn_options`,
as ``brownout serve`` does), so what reaches the app is what a real client's bytes become.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES
from brownout.events import EventBus
from brownout.server.app import create_app
from brownout.server.connections import ConnectionPolicy, uvicorn_options
from brownout.server.errors import ErrorResponse
from brownout.server.runtime import Runtime
from support.net import EmbeddedServer
from support.stack import make_config
from support.wait import until

__all__ = ["ADMIN_TOKEN", "BOUND", "GROUP", "RunningApp", "assert_error_shape", "overrides", "running_app"]

BOUND = 5.0
"""Seconds any one request may take, answer included: far above what any of them needs here, so
passing it means a hang or a wait on something that never comes, not a slow machine."""
ADMIN_TOKEN = "fuzz-admin-token"
GROUP = "chat"
"""The gateway's one model group, on its own fake."""


def overrides(group_url: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings of the app under fuzzing (``extra`` merged one level deep)."""
    out: dict[str, Any] = {
        "server": {"admin_token": ADMIN_TOKEN},
        "loop_block": {"enabled": False},
        "resources": {"enabled": False},
        # A recovery run still going after this answers 202 with its run id, well inside BOUND.
        "recovery": {"admin_timeout": 1.0},
        # The cache on: its key is built from the body, which the fuzzing makes odd.
        "gateway": {
            "groups": {GROUP: {"endpoints": [{"url": group_url}], "timeout": 2.0, "cache": {"enabled": True}}}
        },
    }
    for key, value in (extra or {}).items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, Mapping) else value
    return out


@dataclass
class RunningApp:
    """The served app: its base URL, port and runtime (read its state from the test thread only
    after the thread-safe calls it offers, or for counters that are plain integers)."""

    url: str
    port: int
    runtime: Runtime
    policy: ConnectionPolicy
    fakes: dict[str, FakeLLM]
    """The fakes by role, and the gateway group's under :data:`GROUP`; ``fake.set(...)`` from the
    test thread only swaps its behaviour object (one assignment)."""


@contextlib.contextmanager
def running_app(tmp: Path, extra: Mapping[str, Any] | None = None) -> Iterator[RunningApp]:
    """Start the fakes and the app (settings: :func:`overrides` with ``extra``); stop them after."""
    ready = threading.Event()
    found: list[RunningApp] = []
    stop: list[asyncio.Event] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    failure: list[BaseException] = []

    async def main() -> None:
        loop_box.append(asyncio.get_running_loop())
        stop.append(asyncio.Event())
        fakes = [FakeLLM(model=name) for name in (*ROLES, GROUP)]
        try:
            for fake in fakes:
                await fake.start()
            config = make_config(
                {role: fake.url for role, fake in zip(ROLES, fakes, strict=False)},
                tmp / "briefs.db",
                overrides(fakes[-1].url, extra),
            )
            runtime = Runtime(config, events=EventBus())
            app = create_app(config, runtime)
            policy = ConnectionPolicy.from_config(config.server)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            server = EmbeddedServer(
                uvicorn.Config(
                    app,
                    log_config=None,
                    log_level="warning",
                    access_log=False,
                    loop="asyncio",
                    timeout_graceful_shutdown=2,
                    **uvicorn_options(config.server, policy),
                )
            )
            task = asyncio.create_task(server.serve(sockets=[sock]))
            try:
                await until(lambda: server.started or task.done(), "uvicorn to start")
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during startup")
                service = runtime.service
                assert service is not None
                await until(lambda: len(service.stats.health) == len(ROLES), "the first probes")
                found.append(
                    RunningApp(
                        f"http://127.0.0.1:{port}",
                        port,
                        runtime,
                        policy,
                        dict(zip((*ROLES, GROUP), fakes, strict=True)),
                    )
                )
                ready.set()
                await stop[0].wait()
            finally:
                runtime.live.close_clients()
                server.should_exit = True
                await task
                sock.close()
        finally:
            await asyncio.gather(*(fake.stop() for fake in fakes))

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # reported to the test, which would otherwise wait in vain
            failure.append(e)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="fuzzed-app", daemon=True)
    thread.start()
    ready.wait(60)
    if failure:
        raise failure[0]
    assert found, "the app did not start"
    try:
        yield found[0]
    finally:
        loop_box[0].call_soon_threadsafe(stop[0].set)
        thread.join(30)
        assert not thread.is_alive(), "the app did not stop"
        if failure:
            raise failure[0]


def assert_error_shape(status: int, headers: Mapping[str, Any], content: bytes, what: str) -> None:
    """A 4xx/5xx answer is the one error shape; no 5xx but a 503 that says when to retry, or the
    gateway's 504 for a request whose own budget ran out (``budget_exhausted``, also with a retry).

    ``headers``: lower-case names to a value (httpx) or a list of values (schemathesis).
    """
    if status >= 500:
        assert status in (503, 504), f"{what}: answered {status}: {content[:300]!r}"
        assert headers.get("retry-after"), f"{what}: a {status} without Retry-After"
    if status >= 400:
        error = ErrorResponse.model_validate_json(content).error
        assert error.message, what
        if status in (429, 503, 504):
            assert error.retry_after is not None, what
        if status == 504:
            assert error.code == "budget_exhausted", f"{what}: a 504 that is not a spent budget: {error}"
