"""The gateway's HTTP/1.1 client: framing, keep-alive reuse, stale connections, timeouts.

Parsing is checked by feeding bytes in every split; the rest over real sockets on 127.0.0.1, against
raw asyncio servers that write exactly the bytes a test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from brownout.chaos.fakellm import FakeLLM
from brownout.gateway.upstream import Pool, Response, UpstreamError, UpstreamTimeout

_BODY = b'{"model":"m","messages":[],"temperature":0}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)

CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"9;ext=1\r\ndata: 1\n\n\r\n"
    b"9\r\ndata: 2\n\n\r\n"
    b"0\r\nx-trailer: yes\r\n\r\n"
)


def parse(raw: bytes, split: int) -> Response:
    response = Response(None)
    for i in range(0, len(raw), split):
        response._feed(raw[i : i + split])
    return response


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64, 10_000])
def test_chunked_bodies_parse_in_any_split(split: int) -> None:
    response = parse(CHUNKED, split)
    assert response.status == 200
    assert response.header(b"content-type") == b"text/event-stream"
    assert response.complete
    assert b"".join(response._pieces) == b"data: 1\n\ndata: 2\n\n"


@pytest.mark.parametrize("split", [1, 5, 10_000])
def test_content_length_bodies_and_interim_answers(split: int) -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello"
    response = parse(raw, split)
    assert (response.status, response.complete, b"".join(response._pieces)) == (201, True, b"hello")
    assert response.headers == [(b"content-length", b"5"), (b"x-a", b"b")]


def test_malformed_answers_are_errors() -> None:
    for raw in (
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
    ):
        response = parse(raw, 10_000)
        assert isinstance(response._error, UpstreamError)
    response = parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 10_000)
    assert isinstance(response._error, UpstreamError)
    assert "chunk size" in str(response._error)


# ------------------------------------------------------------------------------------------ over sockets

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1: ``handler(reader, writer, n)`` answers the n-th request of a
    connection (after its head and body were read) and returns False to close the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                n += 1
                if not await handler(reader, writer, n):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def test_keep_alive_connections_are_reused() -> None:
    async with FakeLLM("ok") as fake:
        pool = Pool(fake.url)
        for _ in range(5):
            response = await pool.request(REQUEST, timeout=5.0)
            assert response.status == 200
            assert b'"choices"' in await response.read(5.0)
        assert pool.connections_made == 1
        assert pool.idle == 1
        pool.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced_transparently() -> None:
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n > 1:
            return False  # a second request on a kept-alive connection: hang up without answering
        writer.write(OK)
        await writer.drain()
        return True

    async with raw_server(one_per_connection) as url:
        pool = Pool(url)
        for _ in range(3):
            response = await pool.request(REQUEST, timeout=5.0)
            assert await response.read(5.0) == b"{}"
        assert pool.connections_made == 3
        pool.close()


async def test_an_answer_cut_off_midway_is_an_error_not_a_retry() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()
        return False

    async with raw_server(cut) as url:
        pool = Pool(url)
        response = await pool.request(REQUEST, timeout=5.0)
        with pytest.raises(UpstreamError, match=r"closed|lost"):
            await response.read(5.0)
        assert pool.connections_made == 1
        assert pool.idle == 0


async def test_silence_times_out_and_refusal_is_an_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await asyncio.Event().wait()
        return False

    async with raw_server(silent) as url:
        pool = Pool(url)
        with pytest.raises(UpstreamTimeout):
            await pool.request(REQUEST, timeout=0.1)
        assert pool.idle == 0  # the timed-out connection is not reused
    with pytest.raises(UpstreamError, match="cannot connect"):
        await Pool(url).request(REQUEST, timeout=1.0)


async def test_streamed_pieces_arrive_as_sent_and_release_the_connection() -> None:
    gate = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async with raw_server(stream) as url:
        pool = Pool(url)
        response = await pool.request(REQUEST, timeout=5.0)
        assert await response.next_piece(5.0) == b"first\n"
        gate.set()
        assert await response.next_piece(5.0) == b"second\n"
        assert await response.next_piece(5.0) is None
        assert pool.idle == 1
        pool.close()


async def test_a_body_without_length_lasts_until_the_connection_closes() -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        await writer.drain()
        return False  # the end of the connection ends the body

    async with raw_server(http10) as url:
        pool = Pool(url)
        response = await pool.request(REQUEST, timeout=5.0)
        assert await response.read(5.0) == b"part one, part two"
        assert pool.idle == 0  # such a connection cannot carry another request
