"""The light load client (brownout.bench.client) against a real socket server on 127.0.0.1.

The server here answers by hand so that each test can choose what a real server may do: keep the
connection, close it, answer chunked, or never answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from brownout.bench.client import LoadClient, LocalOnly, retry_pause


@dataclass
class Server:
    """What the server saw, and how it answers (``behaviour``)."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    behaviour: str = "keep"  # keep | close | chunked | silent
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


async def _handle(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    server.connections += 1
    server.writers.append(writer)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            server.requests.append((lines[0], body))
            if server.behaviour == "silent":
                await asyncio.Event().wait()  # never answers; cancelled when the server closes
            answer = json.dumps({"n": len(server.requests)}).encode()
            if server.behaviour == "chunked":
                half = len(answer) // 2
                chunks = b"".join(
                    b"%x\r\n%s\r\n" % (len(part), part) for part in (answer[:half], answer[half:])
                )
                writer.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n"
                    + b"Transfer-Encoding: chunked\r\n\r\n"
                    + chunks
                    + b"0\r\n\r\n"
                )
            else:
                close = server.behaviour == "close"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(answer), b"Connection: close\r\n" if close else b"", answer)
                )
            await writer.drain()
            if server.behaviour == "close":
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    listener = await asyncio.start_server(lambda r, w: _handle(state, r, w), "127.0.0.1", 0)
    state.port = listener.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        for writer in state.writers:
            writer.close()
        listener.close()
        with contextlib.suppress(Exception):
            await listener.wait_closed()


async def test_kept_alive_connections_carry_many_requests(server: Server) -> None:
    async with LoadClient(f"http://127.0.0.1:{server.port}") as client:
        for i in range(5):
            answer = await client.post_json("/v1/briefs", {"text": f"t{i}"})
            assert answer.status == 200
            assert answer.json() == {"n": i + 1}
            assert answer.headers["content-type"] == "application/json"
        # Ten at once need ten connections; then they are reused.
        await asyncio.gather(*(client.get("/health") for _ in range(10)))
        await asyncio.gather(*(client.get("/health") for _ in range(10)))
    assert server.connections == 10
    line, body = server.requests[0]
    assert line == "POST /v1/briefs HTTP/1.1"
    assert json.loads(body) == {"text": "t0"}
    assert server.requests[-1] == ("GET /health HTTP/1.1", b"")


async def test_an_answer_says_how_long_its_new_connection_took_to_open(server: Server) -> None:
    async with LoadClient(f"http://127.0.0.1:{server.port}") as client:
        first = await client.get("/")
        again = await client.get("/")
        for writer in server.writers:  # the server drops the idle connection: the next opens a new one
            writer.close()
        reopened = await client.get("/")
    assert first.connect > 0
    assert again.connect == 0.0
    assert reopened.connect > 0
    assert server.connections == 2


async def test_a_connection_the_server_closes_is_not_reused(server: Server) -> None:
    server.behaviour = "close"
    async with LoadClient(f"http://127.0.0.1:{server.port}") as client:
        for _ in range(3):
            assert (await client.get("/")).status == 200
    assert server.connections == 3


async def test_a_pooled_connection_closed_while_idle_is_retried_on_a_new_one(server: Server) -> None:
    async with LoadClient(f"http://127.0.0.1:{server.port}") as client:
        assert (await client.get("/")).status == 200
        for writer in server.writers:  # the server drops the idle connection
            writer.close()
        assert (await client.get("/")).status == 200
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_chunked_refusal_is_read_whole(server: Server) -> None:
    server.behaviour = "chunked"
    async with LoadClient(f"http://127.0.0.1:{server.port}") as client:
        answer = await client.post_json("/v1/briefs", {"text": "x"})
        again = await client.post_json("/v1/briefs", {"text": "y"})
    assert (answer.status, answer.headers["retry-after"], answer.json()) == (503, "2", {"n": 1})
    assert again.json() == {"n": 2}
    assert server.connections == 1


async def test_a_silent_server_times_out_and_its_connection_is_dropped(server: Server) -> None:
    server.behaviour = "silent"
    async with LoadClient(f"http://127.0.0.1:{server.port}", timeout=0.2) as client:
        with pytest.raises(TimeoutError):
            await client.get("/")
        server.behaviour = "keep"
        # Not on the silent connection: a new one answers.
        assert (await client.get("/")).status == 200
    assert server.connections == 2


async def test_nothing_listening_is_a_connection_error(server: Server) -> None:
    async with LoadClient("http://127.0.0.1:9") as client:
        with pytest.raises(ConnectionRefusedError):
            await client.get("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "https://127.0.0.1:8000", "http://example.com"])
def test_load_goes_to_this_machine_only(url: str) -> None:
    with pytest.raises(LocalOnly, match=r"127\.0\.0\.1 only"):
        LoadClient(url)


def test_a_closed_client_sends_nothing() -> None:
    client = LoadClient("http://127.0.0.1:9")
    asyncio.run(client.aclose())
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(client.get("/"))


@given(
    st.one_of(st.none(), st.floats(min_value=-5, max_value=1e6, allow_nan=False)),
    st.integers(min_value=0, max_value=2**32),
)
def test_a_polite_pause_honours_retry_after_with_bounded_jitter(retry_after: float | None, seed: int) -> None:
    pause = retry_pause(retry_after, random.Random(seed))
    base = 1.0 if retry_after is None or retry_after < 0 else min(retry_after, 60.0)
    assert base <= pause <= base * 1.5
