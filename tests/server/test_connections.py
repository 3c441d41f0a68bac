"""Connection limits of ``brownout serve`` (brownout.server.connections), over real sockets on 127.0.0.1.

Slow clients -- a request line with partial headers, a body shorter than its Content-Length -- used to
hold their connections forever; a declared ``Content-Length: 99999999999`` on the chat route waited for
the body; any Host was accepted. Each test here drives the server the way such a client does and
asserts what the client sees (the answer, then the end of the connection); the bounds on waiting are
generous and only stop a broken server from hanging the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, ServerSection, load_config
from brownout.errors import ConfigError
from brownout.server.app import create_app
from brownout.server.connections import ConnectionPolicy, host_allowed, uvicorn_options
from brownout.server.runtime import Runtime
from support.net import EmbeddedServer
from support.stack import make_config
from support.wait import until

# Far longer than any limit configured here: reaching it means the server held the connection.
BOUND = 15.0


@contextlib.asynccontextmanager
async def serve(
    app: Any, section: ServerSection, *, lifespan: str = "off"
) -> AsyncIterator[tuple[int, ConnectionPolicy]]:
    """Serve ``app`` on a free 127.0.0.1 port with ``section``'s connection limits, as run_server does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    policy = ConnectionPolicy.from_config(section)
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        loop="asyncio",
        ws="websockets-sansio",
        timeout_graceful_shutdown=2,
        **uvicorn_options(section, policy),
    )
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done(), "uvicorn to start")
        if task.done():
            task.result()
        yield port, policy
    finally:
        server.should_exit = True
        await task
        sock.close()


def small_app() -> Starlette:
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def echo(request: Request) -> Response:
        return JSONResponse({"received": len(await request.body())})

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    return Starlette(
        routes=[Route("/ok", ok), Route("/echo", echo, methods=["POST"]), WebSocketRoute("/ws", ws)]
    )


def section(**over: Any) -> ServerSection:
    return ServerSection(**{"header_timeout": 0.5, "body_timeout": 0.5, "keepalive_timeout": 0.5, **over})


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (fails the test past BOUND)."""
    return await asyncio.wait_for(reader.read(), BOUND)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP/1.1 response with a Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), BOUND)
    return status, headers, body


def parse(raw: bytes) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a whole response ``raw`` (as read to EOF)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def request(path: str = "/ok", host: str = "127.0.0.1", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# ---------------------------------------------------------------------------------------------- headers


async def test_partial_headers_and_silent_connections_are_closed_within_the_header_timeout() -> None:
    async with serve(small_app(), section()) as (port, policy):
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        # 40 send a request line and part of the headers, 10 send nothing at all.
        for i, (_, writer) in enumerate(conns[:40]):
            writer.write(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-" + str(i).encode())
            await writer.drain()
        seen = await asyncio.gather(*(read_all(reader) for reader, _ in conns))
        for raw in seen[:40]:
            status, body = parse(raw)
            assert status == 408
            assert body["error"]["code"] == "request_timeout"
            assert "server.header_timeout" in body["error"]["message"]
        assert seen[40:] == [b""] * 10  # nothing asked, nothing answered: just closed
        assert policy.stats.header_timeouts == 50
        assert policy.open_by_client == {}
        for _, writer in conns:
            writer.close()


async def test_trickling_headers_gain_nothing_the_header_timeout_is_a_total() -> None:
    async with serve(small_app(), section()) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        line = b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"a" * 200
        answer = asyncio.create_task(read_all(reader))
        sent = 0
        with contextlib.suppress(ConnectionError):
            # One byte every 50 ms would take 12 s for the whole line: the server ends it long before.
            while sent < len(line) and not answer.done():
                writer.write(line[sent : sent + 1])
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)
        status, _ = parse(await answer)
        assert status == 408
        assert sent < len(line)
        writer.close()


async def test_a_kept_alive_connection_idle_after_its_answer_is_closed() -> None:
    async with serve(small_app(), section()) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request())
        status, _, _ = await read_response(reader)
        assert status == 200
        assert await read_all(reader) == b""  # keepalive_timeout
        writer.close()


async def test_the_next_request_on_a_kept_alive_connection_has_its_own_header_clock() -> None:
    async with serve(small_app(), section(keepalive_timeout=30)) as (port, policy):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(request())
            assert (await read_response(reader))[0] == 200
        writer.write(b"GET /ok HTTP/1.1\r\nHo")
        status, _ = parse(await read_all(reader))
        assert status == 408
        assert policy.stats.header_timeouts == 1
        writer.close()


# ------------------------------------------------------------------------------------------------- body


async def test_a_body_shorter_than_its_content_length_gets_408_after_the_body_timeout() -> None:
    async with serve(small_app(), section()) as (port, policy):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/echo", method="POST", extra="Content-Length: 1000\r\n") + b"x" * 10)
        status, body = parse(await read_all(reader))
        assert status == 408
        assert body["error"]["code"] == "request_timeout"
        assert "server.body_timeout" in body["error"]["message"]
        assert policy.stats.body_timeouts == 1
        writer.close()


async def test_a_slow_body_that_keeps_coming_is_read_whole() -> None:
    # Each pause is well under the body timeout; the whole body takes longer than it.
    async with serve(small_app(), section(body_timeout=2.0)) as (port, policy):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/echo", method="POST", extra="Content-Length: 15\r\n"))
        for _ in range(15):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.2)
        status, _, body = await read_response(reader)
        assert (status, json.loads(body)) == (200, {"received": 15})
        assert policy.stats.body_timeouts == 0
        writer.close()


# -------------------------------------------------------------------------------------- client address


async def test_connections_beyond_the_per_client_cap_get_503_while_the_others_work() -> None:
    async with serve(small_app(), section(max_connections_per_client=3, keepalive_timeout=30)) as (
        port,
        policy,
    ):
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, writer in conns:
            writer.write(request())
            assert (await read_response(reader))[0] == 200
        # The fourth: answered at once, without its request being read, then closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, body = parse(await read_all(reader))
        assert status == 503
        assert body["error"]["code"] == "too_many_connections"
        assert body["error"]["retry_after"] >= 1
        writer.close()
        # The three carry on.
        for reader, writer in conns:
            writer.write(request())
            assert (await read_response(reader))[0] == 200
        assert policy.stats.over_client_cap == 1
        # One closes: its place is free again.
        conns[0][1].close()
        await until(lambda: sum(policy.open_by_client.values()) == 2, "the closed connection to leave")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request())
        assert (await read_response(reader))[0] == 200
        for _, w in [*conns[1:], (reader, writer)]:
            w.close()


async def test_a_refused_client_that_sent_its_request_still_reads_the_503() -> None:
    async with serve(small_app(), section(max_connections_per_client=1, keepalive_timeout=30)) as (port, _):
        held_reader, held = await asyncio.open_connection("127.0.0.1", port)
        held.write(request())
        assert (await read_response(held_reader))[0] == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/echo", method="POST", extra="Content-Length: 5\r\n") + b"hello")
        status, headers, _ = await read_response(reader)
        assert status == 503
        assert headers["retry-after"] == "5"
        writer.close()
        held.close()


# ------------------------------------------------------------------------------------------------ Host


@pytest.mark.parametrize(
    ("header", "allowed", "ok"),
    [
        (b"127.0.0.1:8000", None, True),
        (b"localhost:8000", None, True),
        (b"LOCALHOST.", None, True),
        (b"[::1]:8000", None, True),
        (b"10.1.2.3", None, True),  # an IP address cannot come from a rebound name
        (b"evil.example:8000", None, False),
        (b"brownout.internal", None, False),
        (None, None, True),
        (b"api.example.com", frozenset({"api.example.com"}), True),
        (b"api.example.com:443", frozenset({"*.example.com"}), True),
        (b"example.com", frozenset({"*.example.com"}), False),
        (b"127.0.0.1", frozenset({"api.example.com"}), False),
        (b"anything", frozenset({"*"}), True),
        (b"caf\xc3\xa9.example", None, False),
    ],
)
def test_host_allowed(header: bytes | None, allowed: frozenset[str] | None, ok: bool) -> None:
    assert host_allowed(header, allowed, "127.0.0.1") is ok


def test_the_bind_name_is_allowed_by_default() -> None:
    assert host_allowed(b"myhost:8000", None, "MyHost")


@pytest.mark.parametrize("bad", ["http://example.com", "example.com:8000", "example.com/x", "", "*.*"])
def test_allowed_hosts_entries_are_checked_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, environ={"BROWNOUT__SERVER__ALLOWED_HOSTS": json.dumps([bad])})
    assert "server.allowed_hosts" in str(e.value)


async def test_a_host_not_allowed_gets_400_and_an_allowed_one_is_served() -> None:
    async with serve(small_app(), section(allowed_hosts=["api.example.com"])) as (port, policy):
        for host, expected in [
            ("evil.example", 400),
            ("api.example.com", 200),
            (f"API.example.com:{port}", 200),
        ]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request(host=host))
            status, _, body = await read_response(reader)
            assert status == expected, host
            if expected == 400:
                assert json.loads(body)["error"]["code"] == "host_not_allowed"
                assert await read_all(reader) == b""  # and closed
            writer.close()
        # A WebSocket handshake through a rebound name is refused the same way.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            request(
                "/ws",
                host="evil.example",
                extra="Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            )
        )
        assert (await read_response(reader))[0] == 400
        writer.close()
        assert policy.stats.bad_host == 2


# ------------------------------------------------------------------------------------ the whole server


@contextlib.asynccontextmanager
async def brownout(tmp_path: Path, **server: Any) -> AsyncIterator[int]:
    """create_app on fake models with a gateway group, under the connection limits."""
    fakes = {role: FakeLLM(model=role) for role in (*ROLES, "chat")}
    try:
        for fake in fakes.values():
            await fake.start()
        over = {
            "loop_block": {"enabled": False},
            "resources": {"enabled": False},
            "gateway": {"groups": {"chat": {"endpoints": [{"url": fakes["chat"].url}]}}},
            "server": server,
        }
        config = make_config({r: fakes[r].url for r in ROLES}, tmp_path / "briefs.db", over)
        app = create_app(config, Runtime(config))
        async with serve(app, config.server, lifespan="on") as (port, _):
            yield port
    finally:
        await asyncio.gather(*(f.stop() for f in fakes.values()))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/briefs"])
async def test_a_declared_oversized_body_gets_413_before_any_of_it_is_sent(tmp_path: Path, path: str) -> None:
    async with brownout(tmp_path) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            request(
                path, method="POST", extra="Content-Type: application/json\r\nContent-Length: 99999999999\r\n"
            )
        )
        status, headers, body = await read_response(reader)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert headers["connection"] == "close"
        assert await read_all(reader) == b""  # not waiting for the rest
        writer.close()


async def test_the_server_refuses_a_rebound_host_and_serves_its_own(tmp_path: Path) -> None:
    async with brownout(tmp_path) as port:
        for host, expected in [("evil.example", 400), (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200)]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request("/health", host=host, extra="Origin: http://evil.example\r\n"))
            status, _, body = await read_response(reader)
            assert status == expected, host
            if expected == 400:
                assert json.loads(body)["error"]["param"] == "Host"
            writer.close()
