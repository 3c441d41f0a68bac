"""The fake upstream of ``brownout bench gateway`` (brownout.bench._upstream): a fixed completion, or
fixed server-sent events when asked to stream, after a fixed delay; health at once."""

from __future__ import annotations

import json
import time

import httpx

from brownout.bench._upstream import make_app

BODY = {"model": "bench", "messages": [{"role": "user", "content": "lemon"}]}


def client(delay: float = 0.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(delay)), base_url="http://upstream")


async def test_a_chat_request_gets_one_fixed_completion() -> None:
    async with client() as http:
        response = await http.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "A fresh citrus opening over a woody base."


async def test_a_streamed_request_gets_events_then_done() -> None:
    async with client() as http:
        response = await http.post("/v1/chat/completions", content=json.dumps({**BODY, "stream": True}))
    assert response.headers["content-type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == (
        "A fresh citrus opening over a woody base."
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_waits_the_delay_and_health_does_not() -> None:
    async with client(delay=0.2) as http:
        t0 = time.monotonic()
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert time.monotonic() - t0 < 0.2
        t0 = time.monotonic()
        await http.post("/v1/chat/completions", json=BODY)
        assert time.monotonic() - t0 >= 0.2
