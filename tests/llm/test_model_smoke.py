"""Smoke tests on the real embedded model (SmolLM2-135M via llama.cpp): ``scripts/test -m model``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from brownout.briefs.schema import CreativeBrief
from brownout.config import load_config
from brownout.llm.local import free_port
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
            # The start-up check learned that the server applies a JSON schema (it used to be cut
            # short by its token budget and learn nothing).
            assert app.state.runtime.service.constraint_checks == dict.fromkeys(
                ("qwen", "mistral", "llama"), "applied"
            )
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


def test_the_openai_client_chats_with_a_default_serve_through_the_local_group(tmp_path: Path) -> None:
    """A fresh install, no config file: ``brownout serve`` offers the embedded model as ``local``, and
    the official OpenAI client gets an answer from it, whole and streamed."""
    import openai

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    # No configuration at all: the working directory holds the default database and spool files; only
    # the port is chosen (another server may hold 8000 on a shared machine).
    proc = subprocess.Popen(
        [sys.executable, "-m", "brownout", "serve", "--port", str(port)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own threads 10 nice steps below its models (the default only when a model runs several
        # threads; asked for here, with the embedded one-thread layout, to see it applied).
        env={**{k: v for k, v in os.environ.items() if not k.startswith("BROWNOUT")}, **NICE},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # the server is up once it answers; the model servers start before it listens
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "brownout serve did not start within 120 s"
            time.sleep(0.2)
        if sys.platform.startswith("linux"):
            check_models_run_above_the_service(proc.pid)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120, max_retries=0)
        assert "local" in [m.id for m in client.models.list()]
        messages: list[Any] = [{"role": "user", "content": "Name one flower."}]
        whole = client.chat.completions.create(model="local", messages=messages, max_tokens=24)
        assert (whole.choices[0].message.content or "").strip()
        stream = client.chat.completions.create(model="local", messages=messages, max_tokens=24, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces).strip()
        assert len(pieces) > 1  # token by token, not one block
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


NICE = {"BROWNOUT__MODELS__LOCAL__API_NICE": "10"}


def check_models_run_above_the_service(pid: int) -> None:
    """``models.local.api_nice`` (10 here): every thread of the service runs 10 nice steps below
    every thread of its model server (one, shared by the three roles), which keeps the priority the
    service started with."""
    base = os.getpriority(os.PRIO_PROCESS, 0)

    def nices(p: int) -> set[int]:
        return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{p}/task")}

    deadline = time.monotonic() + 10
    while os.getpriority(os.PRIO_PROCESS, pid) != min(base + 10, 19):  # set once the app has started
        assert time.monotonic() < deadline, "the service's priority was not lowered"
        time.sleep(0.1)
    serving = "brownout.llm._serve_local"
    models = [c for c in children_of(pid) if serving in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(models) == 1
    for model in models:
        assert nices(model) == {base}
    service = nices(pid) - {base}  # the thread that starts the models keeps the original priority
    assert service == {min(base + 10, 19)}


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc; one that ends meanwhile is left out)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == str(pid):  # the field after the state: the parent
            found.append(int(name))
    return found
