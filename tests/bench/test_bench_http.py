"""``brownout bench http``'s parts (brownout.bench.http): the processes it starts and waits for, the bare
FastAPI target (brownout.bench._bare) it compares with, and how it reads wrk's report.

wrk itself is stood in for by a script that prints a report in wrk's format, so what is checked is
the reading, on every unit wrk uses; the whole benchmark runs with ``brownout bench http``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from brownout.bench import http as bench_http
from brownout.bench._bare import make_app

ANSWER = {"brief": {"style": "fresh"}, "served_mode": "fast", "cached": True}


async def test_the_bare_target_validates_the_request_and_returns_the_answer() -> None:
    transport = httpx.ASGITransport(app=make_app(ANSWER))
    async with httpx.AsyncClient(transport=transport, base_url="http://bare") as http:
        good = await http.post("/v1/briefs", json={"text": "lemon and sea", "mode": "fast"})
        assert (good.status_code, good.json()) == (200, ANSWER)
        bad = await http.post("/v1/briefs", json={"text": "lemon and sea", "mode": "fastest"})
        assert bad.status_code == 422  # the same request model as brownout's endpoint
        assert (await http.get("/health")).json() == {"status": "ok"}


def test_a_target_process_is_served_until_the_block_ends(tmp_path: Path) -> None:
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps(ANSWER))
    port = bench_http._free_port()
    args = [sys.executable, "-m", "brownout.bench._bare", "--port", str(port), "--answer", str(answer)]
    url = f"http://127.0.0.1:{port}"
    with bench_http._process(args, f"{url}/health", log=tmp_path / "bare.log"):
        reply = httpx.post(f"{url}/v1/briefs", json={"text": "iris", "mode": "fast"}, timeout=10.0)
        assert reply.json() == ANSWER
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2.0)  # stopped with its block


def test_a_target_that_exits_before_it_is_ready_is_reported(tmp_path: Path) -> None:
    args = [sys.executable, "-c", "raise SystemExit(3)"]
    with (
        pytest.raises(RuntimeError, match="exited with 3 before it was ready"),
        bench_http._process(args, f"http://127.0.0.1:{bench_http._free_port()}/health", timeout=10.0),
    ):
        pass


REPORT = """Running 2s test @ http://127.0.0.1:9/v1/briefs
  1 threads and 4 connections
  Latency Distribution
     50%  {p50}
     75%    2.00ms
     90%    3.00ms
     99%  {p99}
  1234 requests in 2.00s, 1.00MB read
{non2xx}Requests/sec:   617.25
Transfer/sec:    512.00KB
"""


def fake_wrk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, report: str) -> Path:
    """A ``wrk`` first on PATH that records its arguments and prints ``report``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "report.txt").write_text(report)
    wrk = bin_dir / "wrk"
    wrk.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args.txt\ncat {tmp_path}/report.txt\n')
    wrk.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return tmp_path / "args.txt"


@pytest.mark.parametrize(
    ("p50", "p99", "expected"),
    [("850.00us", "1.50ms", (0.85, 1.5)), ("1.20ms", "1.01s", (1.2, 1010.0))],
)
def test_wrk_s_report_is_read_in_milliseconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p50: str, p99: str, expected: tuple[float, float]
) -> None:
    args = fake_wrk(tmp_path, monkeypatch, REPORT.format(p50=p50, p99=p99, non2xx=""))
    body = json.dumps({"text": "it's fresh", "mode": "fast"})
    result = bench_http._wrk("http://127.0.0.1:9/v1/briefs", body, 4, 2, tmp_path)
    assert result == {"rps": 617.2, "p50_ms": expected[0], "p99_ms": expected[1], "non_2xx": 0.0}
    assert args.read_text().split() == [
        "-t1",
        "-c4",
        "-d2s",
        "--latency",
        "-s",
        str(tmp_path / "post.lua"),
        "http://127.0.0.1:9/v1/briefs",
    ]
    # The body goes into wrk's script with its quote escaped for Lua.
    assert 'wrk.body = \'{"text": "it\\\'s fresh"' in (tmp_path / "post.lua").read_text()


def test_refused_requests_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = REPORT.format(p50="1.00ms", p99="2.00ms", non2xx="  Non-2xx or 3xx responses: 17\n")
    fake_wrk(tmp_path, monkeypatch, report)
    assert bench_http._wrk("http://127.0.0.1:9/", "{}", 1, 1, tmp_path)["non_2xx"] == 17.0


def test_without_wrk_the_benchmark_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_http.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y wrk"):
        bench_http.run(connections=1, seconds=1)
