"""Health checks stay out of the log at the default level; every other request is still logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from brownout.chaos.fakellm import FakeLLM
from brownout.llm.local import free_port
from brownout.server.runner import PROBE_PATHS, ProbeAccessFilter, quiet_probes
from support.wait import until

# uvicorn's access line: 127.0.0.1:5555 - "GET /health HTTP/1.1" 200 OK
ACCESS = re.compile(r'- "(GET|POST) (\S+) HTTP/1\.1" (\d{3})')
PROBES = ["/health", "/health/llm?model=all", "/health/gateway", "/metrics", "/api/v1/status"]


def _access_record(path: str, method: str = "GET") -> logging.LogRecord:
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5555", method, path, "1.1", 200),
        None,
    )


@pytest.fixture
def access_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("uvicorn.access")
    saved = (logger.level, list(logger.filters))
    yield logger
    logger.setLevel(saved[0])
    logger.filters[:] = saved[1]


@pytest.mark.parametrize(("level", "expected"), [(logging.INFO, 5), (logging.DEBUG, 55)])
def test_probe_lines_are_debug_lines(access_logger: logging.Logger, level: int, expected: int) -> None:
    access_logger.setLevel(level)
    quiet_probes("debug" if level == logging.DEBUG else "info")
    quiet_probes("info")  # installing twice adds no second filter
    assert sum(isinstance(f, ProbeAccessFilter) for f in access_logger.filters) == 1
    kept: list[logging.LogRecord] = []
    for i in range(50):
        record = _access_record(PROBES[i % len(PROBES)])
        if access_logger.filter(record):
            kept.append(record)
    for _ in range(5):
        record = _access_record("/v1/briefs", "POST")
        if access_logger.filter(record):
            kept.append(record)
    assert len(kept) == expected
    by_path = [(str(r.args[2]) if isinstance(r.args, tuple) else "", r.levelname) for r in kept]
    assert [level for path, level in by_path if path == "/v1/briefs"] == ["INFO"] * 5
    assert {level for path, level in by_path if path != "/v1/briefs"} <= {"DEBUG"}


def test_lookalike_paths_still_log(access_logger: logging.Logger) -> None:
    access_logger.setLevel(logging.INFO)
    quiet_probes("info")
    for path in ("/healthz", "/health/llm/extra", "/metrics2", "/v1/models", "/dashboard"):
        assert access_logger.filter(_access_record(path)), path
    assert "/health" in PROBE_PATHS


async def test_a_served_log_shows_the_briefs_and_not_the_probes(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    """``brownout serve`` at its default level: 50 probes and 5 briefs give 5 access lines."""
    port = free_port()
    config = {
        "server": {"port": port},
        "models": {
            "local": {"enabled": False},
            "health_interval": 0.5,  # the server's own probes of its models run during the test too
            "roles": {role: {"endpoints": [{"url": fake.url}]} for role, fake in fakes.items()},
        },
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "brownout",
            "serve",
            "--config",
            str(tmp_path / "c.yaml"),
            stdout=log,
            stderr=log,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as http:
                for _ in range(300):
                    with contextlib.suppress(httpx.HTTPError):
                        await http.get("/api/v1/status")
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(log_path.read_text())
                probes_before = sum(f.chat_requests for f in fakes.values())
                for i in range(50):
                    assert (await http.get(PROBES[i % len(PROBES)])).status_code in (200, 503)
                for i in range(5):
                    brief = await http.post(
                        "/v1/briefs", json={"text": f"rose and oud, take {i}", "mode": "fast"}
                    )
                    assert brief.status_code == 200, brief.text
                # The server probed its models meanwhile (chat calls beyond the 5 briefs' own).
                await until(
                    lambda: sum(f.chat_requests for f in fakes.values()) >= probes_before + 5 + 3,
                    "the server's own model probes",
                )
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = log_path.read_text()
    lines = [m.groups() for m in ACCESS.finditer(text)]
    assert lines == [("POST", "/v1/briefs", "200")] * 5, text
    assert "HTTP Request:" not in text  # httpx's line per model call and model health probe
