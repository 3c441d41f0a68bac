"""Schemathesis over the app's own OpenAPI spec: no operation answers with a server error (5xx).

The app runs on uvicorn on 127.0.0.1 (in a thread with its own event loop, since schemathesis's pytest
integration is synchronous), each model role on a healthy :class:`~brownout.chaos.fakellm.FakeLLM`,
so nothing heavy runs: no local model, no real upstream. Every operation of the spec (the gateway's
too: they are in the document) gets up to
``MAX_EXAMPLES`` generated requests (valid and invalid bodies, parameters and headers), derandomized
so a run is repeatable. Left out: ``GET /api/v1/events`` (an endless stream; ``tests/test_live.py``
covers it). Admin operations are called without the token, so they must refuse (401) and never act:
a generated recovery action would otherwise really run. Every error answer must be the one error
shape (:class:`~brownout.server.errors.ErrorResponse`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import CheckContext, not_a_server_error

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES
from brownout.events import EventBus
from brownout.server.app import create_app
from brownout.server.errors import ErrorResponse
from brownout.server.runtime import Runtime
from live_helpers import make_config, serve_app, until

# Per operation; BROWNOUT_SCHEMATHESIS_EXAMPLES=500 digs deeper by hand.
MAX_EXAMPLES = int(os.environ.get("BROWNOUT_SCHEMATHESIS_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app with FakeLLM roles, served by uvicorn in a thread; yields its base URL."""
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    ready = threading.Event()
    found: dict[str, str] = {}
    stop: list[asyncio.Event] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    failure: list[BaseException] = []

    async def main() -> None:
        loop_box.append(asyncio.get_running_loop())
        stop.append(asyncio.Event())
        fakes = [FakeLLM(model=role) for role in ROLES]
        try:
            for fake in fakes:
                await fake.start()
            config = make_config(
                {role: fake.url for role, fake in zip(ROLES, fakes, strict=True)},
                tmp / "briefs.db",
                {
                    "server": {"admin_token": "schemathesis-never-sends-this"},
                    "loop_block": {"enabled": False},
                    "resources": {"enabled": False},
                },
            )
            runtime = Runtime(config, events=EventBus())
            async with serve_app(create_app(config, runtime)) as url:
                service = runtime.service
                assert service is not None
                await until(lambda: len(service.stats.health) == len(ROLES), what="the first probes")
                found["url"] = url
                ready.set()
                await stop[0].wait()
        finally:
            await asyncio.gather(*(fake.stop() for fake in fakes))

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # reported to the test, which would otherwise wait in vain
            failure.append(e)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="schemathesis-app", daemon=True)
    thread.start()
    ready.wait(60)
    if failure:
        raise failure[0]
    assert "url" in found, "the app did not start"
    try:
        yield found["url"]
    finally:
        loop_box[0].call_soon_threadsafe(stop[0].set)
        thread.join(30)
        assert not thread.is_alive(), "the app did not stop"
        if failure:
            raise failure[0]


def _spec() -> dict[str, Any]:
    """The app's OpenAPI spec, built without starting anything (placeholder upstreams)."""
    config = make_config(dict.fromkeys(ROLES, "http://127.0.0.1:9"), Path("unused.db"))
    return create_app(config, Runtime(config, events=EventBus())).openapi()


# Loaded at import: schemathesis's lazy fixture loader does not run on pytest 9 (it sets a private
# attribute pytest no longer has). The spec the running app serves is the same; a test checks it.
schema = schemathesis.openapi.from_dict(_spec()).exclude(path="/api/v1/events")


def error_shape(ctx: CheckContext, response: Any, case: schemathesis.Case) -> bool | None:
    """A 4xx/5xx answer is JSON of the one error shape (retry_after on 429/503)."""
    if response.status_code < 400:
        return None
    error = ErrorResponse.model_validate_json(response.content).error
    assert error.message, case.path
    if response.status_code in (429, 503):
        assert error.retry_after is not None, case.path
    return None


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_with_a_server_error(case: schemathesis.Case, app_url: str) -> None:
    case.call_and_validate(base_url=app_url, checks=[not_a_server_error, error_shape], timeout=30)


def test_the_spec_covers_the_operations_routes(app_url: str) -> None:
    import httpx

    spec = httpx.get(f"{app_url}/openapi.json", timeout=30).json()
    assert spec == _spec()  # the spec fuzzed is the one served
    paths = set(spec["paths"])
    for path in (
        "/v1/briefs",
        "/health",
        "/health/llm",
        "/api/v1/status",
        "/api/v1/config/summary",
        "/api/v1/selftest/cache",
        "/api/v1/events",
        "/dashboard",
        "/api/v1/recovery/trigger",
        "/v1/chat/completions",
        "/v1/models",
        "/health/gateway",
    ):
        assert path in paths, path
