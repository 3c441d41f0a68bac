"""``brownout bench gateway``: direct, through brownout, Portkey's gateway and LiteLLM's proxy, in one run.

One fake OpenAI-compatible upstream (:mod:`brownout.bench._upstream`: a bare ASGI app on uvicorn that
answers after a fixed delay, 20 ms by default) serves four targets in turn, each its own process on
127.0.0.1:

* ``direct`` -- the upstream itself;
* ``brownout`` -- ``brownout serve`` with one gateway model group on the upstream (the three brief
  roles point at it too, so no local model starts; their health probes are hourly);
* ``portkey`` -- Portkey's open-source AI gateway (npm ``@portkey-ai/gateway``) on the machine's
  Node.js, installed with npm into a folder of its own (default ``~/.cache/brownout/portkey``, or
  ``BROWNOUT_PORTKEY_DIR``), headless. It routes by request headers: ``x-portkey-provider: openai``
  and ``x-portkey-custom-host`` naming the upstream (Portkey trusts 127.0.0.1 as a custom host by
  default). Its command line has no host option and it listens on every interface, so a few lines
  of JavaScript loaded first (``node --import``) bind it to 127.0.0.1;
* ``litellm`` -- LiteLLM's proxy (``litellm --config``) with the upstream as an ``openai/`` model,
  installed into a virtual environment of its own (default ``~/.cache/brownout/litellm-venv``, or
  ``BROWNOUT_LITELLM_VENV``) so its pins never touch ours, run offline: telemetry off, the bundled
  model cost map, no database, a master key (it refuses to start without one).

All of them stay up for the whole run. After a warm-up, wrk drives each in turn with the same
``POST /v1/chat/completions`` body at each concurrency for the same time, ``rounds`` times over, so
load from elsewhere on the machine falls on every target alike; a row is the median of its rounds
(each round's figures are kept in ``rounds``). Per row: requests/s, p50 and p99 latency, the p50
and p99 added over ``direct`` at that concurrency, and the CPU time of the target's server process (with its
children) per request, read from ``/proc/<pid>/stat`` around each wrk run. For ``direct`` that CPU is
the upstream's own. A target that cannot be installed or started gets rows with an ``error`` saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "DEFAULT_LITELLM_VENV",
    "DEFAULT_PORTKEY_DIR",
    "PORTKEY_PACKAGE",
    "ensure_litellm",
    "ensure_portkey",
    "portkey_command",
    "portkey_install_command",
    "portkey_headers",
    "run",
]

DEFAULT_LITELLM_VENV = Path.home() / ".cache" / "brownout" / "litellm-venv"
"""Where the bench installs LiteLLM's proxy unless ``BROWNOUT_LITELLM_VENV`` says otherwise."""

DEFAULT_PORTKEY_DIR = Path.home() / ".cache" / "brownout" / "portkey"
"""Where the bench installs Portkey's gateway unless ``BROWNOUT_PORTKEY_DIR`` says otherwise."""

PORTKEY_PACKAGE = "@portkey-ai/gateway"
"""Portkey's open-source AI gateway on npm."""

_PORTKEY_ENTRY = Path("node_modules", "@portkey-ai", "gateway", "build", "start-server.js")

# Portkey's start-server.js calls listen(port) without a host, which listens on every interface; its
# command line offers only --port. Loaded first with ``node --import``, this binds such a listen to
# the host the bench gives instead.
_BIND_SHIM = """import net from "node:net";
const host = process.env.BROWNOUT_BENCH_HOST || "127.0.0.1";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (port, ...rest) {
  if (typeof port === "number" && (rest.length === 0 || rest[0] == null || typeof rest[0] === "function")) {
    if (rest.length > 0 && rest[0] == null) rest.shift();
    return listen.call(this, port, host, ...rest);
  }
  return listen.call(this, port, ...rest);
};
"""

_GROUP = "bench"
_BODY = {
    "model": _GROUP,
    "messages": [{"role": "user", "content": "A fresh summer scent with lemon and sea breeze"}],
    "max_tokens": 64,
}
_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{headers}wrk.body = '{body}'
"""
_TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(
    args: Sequence[str],
    ready_url: str,
    *,
    log: Path,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` in a session of its own until ``ready_url`` answers; stop the whole group after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{args[0]} exited with {proc.returncode} before it was ready: {_tail(log)}"
                    )
                try:
                    httpx.get(ready_url, timeout=2.0, headers=headers, trust_env=False)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{args[0]} was not ready within {timeout:g}s: {_tail(log)}"
                        ) from None
                    time.sleep(0.2)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def _cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of every process in the process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # After the command name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime ...
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def _wrk(url: str, concurrency: int, seconds: int, script: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout

    def number(pattern: str) -> float:
        m = re.search(pattern, out)
        if m is None:
            raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{out}")
        return float(m.group(1))

    def pct(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise RuntimeError(f"wrk printed no {label}% latency:\n{out}")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(number(r"(\d+) requests in")),
        "rps": round(number(r"Requests/sec:\s*([\d.]+)"), 1),
        "p50_ms": round(pct("50"), 3),
        "p99_ms": round(pct("99"), 3),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
    }


@dataclass
class _Target:
    """A server under test: where to send requests, its process (for CPU), its wrk script."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    script: Path
    headers: dict[str, str] | None = None


def _warm(target: _Target, count: int = 20) -> None:
    with httpx.Client(trust_env=False, timeout=60.0) as client:
        for _ in range(count):
            r = client.post(target.url, json=_BODY, headers=target.headers)
            if r.status_code != 200:
                raise RuntimeError(
                    f"{target.name} answered the warm-up with HTTP {r.status_code}: {r.text[:300]}"
                )


def _once(target: _Target, concurrency: int, seconds: int) -> dict[str, Any]:
    before = _cpu_seconds(target.proc.pid)
    result = _wrk(target.url, concurrency, seconds, target.script)
    result["cpu_seconds"] = _cpu_seconds(target.proc.pid) - before
    return result


def _row(name: str, concurrency: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of a target at a concurrency: medians, and each round's figures."""
    served = sum(r["requests"] for r in runs)
    cpu = sum(r["cpu_seconds"] for r in runs)
    return {
        "target": name,
        "concurrency": concurrency,
        "rps": round(statistics.median(r["rps"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
        "requests": served,
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "cpu_ms_per_req": round(cpu * 1000 / max(1, served), 3),
        "rounds": [{k: r[k] for k in ("rps", "p50_ms", "p99_ms")} for r in runs],
        "error": None,
    }


def _failed(target: str, concurrencies: Sequence[int], why: str) -> list[dict[str, Any]]:
    return [
        {"target": target, "concurrency": c, "rps": None, "p50_ms": None, "p99_ms": None, "error": why}
        for c in concurrencies
    ]


def _script(path: Path, headers: dict[str, str] | None = None) -> Path:
    """A wrk script that POSTs the bench's body with ``headers`` besides its Content-Type."""
    body = json.dumps(_BODY, separators=(",", ":"))
    lines = "".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}\n" for k, v in (headers or {}).items())
    path.write_text(_LUA.format(body=body.replace("'", "\\'"), headers=lines))
    return path


def _lua_string(text: str) -> str:
    """``text`` as a Lua string literal (JSON's escapes of quotes and backslashes are Lua's too)."""
    return json.dumps(text, ensure_ascii=False)


def ensure_litellm(venv: Path, *, install: bool = True, timeout: float = 1800.0) -> tuple[Path, str]:
    """The ``litellm`` executable in ``venv`` and its version, installing ``litellm[proxy]`` there first
    when missing (and ``install``). Raises RuntimeError saying why it is not usable."""
    exe = venv / "bin" / "litellm"
    python = venv / "bin" / "python"
    if not exe.exists():
        if not install:
            raise RuntimeError(f"LiteLLM is not installed in {venv} (and installing was not allowed)")
        venv.parent.mkdir(parents=True, exist_ok=True)
        if not python.exists():
            # The base interpreter, not ours: LiteLLM's venv must not see brownout's packages.
            base = getattr(sys, "_base_executable", sys.executable)
            made = subprocess.run(
                [base, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
            )
            if made.returncode != 0:
                raise RuntimeError(
                    f"cannot create a virtual environment in {venv}: {made.stderr.strip()[-500:]}"
                )
        try:
            pip = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "litellm[proxy]"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip install 'litellm[proxy]' took over {timeout:g}s") from None
        if pip.returncode != 0 or not exe.exists():
            lines = [ln for ln in pip.stderr.splitlines() if not ln.startswith("WARNING: Location")]
            raise RuntimeError("pip install 'litellm[proxy]' failed: " + " | ".join(lines[-6:]))
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    return exe, version or "unknown"


def ensure_portkey(folder: Path, *, install: bool = True, timeout: float = 900.0) -> tuple[Path, Path, str]:
    """Node.js, Portkey's ``start-server.js`` in ``folder`` and its version, installing
    :data:`PORTKEY_PACKAGE` there with npm first when missing (and ``install``). Raises RuntimeError
    saying why it is not usable."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("Node.js is not installed (Portkey's gateway runs on it)")
    entry = folder / _PORTKEY_ENTRY
    if not entry.exists():
        if not install:
            raise RuntimeError(
                f"Portkey's gateway is not installed in {folder} (and installing was not allowed)"
            )
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed (the bench installs Portkey's gateway with it)")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                portkey_install_command(npm, folder),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=folder,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"npm install {PORTKEY_PACKAGE} took over {timeout:g}s") from None
        if done.returncode != 0 or not entry.exists():
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            raise RuntimeError(f"npm install {PORTKEY_PACKAGE} failed: " + " | ".join(lines[-6:]))
    try:
        version = str(json.loads(entry.parents[1].joinpath("package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        version = "unknown"
    return Path(node), entry, version


def portkey_install_command(npm: str, folder: Path) -> list[str]:
    """npm's command line that installs Portkey's gateway into ``folder`` (its own ``node_modules``),
    without development dependencies, audit or funding requests."""
    return [
        npm,
        "install",
        "--prefix",
        str(folder),
        "--omit=dev",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        PORTKEY_PACKAGE,
    ]


def portkey_command(node: Path, entry: Path, port: int, shim: Path) -> list[str]:
    """The command line that runs Portkey's gateway on ``port``: headless (no web console), with
    ``shim`` (:data:`_BIND_SHIM`, bound to one host) loaded first."""
    return [str(node), "--import", shim.as_uri(), str(entry), f"--port={port}", "--headless"]


def portkey_headers(upstream: str) -> dict[str, str]:
    """The headers that route a request through Portkey's gateway to ``upstream``, an OpenAI-compatible
    server: provider ``openai`` at the custom host ``{upstream}/v1``, with a key it passes along."""
    return {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"{upstream.rstrip('/')}/v1",
        "Authorization": "Bearer sk-upstream-unused",
    }


def run(
    seconds: int = 5,
    concurrencies: Sequence[int] = (1, 20, 64),
    delay_ms: float = 20.0,
    *,
    rounds: int = 3,
    litellm: bool = True,
    install_litellm: bool = True,
    litellm_venv: Path | None = None,
    portkey: bool = True,
    install_portkey: bool = True,
    portkey_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], ...}`` (the ``--json`` output).

    Every target stays up for the whole run and they take turns, ``rounds`` times over, for
    ``seconds`` per concurrency, so a burst of load from elsewhere on the machine hits all of them
    alike; each row reports the median of its rounds.
    """
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; install it with: apt-get install -y wrk")
    py = sys.executable
    venv = litellm_venv or Path(os.environ.get("BROWNOUT_LITELLM_VENV", DEFAULT_LITELLM_VENV))
    portkey_folder = portkey_dir or Path(os.environ.get("BROWNOUT_PORTKEY_DIR", DEFAULT_PORTKEY_DIR))
    notes: dict[str, Any] = {}
    failed: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="brownout-bench-gateway-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        tmpdir = Path(tmp)
        up_port = _free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        plain = _script(tmpdir / "post.lua")
        up = stack.enter_context(
            _process(
                [
                    py,
                    "-m",
                    "brownout.bench._upstream",
                    "--port",
                    str(up_port),
                    "--delay",
                    str(delay_ms / 1000),
                ],
                f"{upstream}/health",
                log=tmpdir / "upstream.log",
            )
        )
        targets = [_Target("direct", f"{upstream}/v1/chat/completions", up, plain)]
        try:
            targets.append(_start_brownout(stack, py, upstream, tmpdir, plain))
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            failed["brownout"] = str(e)
        if not portkey:
            failed["portkey"] = "skipped (--no-portkey)"
        else:
            try:
                node, entry, version = ensure_portkey(portkey_folder, install=install_portkey)
                notes["portkey_version"] = version
                targets.append(_start_portkey(stack, node, entry, upstream, tmpdir))
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                failed["portkey"] = str(e)
        if not litellm:
            failed["litellm"] = "skipped (--no-litellm)"
        else:
            try:
                exe, version = ensure_litellm(venv, install=install_litellm)
                notes["litellm_version"] = version
                targets.append(_start_litellm(stack, exe, upstream, tmpdir))
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                failed["litellm"] = str(e)
        for target in list(targets):
            try:
                _warm(target)
            except (RuntimeError, httpx.HTTPError) as e:
                failed[target.name] = str(e)
                targets.remove(target)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for _ in range(rounds):
            for target in targets:
                for concurrency in concurrencies:
                    runs.setdefault((target.name, concurrency), []).append(
                        _once(target, concurrency, seconds)
                    )
    rows: list[dict[str, Any]] = []
    for name in ("direct", "brownout", "portkey", "litellm"):
        if name in failed:
            rows += _failed(name, concurrencies, failed[name])
        else:
            rows += [_row(name, c, runs[(name, c)]) for c in concurrencies]
    return {
        "rows": rows,
        **_summary(rows, concurrencies),
        "seconds": seconds,
        "rounds": rounds,
        "upstream_delay_ms": delay_ms,
        **notes,
    }


def _start_brownout(
    stack: contextlib.ExitStack, py: str, upstream: str, tmpdir: Path, script: Path
) -> _Target:
    port = _free_port()
    config = {
        "models": {
            "local": {"enabled": False},
            "health_interval": 3600,
            "roles": {role: {"endpoints": [{"url": upstream}]} for role in ("qwen", "mistral", "llama")},
        },
        "database": {
            "url": f"sqlite+aiosqlite:///{tmpdir / 'bench.db'}",
            "spool_path": str(tmpdir / "bench-spool.db"),
        },
        "gateway": {"groups": {_GROUP: {"endpoints": [{"url": upstream, "model": "fake-model"}]}}},
    }
    (tmpdir / "brownout.yaml").write_text(json.dumps(config))
    args = [py, "-m", "brownout.cli", "serve", "--config", str(tmpdir / "brownout.yaml"), "--port", str(port)]
    proc = stack.enter_context(
        _process(
            [*args, "--log-level", "warning"], f"http://127.0.0.1:{port}/v1/models", log=tmpdir / "serve.log"
        )
    )
    return _Target("brownout", f"http://127.0.0.1:{port}/v1/chat/completions", proc, script)


def _start_portkey(
    stack: contextlib.ExitStack, node: Path, entry: Path, upstream: str, tmpdir: Path
) -> _Target:
    shim = tmpdir / "bind-127.0.0.1.mjs"
    shim.write_text(_BIND_SHIM)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    }
    env.update({"NODE_ENV": "production", "BROWNOUT_BENCH_HOST": "127.0.0.1"})
    port = _free_port()
    headers = portkey_headers(upstream)
    proc = stack.enter_context(
        _process(
            portkey_command(node, entry, port, shim),
            f"http://127.0.0.1:{port}/",
            log=tmpdir / "portkey.log",
            env=env,
        )
    )
    return _Target(
        "portkey",
        f"http://127.0.0.1:{port}/v1/chat/completions",
        proc,
        _script(tmpdir / "post-portkey.lua", headers),
        headers=headers,
    )


def _start_litellm(stack: contextlib.ExitStack, exe: Path, upstream: str, tmpdir: Path) -> _Target:
    key = "sk-bench-" + secrets.token_hex(16)
    config = {
        "model_list": [
            {
                "model_name": _GROUP,
                "litellm_params": {
                    "model": "openai/fake-model",
                    "api_base": f"{upstream}/v1",
                    "api_key": "sk-upstream-unused",
                },
            }
        ],
        "litellm_settings": {"drop_params": True},
    }
    path = tmpdir / "litellm.yaml"
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "HTTP_PROXY", "HTTPS_PROXY")}
    env.update(
        {
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_MASTER_KEY": key,
            "LITELLM_LOG": "ERROR",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    port = _free_port()
    proc = stack.enter_context(
        _process(
            [str(exe), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)],
            f"http://127.0.0.1:{port}/health/liveliness",
            log=tmpdir / "litellm.log",
            timeout=300.0,
            env=env,
        )
    )
    return _Target(
        "litellm",
        f"http://127.0.0.1:{port}/v1/chat/completions",
        proc,
        _script(tmpdir / "post-litellm.lua", {"Authorization": f"Bearer {key}"}),
        headers={"authorization": f"Bearer {key}"},
    )


def _summary(rows: list[dict[str, Any]], concurrencies: Sequence[int]) -> dict[str, Any]:
    """Latency added over direct and throughput against direct per row, and the goals of issue 17:
    through brownout, at most 1 ms added to the median at every concurrency, at most 2 ms added to
    p99 at every concurrency above 1, and at least 95 % of direct's throughput at the highest."""
    by = {(r["target"], r["concurrency"]): r for r in rows}
    for r in rows:
        direct = by.get(("direct", r["concurrency"]))
        ok = r.get("error") is None and direct is not None and direct.get("error") is None
        r["added_p50_ms"] = round(r["p50_ms"] - direct["p50_ms"], 3) if ok and direct else None
        r["added_p99_ms"] = round(r["p99_ms"] - direct["p99_ms"], 3) if ok and direct else None
        r["rps_vs_direct"] = round(r["rps"] / direct["rps"], 3) if ok and direct and direct["rps"] else None
    high = max(concurrencies)

    def get(target: str, c: int, key: str) -> float | None:
        row = by.get((target, c))
        return None if row is None or row.get("error") else row.get(key)

    def at_most(value: float | None, limit: float) -> bool:
        return value is not None and value <= limit

    goals: dict[str, Any] = {}
    for c in concurrencies:
        added = get("brownout", c, "added_p50_ms")
        goals[f"brownout_added_p50_ms_c{c}"] = added
        goals[f"brownout_added_p50_at_most_1ms_c{c}"] = at_most(added, 1.0)
        if c > 1:
            tail = get("brownout", c, "added_p99_ms")
            goals[f"brownout_added_p99_ms_c{c}"] = tail
            goals[f"brownout_added_p99_at_most_2ms_c{c}"] = at_most(tail, 2.0)
    ratio = get("brownout", high, "rps_vs_direct")
    goals[f"brownout_rps_vs_direct_c{high}"] = ratio
    goals[f"brownout_at_least_95pct_of_direct_c{high}"] = ratio is not None and ratio >= 0.95
    b_rps = get("brownout", high, "rps")
    for peer in ("portkey", "litellm"):
        p_rps = get(peer, high, "rps")
        goals[f"brownout_rps_vs_{peer}_c{high}"] = (
            round(b_rps / p_rps, 1) if b_rps is not None and p_rps else None
        )
    return {"goals": goals}
