"""``brownout serve`` sends its traces to a real OTLP/HTTP receiver (tests/support/otlp.py).

One server process, started as an operator would (``OTEL_EXPORTER_OTLP_ENDPOINT`` set, nothing in the
config), on fake model servers: a creative brief with the hinter down, and a gateway request whose
group answers 500 and falls back to another group. Their traces arrive as protobuf over HTTP, are
decoded with ``opentelemetry-proto`` and must have the span tree, the GenAI attributes and ours.
Without the variable, the same server sends nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from brownout.chaos.fakellm import FakeLLM
from brownout.llm.local import free_port
from support.otlp import OtlpReceiver, ReceivedSpan, tree
from support.wait import until


def _config(
    tmp_path: Path,
    port: int,
    fakes: Mapping[str, FakeLLM],
    broken: FakeLLM,
    backup: FakeLLM,
    telemetry: Mapping[str, Any] | None = None,
) -> Path:
    config: dict[str, Any] = {
        "server": {"port": port},
        "models": {
            "local": {"enabled": False},
            "health_interval": 0.5,
            "health_timeout": 1.0,
            "roles": {
                role: {"endpoints": [{"url": fake.url, "model": role}], "timeout": 2.0}
                for role, fake in fakes.items()
            },
        },
        "cache": {"enabled": False},
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")},
        "gateway": {
            "groups": {
                "primary": {"endpoints": [{"url": broken.url}], "fallbacks": ["backup"], "max_attempts": 1},
                "backup": {"endpoints": [{"url": backup.url}]},
            }
        },
    }
    if telemetry is not None:
        config["telemetry"] = dict(telemetry)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def _serving(
    config: Path, port: int, log: Path, env: Mapping[str, str]
) -> AsyncIterator[httpx.AsyncClient]:
    """``brownout serve --log-format json`` until the block ends, then SIGINT (which flushes spans)."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "brownout",
            "serve",
            "--config",
            str(config),
            "--log-format",
            "json",
            stdout=out,
            stderr=out,
            env=dict(env),
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as http:
                for _ in range(300):
                    with contextlib.suppress(httpx.HTTPError):
                        await http.get("/api/v1/status")
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(_read(log))
                yield http
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 30) == 0, _read(log)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, **extra}


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


async def _downshifted_brief(http: httpx.AsyncClient) -> tuple[dict[str, Any], str, str]:
    """A creative brief once the server has seen the hinter down: the answer, its trace and parent ids."""
    for _ in range(50):
        header, trace_id, parent = _traceparent()
        response = await http.post(
            "/v1/briefs",
            json={"text": "smoky vetiver and pink pepper", "mode": "creative"},
            headers={"traceparent": header},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["downshifted"]:
            return body, trace_id, parent
        await asyncio.sleep(0.2)  # the server's health loop has not probed the hinter yet
    raise AssertionError("the hinter was never seen down")


async def test_a_downshifted_brief_and_a_gateway_failover_arrive_as_span_trees(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    fakes["llama"].set(mode="down")
    port = free_port()
    log = tmp_path / "serve.log"
    async with FakeLLM(mode="error", status=500) as broken, FakeLLM(model="backup-model") as backup:
        config = _config(tmp_path, port, fakes, broken, backup)
        with OtlpReceiver() as receiver:
            env = _env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
            async with _serving(config, port, log, env) as http:
                body, brief_trace, caller_span = await _downshifted_brief(http)
                header, chat_trace, _ = _traceparent()
                chat = await http.post(
                    "/v1/chat/completions",
                    json={"model": "primary", "messages": [{"role": "user", "content": "a citrus scent"}]},
                    headers={"traceparent": header},
                )
                assert chat.status_code == 200, chat.text
                assert chat.headers["x-brownout-fallbacks"] == "primary>backup"
                await until(lambda: len(receiver.trace(chat_trace)) >= 3, "the gateway's trace")
                sent_upstream = backup.last_headers.get("traceparent", "")
            # -- the brief: request -> stage -> model call -> attempt, under the caller's span
            assert body["served_mode"] == "balanced"
            spans = receiver.trace(brief_trace)
            assert tree(spans) == [
                "POST /v1/briefs",
                "  stage generate",
                "    chat qwen",
                "      attempt 1 qwen",
                "  stage validate",
                "    chat mistral",
                "      attempt 1 mistral",
            ], tree(spans)
            root = _one(spans, "POST /v1/briefs")
            assert root.parent_id == caller_span  # the caller's traceparent is the parent
            assert root.kind == "server"
            assert root.resource["service.name"] == "brownout"
            assert root.attributes["http.response.status_code"] == 200
            assert root.attributes["brownout.requested_mode"] == "creative"
            assert root.attributes["brownout.served_mode"] == "balanced"
            assert root.attributes["brownout.downshifted"] is True
            assert root.attributes["brownout.reason"] == "llama unavailable"
            assert root.attributes["brownout.dimmer.level"] == 0
            downshift = dict(root.events)["brownout.mode_downshifted"]
            assert downshift["brownout.requested"] == "creative"
            assert downshift["brownout.served"] == "balanced"
            stage = _one(spans, "stage validate")
            assert stage.attributes["brownout.served_by"] == "model:mistral"
            call = _one(spans, "chat qwen")
            assert call.kind == "client"
            assert call.attributes["gen_ai.operation.name"] == "chat"
            assert call.attributes["gen_ai.provider.name"] == "openai"
            assert call.attributes["gen_ai.request.model"] == "qwen"
            assert call.attributes["gen_ai.response.model"] == "qwen"
            assert call.attributes["gen_ai.usage.input_tokens"] > 0
            assert call.attributes["gen_ai.usage.output_tokens"] > 0
            attempt = _one(spans, "attempt 1 qwen")
            assert attempt.attributes["brownout.breaker.state"] == "closed"
            assert attempt.attributes["server.address"] == "127.0.0.1"
            # -- the gateway: its request, the failed attempt on primary, the fallback's answer
            spans = receiver.trace(chat_trace)
            assert tree(spans) == ["POST /v1/chat/completions", "  chat primary", "  chat primary"], tree(
                spans
            )
            root = _one(spans, "POST /v1/chat/completions")
            assert root.attributes["brownout.fallbacks"] == "primary>backup"
            assert root.attributes["brownout.attempts"] == 2
            assert root.status == "unset"
            failed, served = sorted(
                (s for s in spans if s is not root), key=lambda s: s.attributes["brownout.attempt"]
            )
            assert failed.status == "error"
            assert failed.attributes["http.response.status_code"] == 500
            assert failed.attributes["brownout.served_group"] == "primary"
            assert failed.attributes["brownout.fallback"] is False
            assert served.status == "unset"
            assert served.attributes["brownout.served_group"] == "backup"
            assert served.attributes["brownout.fallback"] is True
            assert served.attributes["gen_ai.response.model"] == "primary"  # the fake echoes the model asked
            assert served.attributes["gen_ai.usage.output_tokens"] > 0
            # The upstream got the attempt's own span as its parent.
            assert sent_upstream == f"00-{chat_trace}-{served.span_id}-01"
    # -- the logs join the traces: the brief's access line carries its trace and span ids
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "uvicorn.access" and line["path"] == "/v1/briefs"]
    assert any(line.get("trace_id") == brief_trace for line in access), access
    assert all(line["path"] not in ("/api/v1/status", "/health") for line in lines if "path" in line)


async def test_without_the_variable_nothing_is_exported(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    async with FakeLLM(mode="error", status=500) as broken, FakeLLM() as backup:
        with OtlpReceiver() as receiver:
            # The config names the receiver but does not enable tracing: an exporter, were one made
            # anyway, would send there.
            config = _config(tmp_path, port, fakes, broken, backup, {"endpoint": receiver.endpoint})
            async with _serving(config, port, log, _env(OTEL_BSP_SCHEDULE_DELAY="100")) as http:
                header, _, _ = _traceparent()
                brief = await http.post(
                    "/v1/briefs", json={"text": "amber", "mode": "creative"}, headers={"traceparent": header}
                )
                assert brief.status_code == 200
                chat = await http.post(
                    "/v1/chat/completions",
                    json={"model": "primary", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"traceparent": header},
                )
                assert chat.status_code == 200
                # Nothing to join: no span is current, so no traceparent goes upstream.
                assert "traceparent" not in backup.last_headers
                assert "traceparent" not in fakes["qwen"].last_headers
            assert receiver.posts == 0  # the server has exited: anything buffered would have been sent
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines
    assert not any("trace_id" in line for line in lines)
