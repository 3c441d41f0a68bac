"""``brownout bench http``: cached briefs against a bare FastAPI endpoint, with wrk, in one run.

Both targets run as their own uvicorn process on 127.0.0.1 and answer ``POST /v1/briefs`` with the
same JSON:

* ``bare-fastapi`` -- a FastAPI app whose endpoint validates the same request model and returns the
  brief JSON (the least a FastAPI service answering this request does);
* ``brownout-cached`` -- ``brownout serve`` (models: three fake OpenAI servers, so no model time is
  involved) after one warm-up request, so every measured request is a cache hit.

wrk (Debian package ``wrk``) drives each target in turn with the same connections, duration and
request body, and reports requests/s and latency percentiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

__all__ = ["run"]

_BODY = {"text": "A fresh summer scent with lemon and sea breeze for daytime", "mode": "fast"}

_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(
    args: list[str], ready_url: str, *, timeout: float = 30.0, log: Path | None = None
) -> Iterator[None]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{args[:4]} exited with {proc.returncode} before it was ready (log: {log})"
                )
            try:
                httpx.get(ready_url, timeout=1.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args[:4]} was not ready within {timeout}s (log: {log})") from None
                time.sleep(0.1)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def _wrk(url: str, body: str, connections: int, seconds: int, script_dir: Path) -> dict[str, float]:
    script = script_dir / "post.lua"
    script.write_text(_LUA.format(body=body.replace("'", "\\'")))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise RuntimeError(f"wrk printed no {label}% latency:\n{out}")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return {
        "rps": round(rps, 1),
        "p50_ms": round(pct("50"), 3),
        "p99_ms": round(pct("99"), 3),
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def run(connections: int = 16, seconds: int = 10) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], ...}`` (the ``--json`` output)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; install it with: apt-get install -y wrk")
    py = sys.executable
    body = json.dumps(_BODY)
    with tempfile.TemporaryDirectory(prefix="brownout-bench-http-") as tmp:
        tmpdir = Path(tmp)
        fake_ports = [_free_port() for _ in range(3)]
        config = {
            "server": {"max_body_bytes": 16384},
            "models": {
                "local": {"enabled": False},
                "health_interval": 3600,
                "roles": {
                    role: {"endpoints": [{"url": f"http://127.0.0.1:{port}", "model": role}]}
                    for role, port in zip(("qwen", "mistral", "llama"), fake_ports, strict=True)
                },
            },
            "database": {
                "url": f"sqlite+aiosqlite:///{tmpdir / 'bench.db'}",
                "spool_path": str(tmpdir / "bench-spool.db"),
            },
        }
        (tmpdir / "brownout.yaml").write_text(json.dumps(config))
        port = _free_port()
        rows: list[dict[str, Any]] = []
        with contextlib.ExitStack() as stack:
            for p in fake_ports:
                stack.enter_context(
                    _process(
                        [py, "-m", "brownout.chaos.fakellm", "--port", str(p)], f"http://127.0.0.1:{p}/health"
                    )
                )
            stack.enter_context(
                _process(
                    [
                        py,
                        "-m",
                        "brownout.cli",
                        "serve",
                        "--config",
                        str(tmpdir / "brownout.yaml"),
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    f"http://127.0.0.1:{port}/health",
                    log=tmpdir / "serve.log",
                )
            )
            url = f"http://127.0.0.1:{port}/v1/briefs"
            warm = httpx.post(url, json=_BODY, timeout=30.0)
            warm.raise_for_status()
            answer = warm.json()
            check = httpx.post(url, json=_BODY, timeout=30.0).json()
            if not check.get("cached"):
                raise RuntimeError(f"the warm-up answer was not cached: {check}")
            (tmpdir / "answer.json").write_text(json.dumps(answer))
            brownout = _wrk(url, body, connections, seconds, tmpdir)
        bare_port = _free_port()
        with _process(
            [
                py,
                "-m",
                "brownout.bench._bare",
                "--port",
                str(bare_port),
                "--answer",
                str(tmpdir / "answer.json"),
            ],
            f"http://127.0.0.1:{bare_port}/health",
        ):
            bare = _wrk(f"http://127.0.0.1:{bare_port}/v1/briefs", body, connections, seconds, tmpdir)
        rows.append({"target": "bare-fastapi", **bare})
        rows.append({"target": "brownout-cached", **brownout})
    return {
        "rows": rows,
        "connections": connections,
        "seconds": seconds,
        "brownout_vs_bare_rps": round(brownout["rps"] / bare["rps"], 3) if bare["rps"] else None,
        "cached_faster_than_bare": brownout["rps"] > bare["rps"] and brownout["p50_ms"] <= bare["p50_ms"],
    }
