"""The fake upstream of ``brownout bench gateway``: an OpenAI-compatible chat server with a fixed delay.

A bare ASGI app on uvicorn, so that the upstream costs as little CPU as a server can and the benchmark
measures the proxies, not the fake: ``POST /v1/chat/completions`` waits ``--delay`` seconds and
answers one fixed completion (or, with ``"stream": true``, a few fixed server-sent events);
``GET /health`` answers at once. Run: ``python -m brownout.bench._upstream --port N --delay 0.02``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import uvicorn

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fresh citrus opening over a woody base."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }
).encode()

_EVENTS = b"".join(
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    ).encode()
    + b"\n\n"
    for delta, finish in (
        ({"role": "assistant", "content": ""}, None),
        ({"content": "A fresh citrus opening"}, None),
        ({"content": " over a woody base."}, None),
        ({}, "stop"),
    )
) + (b"data: [DONE]\n\n")

_JSON = [(b"content-type", b"application/json"), (b"content-length", str(len(_COMPLETION)).encode())]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_OK = b'{"status":"ok"}'


def make_app(delay: float) -> Any:
    """The ASGI app: chat completions after ``delay`` seconds, health at once."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "POST":
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            if delay > 0:
                await asyncio.sleep(delay)
            if b'"stream":true' in body.replace(b" ", b""):
                await send({"type": "http.response.start", "status": 200, "headers": _SSE})
                await send({"type": "http.response.body", "body": _EVENTS})
                return
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": _COMPLETION})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
            }
        )
        await send({"type": "http.response.body", "body": _OK})

    return app


def main() -> None:
    """Serve the fake upstream on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds before each chat answer")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.delay),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
