"""An answer's head goes out with the first piece of its body, in one write (brownout.server.connections).

uvicorn writes the status line and headers, then the body, in two writes: two system calls and two
packets per answer, the client woken twice. The transport each request's answer is written to holds
the head for the body's first piece; when the app waits between the two (a stream before its first
event), the head goes out alone on the event loop's next turn. Over a real socket (the last test),
a plain answer arrives as it always did.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from brownout.config import load_config
from brownout.server.connections import GuardedHttpToolsProtocol, _LingeringClose, uvicorn_options
from support.net import EmbeddedServer, free_port
from support.wait import until


class _Transport:
    """Records what is written, as the socket would send it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


class _Cycle:
    response_started = False


class _Protocol:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closed = 0

    def _close(self) -> None:
        self.closed += 1


def _wrapped() -> tuple[_LingeringClose, _Transport, _Cycle, _Protocol]:
    transport, cycle, protocol = _Transport(), _Cycle(), _Protocol(asyncio.get_running_loop())
    wrapper = _LingeringClose(
        cast(GuardedHttpToolsProtocol, protocol), cast(asyncio.Transport, transport), cast(Any, cycle)
    )
    return wrapper, transport, cycle, protocol


async def test_head_and_body_go_out_in_one_write() -> None:
    wrapper, transport, cycle, _ = _wrapped()
    wrapper.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the answer starts: at once
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    wrapper.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert len(transport.writes) == 1, "the head waits for the body"
    wrapper.write(b"{}")
    assert transport.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(transport.writes) == 2, "nothing is written twice"
    wrapper.write(b"more")  # later pieces of a body: at once
    assert transport.writes[-1] == b"more"


async def test_a_head_whose_body_waits_goes_out_on_the_next_turn() -> None:
    wrapper, transport, cycle, _ = _wrapped()
    cycle.response_started = True
    wrapper.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
    wrapper.write(b"5\r\nhello\r\n")
    assert transport.writes[-1] == b"5\r\nhello\r\n"


async def test_closing_or_asking_the_transport_anything_writes_the_head_first() -> None:
    wrapper, transport, cycle, protocol = _wrapped()
    cycle.response_started = True
    wrapper.write(b"HEAD-1")
    assert wrapper.get_write_buffer_size() == 0
    assert transport.writes == [b"HEAD-1"]
    wrapper2, transport2, cycle2, protocol2 = _wrapped()
    cycle2.response_started = True
    wrapper2.write(b"HEAD-2")
    wrapper2.close()
    assert (transport2.writes, protocol2.closed) == ([b"HEAD-2"], 1)
    await asyncio.sleep(0)
    assert transport2.writes == [b"HEAD-2"], "the held head is written once"
    assert protocol.closed == 0


async def test_answers_over_a_real_socket_arrive_whole() -> None:
    async def plain(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def stream(request: Request) -> Response:
        async def events() -> Any:
            await asyncio.sleep(0.01)
            yield b"data: one\n\n"
            yield b"data: two\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/plain", plain), Route("/stream", stream)])
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        loop="asyncio",
        **uvicorn_options(load_config(None, environ={}).server),
    )
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done(), "uvicorn to start")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            for _ in range(3):  # kept alive: each answer framed right after the one before
                r = await http.get("/plain")
                assert (r.status_code, r.json()) == (200, {"ok": True})
            r = await http.get("/stream")
            assert r.text == "data: one\n\ndata: two\n\n"
            assert r.headers["content-type"].startswith("text/event-stream")
    finally:
        server.should_exit = True
        await task
