"""The HTTP routes of ``brownout serve`` by concern (brownout.server.routes): which module mounts what,
the answer before the service has started, and the documentation's own routes.

The app is built but not started (no lifespan): these routes answer from what is there at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from brownout.config import ROLES
from brownout.events import EventBus
from brownout.server.app import create_app
from brownout.server.errors import ApiError, ErrorResponse
from brownout.server.routes import briefs, check, docs, health, jobs, live, recovery, running
from brownout.server.runtime import Runtime
from support.stack import make_config

ROUTES: dict[str, set[tuple[str, str]]] = {
    briefs.__name__: {("POST", "/v1/briefs")},
    health.__name__: {
        ("GET", "/health"),
        ("GET", "/health/models/{name}"),
        ("GET", "/health/llm"),
        ("GET", "/metrics"),
    },
    recovery.__name__: {
        ("GET", "/api/v1/recovery/status"),
        ("GET", "/api/v1/recovery/health"),
        ("GET", "/api/v1/recovery/actions"),
        ("POST", "/api/v1/recovery/trigger"),
        ("POST", "/api/v1/recovery/reset"),
    },
    docs.__name__: {("GET", "/docs"), ("GET", "/docs/static/{name}")},
    live.__name__: {
        ("GET", "/api/v1/events"),
        ("WS", "/api/v1/ws"),
        ("GET", "/api/v1/status"),
        ("GET", "/dashboard"),
        ("GET", "/api/v1/history"),
        # The page's scripts, styles and the vendored charting library, from a fixed list of files.
        ("GET", "/dashboard/{name:path}"),
    },
    check.__name__: {("GET", "/api/v1/config/summary"), ("GET", "/api/v1/selftest/cache")},
    jobs.__name__: {
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
    },
    "brownout.gateway.routes": {
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/health/gateway"),
    },
}
"""Each module's routes, as (method, path); HEAD, which Starlette adds to GET routes, left out."""


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    urls = {role: f"http://127.0.0.1:9/{role}" for role in ROLES}  # never called: nothing starts
    config = make_config(urls, tmp_path / "briefs.db")
    return create_app(config, Runtime(config, events=EventBus()))


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://brownout"
    ) as client:
        yield client


def test_each_concern_mounts_its_routes_from_its_own_module(app: FastAPI) -> None:
    found: dict[str, set[tuple[str, str]]] = {}
    for route in app.routes:
        endpoint: Any = getattr(route, "endpoint", None)
        path: str = getattr(route, "path", "")
        if path == "/openapi.json":  # FastAPI's own, documented by the docs module's schema
            continue
        methods = sorted(getattr(route, "methods", None) or {"WS"})
        for method in methods:
            if method != "HEAD":
                found.setdefault(endpoint.__module__, set()).add((method, path))
    assert found == ROUTES


def test_a_service_that_has_not_started_is_refused_with_when_to_retry() -> None:
    with pytest.raises(ApiError) as caught:
        running(SimpleNamespace(started=False))  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    started = SimpleNamespace(started=True)
    assert running(started) is started  # type: ignore[arg-type]


async def test_a_brief_asked_for_while_starting_up_gets_a_503_that_says_so(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/briefs", json={"text": "lemon and sea", "mode": "fast"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    error = ErrorResponse.model_validate_json(response.content).error
    assert (error.code, error.retry_after) == ("starting", 5)


async def test_the_docs_serve_their_own_assets(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")
    assert page.status_code == 200
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert f"/docs/static/{asset}" in page.text
        served = await http.get(f"/docs/static/{asset}")
        assert served.status_code == 200, asset
        assert served.headers["cache-control"] == "public, max-age=86400"
        assert served.content
    missing = await http.get("/docs/static/evil.js")
    assert missing.status_code == 404
    assert ErrorResponse.model_validate_json(missing.content).error.code == "not_found"


async def test_the_openapi_document_is_built_once_and_names_both_apis(
    app: FastAPI, http: httpx.AsyncClient
) -> None:
    first = (await http.get("/openapi.json")).json()
    assert {"/v1/briefs", "/health", "/v1/chat/completions", "/v1/models"} <= set(first["paths"])
    assert "/docs" not in first["paths"]  # the documentation does not document itself
    assert app.openapi() is app.openapi()  # cached after the first build
