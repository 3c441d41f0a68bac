"""The access log: a line per answer as uvicorn writes it, refusals under load counted, not each logged."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from brownout.config import BrownoutConfig
from brownout.server.access import SHED_WINDOW, AccessLines, AccessLog
from brownout.server.app import create_app
from brownout.server.connections import GuardedHttpToolsProtocol
from brownout.server.runner import make_server
from brownout.testing import FakeClock


def _app(lines: AccessLines, status: int, retry_after: bool) -> AccessLog:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json")]
        if retry_after:
            headers.append((b"retry-after", b"3"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    return AccessLog(answer, lines)


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[AccessLines, FakeClock]]:
    clock = FakeClock()
    written = AccessLines(clock=clock)
    written.enabled = True
    with _uvicorn_access_restored() as access:
        access.setLevel(logging.INFO)
        access.propagate = True  # to the root logger, where caplog listens
        caplog.set_level(logging.INFO)
        yield written, clock


@contextlib.contextmanager
def _uvicorn_access_restored() -> Iterator[logging.Logger]:
    """uvicorn's access logger, put back as it was afterwards (uvicorn.Config sets it up globally)."""
    access = logging.getLogger("uvicorn.access")
    saved = (access.level, access.propagate, list(access.handlers), list(access.filters))
    try:
        yield access
    finally:
        access.setLevel(saved[0])
        access.propagate = saved[1]
        access.handlers[:] = saved[2]
        access.filters[:] = saved[3]


async def _send(app: AccessLog, n: int = 1, path: str = "/v1/briefs") -> None:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for _ in range(n):
            await http.post(path, json={})


def _access(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]


def _summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "brownout.server"]


async def test_every_answer_has_uvicorns_line(
    lines: tuple[AccessLines, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    access, _ = lines
    await _send(_app(access, 200, False), 3, "/v1/briefs?x=1")
    await _send(
        _app(access, 503, False)
    )  # a 503 without Retry-After is a failure, not a refusal: its own line
    assert _access(caplog) == ['127.0.0.1:5555 - "POST /v1/briefs?x=1 HTTP/1.1" 200'] * 3 + [
        '127.0.0.1:5555 - "POST /v1/briefs HTTP/1.1" 503'
    ]
    # uvicorn's record: its formatter and the probe filter read these five arguments.
    record = next(r for r in caplog.records if r.name == "uvicorn.access")
    assert record.args == ("127.0.0.1:5555", "POST", "/v1/briefs?x=1", "1.1", 200)


async def test_a_run_of_refusals_is_one_line_then_a_count_per_window(
    lines: tuple[AccessLines, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    access, clock = lines
    refused = _app(access, 503, True)
    await _send(refused, 30)
    await _send(_app(access, 200, False))  # served answers keep their lines meanwhile
    assert _access(caplog) == [
        '127.0.0.1:5555 - "POST /v1/briefs HTTP/1.1" 503',
        '127.0.0.1:5555 - "POST /v1/briefs HTTP/1.1" 200',
    ]
    assert _summaries(caplog) == []
    clock.advance(SHED_WINDOW)
    assert _summaries(caplog) == [
        f"29 more requests refused (503/429 with Retry-After) in the last {SHED_WINDOW:g} s; "
        "each one is logged at --log-level debug and counted in /metrics"
    ]
    await _send(_app(access, 429, True))
    clock.advance(SHED_WINDOW)
    assert _summaries(caplog)[-1].startswith("1 more request refused")
    assert access.refusals_counted == 30
    # A window without refusals ends the run: the next one has its own line again.
    clock.advance(SHED_WINDOW)
    assert len(_summaries(caplog)) == 2
    await _send(refused)
    assert len(_access(caplog)) == 3
    # At shutdown, what was counted and not written yet is written.
    await _send(refused, 4)
    access.close()
    assert _summaries(caplog)[-1] == "4 more request(s) refused (503/429 with Retry-After) before shutdown"


async def test_at_debug_every_refusal_has_its_own_line(
    lines: tuple[AccessLines, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("uvicorn.access").setLevel(logging.DEBUG)
    await _send(_app(lines[0], 503, True), 5)
    assert len(_access(caplog)) == 5
    assert _summaries(caplog) == []


async def test_off_until_the_server_turns_uvicorns_lines_off(
    lines: tuple[AccessLines, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    access, _ = lines
    access.enabled = False
    await _send(_app(access, 200, False), 2)
    assert _access(caplog) == []


def test_brownout_serve_writes_the_lines_itself_unless_told_otherwise() -> None:
    app = create_app(BrownoutConfig())
    access: AccessLines = app.state.access_lines
    with _uvicorn_access_restored():
        server = make_server(app, log_config=None)
        on = access.enabled
        make_server(app, log_config=None, access_log=False)
        off = access.enabled
        make_server(app, log_config=None, http="h11")
        theirs = access.enabled
    protocol = server.config.http
    assert isinstance(protocol, type)
    assert issubclass(protocol, GuardedHttpToolsProtocol)
    assert protocol.app_logs_access is True
    assert on is True
    # Asked for no access log, or for uvicorn's own protocol: uvicorn decides, the app writes nothing.
    assert off is False
    assert theirs is False
