"""Seed 004's pre-promotion checklist (``brownout check --url``) and ``brownout status --url``.

The commands run as real subprocesses against the app on uvicorn (127.0.0.1) over fake model
servers; :func:`brownout.checks.run_checks` is also called directly (in a thread, since it is a
blocking client and the server runs in this test's loop) for finer assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from brownout.checks import CheckResult, run_checks
from brownout.config import BrownoutConfig, load_config
from brownout.policies.cache import Cache, CacheConfig
from brownout.server.check import cache_selftest, config_summary
from support.live import live_stack
from support.stack import make_config

TRIP: dict[str, Any] = {"circuit_breaker": {"minimum_calls": 2, "window_size": 4, "timeout": 3600}}
NAMES = ["JSON hard guard", "circuit breakers", "cache LRU+TTL", "LLM health", "durable writes"]


async def cli(*args: str) -> tuple[int, str]:
    """Run ``python -m brownout ARGS``; returns the exit code and stdout + stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "brownout",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    assert [r.name for r in results] == NAMES
    return {r.name: r for r in results}


# ------------------------------------------------------------------------------------ the self-test


class NeverExpires(Cache[Any, Any]):
    """A broken cache: whatever the TTL, entries live for ever."""

    def set(self, key: Any, value: Any, *, ttl: float | None = None, delta: float = 0.0) -> None:
        super().set(key, value, ttl=1e12, delta=delta)


class Unbounded(Cache[Any, Any]):
    """A broken cache: it never evicts."""

    def __len__(self) -> int:
        return super().__len__() + 1


async def test_the_cache_selftest_passes_on_the_real_cache() -> None:
    config = BrownoutConfig()
    live: Cache[Any, Any] = Cache("briefs", CacheConfig(max_entries=1000, ttl=600.0))
    result = await cache_selftest(config, live)
    assert result["ok"] is True, result
    assert result["class"] == "brownout.policies.cache.Cache"
    assert result["ttl_seconds"] == 600.0
    assert [s["name"] for s in result["steps"]] == [
        "enabled",
        "live settings",
        "fresh hit",
        "hit before ttl",
        "expired after ttl",
        "regenerated (set)",
        "regenerated (fetch)",
        "lru eviction",
        "sweep",
    ]
    assert live.stats().hits == live.stats().misses == 0  # the live cache was not touched


async def test_the_cache_selftest_catches_a_cache_that_never_expires() -> None:
    live = NeverExpires("briefs", CacheConfig(max_entries=1000, ttl=600.0))
    result = await cache_selftest(BrownoutConfig(), live)
    failed = {s["name"] for s in result["steps"] if not s["ok"]}
    assert result["ok"] is False
    assert {"expired after ttl", "regenerated (fetch)", "sweep"} <= failed
    assert "fresh hit" not in failed


async def test_the_cache_selftest_catches_wrong_settings_and_a_disabled_cache() -> None:
    config = load_config(None, environ={"BROWNOUT__CACHE__ENABLED": "false"})
    live: Cache[Any, Any] = Cache("briefs", CacheConfig(max_entries=10, ttl=600.0))
    result = await cache_selftest(config, live)
    failed = {s["name"] for s in result["steps"] if not s["ok"]}
    assert failed == {"enabled", "live settings"}  # max 10 is not the configured 1000
    broken = await cache_selftest(BrownoutConfig(), Unbounded("x", CacheConfig(max_entries=1000)))
    assert {s["name"] for s in broken["steps"] if not s["ok"]} == {"lru eviction", "sweep"}


def test_the_config_summary_holds_no_secret(tmp_path: Path) -> None:
    secrets = ["adm1n-s3cret", "sk-model-key-123", "dbpassw0rd", "hooktoken42"]
    config = make_config(
        dict.fromkeys(("qwen", "mistral", "llama"), "http://127.0.0.1:9/v1?key=x"),
        tmp_path / "x.db",
        {
            "server": {"admin_token": secrets[0]},
            "models": {
                "roles": {
                    "qwen": {"endpoints": [{"url": "http://user:pw@10.1.2.3:8000/p", "api_key": secrets[1]}]}
                }
            },
            "database": {"url": f"postgresql+asyncpg://brief:{secrets[2]}@db.internal/briefs"},
            "webhooks": {
                "endpoints": [{"url": f"https://hooks.example/services/{secrets[3]}", "format": "slack"}]
            },
        },
    )
    summary = config_summary(config)
    text = json.dumps(summary)
    for secret in [*secrets, "user:pw", "key=x"]:
        assert secret not in text
    assert summary["server"]["admin_token_set"] is True
    assert summary["models"]["qwen"]["endpoints"] == ["http://10.1.2.3:8000"]
    assert summary["database"] == {"driver": "postgresql+asyncpg"}
    assert summary["webhooks"] == {"endpoints": 1}
    assert summary["json_guard"]["max_retries"] == 3


# ------------------------------------------------------------------------------------ brownout check


async def test_a_healthy_server_is_safe_to_promote(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack:
        before = sum(f.chat_requests for f in stack.fakes.values())
        code, out = await cli("check", "--url", stack.url)
        assert code == 0, out
        for name in NAMES:
            assert f"PASS {name}" in out
        assert out.strip().endswith("safe to promote")
        assert "PASS JSON hard guard: enabled, 3 retries" in out
        assert "PASS circuit breakers: all 3 closed (llama, mistral, qwen)" in out
        assert "expiry and regeneration verified (9 steps)" in out
        assert "PASS LLM health: all 3 healthy" in out
        assert "PASS durable writes: no acknowledged write lost" in out
        # The checks only read: no breaker moved, no brief was served, nothing was cached.
        assert all(stack.breaker(r).state.value == "closed" for r in ("qwen", "mistral", "llama"))
        service = stack.runtime.service
        assert service is not None
        assert service.cache.stats().size == 0
        # One test inference per model, from /health/llm.
        assert sum(f.chat_requests for f in stack.fakes.values()) - before == 3


async def test_an_unsafe_server_names_every_failed_check(tmp_path: Path) -> None:
    async with live_stack(tmp_path, {**TRIP, "json_guard": {"max_retries": 2}}) as stack:
        stack.fakes["llama"].set("error")
        stack.breaker("llama").open_for(3600, "test")
        results = by_name(await asyncio.to_thread(run_checks, stack.url, timeout=30.0))
        assert results["JSON hard guard"].ok is False
        assert results["JSON hard guard"].detail == "max_retries 2 < 3"
        assert results["circuit breakers"].ok is False
        assert results["circuit breakers"].detail == "not closed: llama=open"
        assert results["cache LRU+TTL"].ok is True
        assert results["LLM health"].ok is False
        assert results["LLM health"].detail == "unhealthy: llama (circuit_breaker_open)"
        assert results["durable writes"].ok is True

        code, out = await cli("check", "--url", stack.url, "--json")
        assert code == 1
        report = json.loads(out)
        assert report["safe"] is False
        assert [c["name"] for c in report["checks"] if not c["ok"]] == [
            "JSON hard guard",
            "circuit breakers",
            "LLM health",
        ]

        code, out = await cli("check", "--url", stack.url)
        assert code == 1
        assert "NOT safe to promote: failed: JSON hard guard, circuit breakers, LLM health" in out


async def test_a_model_failing_its_test_inference_fails_the_health_check(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack:
        stack.fakes["mistral"].set("error")
        results = by_name(await asyncio.to_thread(run_checks, stack.url, timeout=30.0))
        assert results["circuit breakers"].ok is True  # probes do not count against the breakers
        assert results["LLM health"].ok is False
        assert results["LLM health"].detail.startswith("unhealthy: mistral (")


async def test_an_unreachable_server_fails_every_check() -> None:
    from brownout.chaos.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    results = by_name(await asyncio.to_thread(run_checks, url, timeout=5.0))
    for result in results.values():
        assert result.ok is False
        assert result.detail.startswith(f"cannot reach {url}: ConnectError")


# ------------------------------------------------------------------------------------ brownout status


async def test_status_prints_the_live_state(tmp_path: Path) -> None:
    async with live_stack(tmp_path, TRIP) as stack:
        stack.breaker("llama").open_for(3600, "test")
        code, out = await cli("status", "--url", stack.url)
        assert code == 0, out
        assert f"brownout at {stack.url}" in out
        for expected in ("system mode", "queue depth", "0 of 500, 0 running", "write spool", "database"):
            assert expected in out
        rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 5}
        assert "healthy" in rows["qwen"]
        assert "closed" in rows["qwen"]
        assert "unhealthy" in rows["llama"]
        assert "open" in rows["llama"]

        code, out = await cli("status", "--url", stack.url, "--json")
        assert code == 0
        state = json.loads(out)
        assert state["breakers"] == {"qwen": "closed", "mistral": "closed", "llama": "open"}
        assert state["models"]["llama"]["status"] == "unhealthy"


async def test_status_of_an_unreachable_server_exits_1() -> None:
    from brownout.chaos.servers import free_port

    code, out = await cli("status", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert code == 1
    assert "cannot read the status of" in out


@pytest.mark.parametrize("path", ["/api/v1/config/summary", "/api/v1/selftest/cache", "/api/v1/status"])
async def test_the_check_routes_are_read_only_gets(tmp_path: Path, path: str) -> None:
    import httpx

    async with live_stack(tmp_path) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        assert (await http.get(path)).status_code == 200
        assert (await http.post(path)).status_code == 405
