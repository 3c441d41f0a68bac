"""Smoke tests on the real embedded model (SmolLM2-135M via llama.cpp): ``scripts/test -m model``."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from brownout.briefs.schema import CreativeBrief
from brownout.config import load_config
from brownout.server.app import create_app

pytestmark = pytest.mark.model


async def test_serve_on_the_embedded_model_returns_a_schema_valid_brief(tmp_path: Path) -> None:
    config = load_config(
        None,
        environ={
            "BROWNOUT__DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
            "BROWNOUT__DATABASE__SPOOL_PATH": str(tmp_path / "spool.db"),
        },
    )
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://brownout", timeout=120) as client:
            health = (await client.get("/health")).json()
            assert {m["status"] for m in health["models"].values()} == {"healthy"}
            for mode in ("fast", "creative"):
                r = await client.post(
                    "/v1/briefs", json={"text": "Warm amber and vanilla for winter evenings", "mode": mode}
                )
                assert r.status_code == 200, r.text
                body = r.json()
                CreativeBrief.model_validate(body["brief"])
                assert body["requested_mode"] == mode
                assert body["stages"][0]["stage"] == "generate"
            metrics = (await client.get("/metrics")).text
            assert 'llm_requests_total{model="qwen"}' in metrics
        runtime = app.state.runtime
        pids = [s.status()["pid"] for s in runtime.local.values()]
    # Leaving the lifespan stopped every model server.
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bench_guard_runs_on_the_real_model() -> None:
    from brownout.bench import guard

    result = guard.run(prompts=3, threads=2)
    assert result["prompts"] == 3
    assert result["served_valid_share"] == 1.0
    assert result["generator_calls_per_request"] >= 1.0
