"""Security of the HTTP API: CORS off unless configured, admin endpoints behind a bearer token, and no
secret -- the admin token, a model API key, a webhook URL, a database password -- in any log line or
any answer. (Body limits: ``tests/server/test_server.py``; no 5xx for any input:
``tests/server/test_schemathesis.py``.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.live import live_stack
from support.wait import until

TOKEN = "T0k3n-that-must-never-leak-9c1e"
HOOK_SECRET = "B0GUS/HOOK/SECRET-77"


async def test_cors_is_off_by_default(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.get("/health", headers={"Origin": "https://evil.example"})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
        preflight = await http.options(
            "/v1/briefs",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 405  # nobody answers preflights: browsers refuse cross-site calls
        assert "access-control-allow-origin" not in preflight.headers


async def test_cors_allows_only_the_configured_origins(tmp_path: Path) -> None:
    allowed = "https://ops.example.com"
    async with (
        live_stack(tmp_path, {"server": {"cors_origins": [allowed]}}) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        ok = await http.get("/api/v1/status", headers={"Origin": allowed})
        assert ok.headers["access-control-allow-origin"] == allowed
        other = await http.get("/api/v1/status", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = await http.options(
            "/v1/briefs",
            headers={
                "Origin": allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert "POST" in preflight.headers["access-control-allow-methods"]
        refused = await http.options(
            "/v1/briefs",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert refused.status_code == 400
        # Even a 413 from the body-size guard carries the CORS header (CORS is the outermost layer).
        big = await http.post(
            "/v1/briefs",
            content=b"x" * 100_000,
            headers={"Origin": allowed, "content-type": "application/json"},
        )
        assert big.status_code == 413
        assert big.headers["access-control-allow-origin"] == allowed


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong-token", 401),
        (f"Basic {TOKEN}", 401),
        (f"Bearer {TOKEN}x", 401),
        (f"Bearer {TOKEN[:-1]}", 401),
        (f"bearer {TOKEN}", 200),
    ],
)
async def test_admin_endpoints_need_the_exact_bearer_token(
    tmp_path: Path, header: str | None, status: int
) -> None:
    async with (
        live_stack(tmp_path, admin_token=TOKEN) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        headers = {"Authorization": header} if header is not None else {}
        response = await http.post("/api/v1/recovery/reset", headers=headers)
        assert response.status_code == status, response.text
        if status == 401:
            assert response.headers["www-authenticate"] == "Bearer"


async def test_admin_endpoints_are_refused_without_a_configured_token(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post("/api/v1/recovery/reset", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 403
        assert "admin_token" in response.json()["error"]["message"]
        assert response.json()["error"]["type"] == "permission_error"


async def test_no_secret_reaches_a_log_or_an_answer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    overrides: dict[str, Any] = {
        "webhooks": {
            "endpoints": [{"url": f"http://127.0.0.1:9/{HOOK_SECRET}", "format": "slack"}],
            "retries": 0,
        }
    }
    bodies: list[str] = []
    with caplog.at_level(logging.DEBUG):
        async with (
            live_stack(tmp_path, overrides, admin_token=TOKEN) as stack,
            httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
        ):
            good = {"Authorization": f"Bearer {TOKEN}"}
            bad = {"Authorization": f"Bearer {TOKEN}-wrong"}
            for headers in (good, bad, {}):
                response = await http.post("/api/v1/recovery/reset", headers=headers)
                bodies.append(response.text)
                response = await http.post(
                    "/api/v1/recovery/trigger", json={"action": "nope", "target": "all"}, headers=headers
                )
                bodies.append(response.text)
            # An alert that the (unreachable) webhook fails to take: logged, but never with its URL.
            stack.breaker("llama").open_for(3600, "test")
            hub = stack.runtime.live
            await until(lambda: hub.webhooks.failed >= 1, "the webhook to give up")
            spec = (await http.get("/openapi.json")).json()
            for path, ops in spec["paths"].items():
                if "get" in ops and "{" not in path and path != "/api/v1/events":
                    bodies.append((await http.get(path)).text)
            bodies.append((await http.get("/health/models/qwen")).text)
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "webhook http://127.0.0.1:9: alert CircuitBreakerOpen not delivered" in caplog.text
    for secret in (TOKEN, HOOK_SECRET):
        assert secret not in logged
        for body in bodies:
            assert secret not in body
    assert len(bodies) > 10
