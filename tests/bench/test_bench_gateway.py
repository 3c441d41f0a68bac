"""``brownout bench gateway`` (brownout.bench.gateway): its targets' command lines, headers and wrk
scripts, Portkey's install folder, the added latency and goals of its summary, and one short real run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from brownout.bench import gateway as bench

NODE = shutil.which("node")


def test_portkey_runs_headless_on_the_given_port_with_the_bind_shim_first(tmp_path: Path) -> None:
    shim = tmp_path / "bind.mjs"
    entry = tmp_path / "node_modules/@portkey-ai/gateway/build/start-server.js"
    args = bench.portkey_command(Path("/usr/bin/node"), entry, 43210, shim)
    assert args == ["/usr/bin/node", "--import", shim.as_uri(), str(entry), "--port=43210", "--headless"]


def test_portkey_is_installed_into_its_own_folder_without_dev_dependencies(tmp_path: Path) -> None:
    args = bench.portkey_install_command("/usr/bin/npm", tmp_path / "portkey")
    assert args[:2] == ["/usr/bin/npm", "install"]
    assert args[args.index("--prefix") + 1] == str(tmp_path / "portkey")
    assert "--omit=dev" in args
    assert args[-1] == bench.PORTKEY_PACKAGE == "@portkey-ai/gateway"


@pytest.mark.parametrize("upstream", ["http://127.0.0.1:5000", "http://127.0.0.1:5000/"])
def test_portkey_routes_to_the_upstream_as_an_openai_custom_host(upstream: str) -> None:
    headers = bench.portkey_headers(upstream)
    assert headers["x-portkey-provider"] == "openai"
    assert headers["x-portkey-custom-host"] == "http://127.0.0.1:5000/v1"
    assert headers["Authorization"].startswith("Bearer ")


def test_the_wrk_script_sends_the_body_and_every_header(tmp_path: Path) -> None:
    script = bench._script(
        tmp_path / "post.lua", {"x-portkey-custom-host": "http://127.0.0.1:5000/v1", "x-odd": 'a"b\\c'}
    )
    text = script.read_text()
    assert 'wrk.method = "POST"' in text
    assert 'wrk.headers["Content-Type"] = "application/json"' in text
    assert 'wrk.headers["x-portkey-custom-host"] = "http://127.0.0.1:5000/v1"' in text
    assert 'wrk.headers["x-odd"] = "a\\"b\\\\c"' in text  # quotes and backslashes escaped for Lua
    body = text.split("wrk.body = '", 1)[1].rsplit("'", 1)[0]
    assert json.loads(body)["model"] == "bench"
    plain = bench._script(tmp_path / "plain.lua").read_text()
    assert plain.count("wrk.headers[") == 1


def _fake_install(folder: Path, version: str) -> Path:
    package = folder / "node_modules/@portkey-ai/gateway"
    (package / "build").mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": bench.PORTKEY_PACKAGE, "version": version}))
    entry = package / "build/start-server.js"
    entry.write_text("")
    return entry


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_an_installed_portkey_is_found_with_its_version(tmp_path: Path) -> None:
    entry = _fake_install(tmp_path, "9.8.7")
    node, found, version = bench.ensure_portkey(tmp_path, install=False)
    assert (found, version) == (entry, "9.8.7")
    assert node.name.startswith("node")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_a_missing_portkey_is_not_installed_when_not_allowed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"not installed in .*installing was not allowed"):
        bench.ensure_portkey(tmp_path / "empty", install=False)
    assert not (tmp_path / "empty").exists()


def test_without_node_portkey_is_an_error_row_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_install(tmp_path, "1.0.0")
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"Node\.js is not installed"):
        bench.ensure_portkey(tmp_path)


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_the_bind_shim_keeps_a_server_without_a_host_on_127_0_0_1(tmp_path: Path) -> None:
    # Portkey's start-server.js listens the way this server does: a port, no host (every interface).
    shim = tmp_path / "bind.mjs"
    shim.write_text(bench._BIND_SHIM)
    server = tmp_path / "server.mjs"
    server.write_text(
        'import http from "node:http";\n'
        "const s = http.createServer(() => {});\n"
        "s.listen(0, undefined, () => { console.log(JSON.stringify(s.address())); s.close(); });\n"
    )
    assert NODE is not None
    done = subprocess.run(
        bench.portkey_command(Path(NODE), server, 0, shim)[:4],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "BROWNOUT_BENCH_HOST": "127.0.0.1"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["address"] == "127.0.0.1"


def _row(target: str, c: int, rps: float, p50: float, p99: float) -> dict[str, Any]:
    return {"target": target, "concurrency": c, "rps": rps, "p50_ms": p50, "p99_ms": p99, "error": None}


def test_the_summary_adds_latency_over_direct_and_judges_the_goals() -> None:
    rows = [
        _row("direct", 1, 47.0, 20.9, 22.4),
        _row("direct", 64, 2700.0, 23.4, 27.8),
        _row("brownout", 1, 46.0, 21.6, 23.0),
        _row("brownout", 64, 2650.0, 23.9, 30.8),
        _row("portkey", 1, 40.0, 23.5, 26.0),
        _row("portkey", 64, 880.0, 70.0, 90.0),
        *bench._failed("litellm", (1, 64), "skipped (--no-litellm)"),
    ]
    goals = bench._summary(rows, (1, 64))["goals"]
    by = {(r["target"], r["concurrency"]): r for r in rows}
    assert by[("brownout", 1)]["added_p50_ms"] == pytest.approx(0.7)
    assert by[("brownout", 64)]["added_p99_ms"] == pytest.approx(3.0)
    assert by[("portkey", 64)]["rps_vs_direct"] == pytest.approx(0.326)
    assert by[("litellm", 64)]["added_p99_ms"] is None
    assert goals["brownout_added_p50_at_most_1ms_c1"] is True
    assert goals["brownout_added_p50_at_most_1ms_c64"] is True
    assert "brownout_added_p99_ms_c1" not in goals  # one connection: no tail goal
    assert goals["brownout_added_p99_ms_c64"] == pytest.approx(3.0)
    assert goals["brownout_added_p99_at_most_2ms_c64"] is False
    assert goals["brownout_at_least_95pct_of_direct_c64"] is True
    assert goals["brownout_rps_vs_portkey_c64"] == 3.0
    assert goals["brownout_rps_vs_litellm_c64"] is None


@pytest.mark.slow
def test_bench_gateway_reports_every_target_and_says_why_one_is_missing() -> None:
    result = bench.run(seconds=1, rounds=1, concurrencies=(1, 4), litellm=False, portkey=False)
    rows = {(r["target"], r["concurrency"]): r for r in result["rows"]}
    targets = ("direct", "brownout", "portkey", "litellm")
    assert set(rows) == {(t, c) for t in targets for c in (1, 4)}
    for target in ("direct", "brownout"):
        for c in (1, 4):
            row = rows[(target, c)]
            assert row["error"] is None
            assert row["rps"] > 0
            assert row["non_2xx"] == 0
            assert row["cpu_ms_per_req"] > 0
    assert rows[("litellm", 1)]["error"] == "skipped (--no-litellm)"
    assert rows[("portkey", 4)]["error"] == "skipped (--no-portkey)"
    assert rows[("litellm", 1)]["rps"] is None
    assert result["goals"]["brownout_rps_vs_litellm_c4"] is None
