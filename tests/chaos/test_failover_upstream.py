"""The gateway scenarios' fault-injecting upstream (brownout.chaos.failover.upstream), talked to
directly over raw sockets and httpx on 127.0.0.1: each fault as a client sees it, the deterministic
answers, and both continuation forms answered with the remainder."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from brownout.chaos.failover.upstream import (
    ANSWER_WORDS,
    PREFILL_REFUSAL,
    Fault,
    FaultUpstream,
    full_answer,
    remainder,
)
from brownout.testing import FakeClock
from support.wait import settle, until

PROMPT = [{"role": "user", "content": "Tell me a story in numbered words."}]
FULL = full_answer(PROMPT)


def chat(stream: bool = True, messages: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": "anything", "messages": messages or PROMPT, "stream": stream, **extra}


def events(raw: str) -> list[str]:
    """The data of each SSE event in ``raw``."""
    return [block.removeprefix("data: ") for block in raw.split("\n\n") if block.startswith("data: ")]


def content(datas: list[str]) -> str:
    text = ""
    for data in datas:
        if data == "[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            text += choice["delta"].get("content") or ""
    return text


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        yield client


async def raw_post(
    up: FaultUpstream, body: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST ``body`` over a raw socket; the caller reads what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    await writer.drain()
    return reader, writer


def test_the_full_answer_is_fixed_by_the_prompt_and_a_continuation_gets_the_rest() -> None:
    assert len(FULL.split()) == ANSWER_WORDS
    assert full_answer(PROMPT) == FULL
    assert full_answer([{"role": "user", "content": "another prompt"}]) != FULL
    sent = " ".join(FULL.split()[:40])
    prefill = [*PROMPT, {"role": "assistant", "content": sent}]
    instruction = [*prefill, {"role": "user", "content": "Continue exactly where you left off."}]
    assert sent + remainder(prefill) == FULL
    assert sent + remainder(instruction) == FULL
    # A text that is not what this upstream would have said gets the whole answer again.
    assert remainder([*PROMPT, {"role": "assistant", "content": "something else"}]) == FULL


async def test_a_healthy_stream_is_role_words_stop_usage_done(http: httpx.AsyncClient) -> None:
    async with FaultUpstream("up", "model-a", chunk_delay=0) as up:
        r = await http.post(
            f"{up.url}/v1/chat/completions", json=chat(stream_options={"include_usage": True})
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    datas = events(r.text)
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["model"] for c in chunks} == {"model-a"}
    assert len(chunks) == 1 + ANSWER_WORDS + 2  # role, one per word, the stop, the usage
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == ANSWER_WORDS
    assert content(datas) == FULL
    assert [c.did for c in up.calls] == ["healthy"]
    assert up.calls[0].body["messages"] == PROMPT


async def test_a_whole_answer_is_a_chat_completion_with_usage(http: httpx.AsyncClient) -> None:
    async with FaultUpstream("up", "model-a") as up:
        r = await http.post(f"{up.url}/v1/chat/completions", json=chat(stream=False))
    answer = r.json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "model-a"
    assert answer["choices"][0]["message"]["content"] == FULL
    assert answer["usage"]["completion_tokens"] == ANSWER_WORDS


async def test_an_error_status_with_retry_after_then_healthy(http: httpx.AsyncClient) -> None:
    fault = Fault("status", status=429, code="rate_limit_exceeded", retry_after="2", times=1)
    async with FaultUpstream("up", "model-a", fault, chunk_delay=0) as up:
        first = await http.post(f"{up.url}/v1/chat/completions", json=chat())
        second = await http.post(f"{up.url}/v1/chat/completions", json=chat())
    assert first.status_code == 429
    assert first.headers["retry-after"] == "2"
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert second.status_code == 200
    assert content(events(second.text)) == FULL
    assert [c.did for c in up.calls] == ["status", "healthy"]


async def test_a_fault_for_some_seconds_heals_on_the_upstreams_clock(http: httpx.AsyncClient) -> None:
    clock = FakeClock()
    async with FaultUpstream("up", "m", Fault("status", for_seconds=3.0), chunk_delay=0, clock=clock) as up:
        assert up.healed_at is None
        assert (await http.post(f"{up.url}/v1/chat/completions", json=chat())).status_code == 500
        assert up.healed_at == clock.now() + 3.0
        clock.advance(2.9)
        assert (await http.post(f"{up.url}/v1/chat/completions", json=chat())).status_code == 500
        clock.advance(0.1)
        assert (await http.post(f"{up.url}/v1/chat/completions", json=chat())).status_code == 200
    assert up.did("status") == 2
    assert up.did("healthy") == 1


async def test_reset_sends_an_rst_after_reading_the_request() -> None:
    async with FaultUpstream("up", "m", Fault("reset")) as up:
        reader, writer = await raw_post(up, chat())
        with pytest.raises(ConnectionResetError):
            await reader.read(1024)
        writer.close()
    assert [c.did for c in up.calls] == ["reset"]


async def test_silent_reads_the_request_and_never_answers() -> None:
    async with FaultUpstream("up", "m", Fault("silent")) as up:
        reader, writer = await raw_post(up, chat())
        await until(lambda: up.calls, "the request to be read")
        await settle()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.05)
        writer.close()
        await writer.wait_closed()
        # The client's close ends the held connection.
        await until(lambda: not up._tasks, "the upstream to let the connection go")
    assert [c.did for c in up.calls] == ["silent"]


async def test_a_slow_first_event_comes_after_the_delay_on_its_clock(http: httpx.AsyncClient) -> None:
    clock = FakeClock()
    fault = Fault("slow_first", first_delay=30.0)
    async with (
        FaultUpstream("up", "m", fault, chunk_delay=0, clock=clock) as up,
        http.stream("POST", f"{up.url}/v1/chat/completions", json=chat()) as r,
    ):
        assert r.status_code == 200  # the head comes at once
        body = r.aiter_bytes()
        first = asyncio.ensure_future(body.__anext__())
        await settle()
        assert not first.done()
        clock.advance(29.0)
        await settle()
        assert not first.done()
        clock.advance(1.0)
        raw = (await first).decode()
        async for piece in body:
            raw += piece.decode()
    assert events(raw)[-1] == "[DONE]"
    assert content(events(raw)) == FULL


async def test_a_cut_stream_stops_after_its_words_without_an_end(http: httpx.AsyncClient) -> None:
    pieces: list[str] = []

    async def read(up: FaultUpstream) -> None:
        async with http.stream("POST", f"{up.url}/v1/chat/completions", json=chat()) as r:
            async for piece in r.aiter_text():
                # One by one: what came before the break must be kept when the read raises.
                pieces.append(piece)  # noqa: PERF401

    async with FaultUpstream("up", "m", Fault("cut", words=40), chunk_delay=0) as up:
        # The chunked body never ends: the client sees the connection close mid-body.
        with pytest.raises(httpx.RemoteProtocolError):
            await read(up)
    raw = "".join(pieces)
    datas = events(raw)
    assert "[DONE]" not in datas
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in datas)
    assert content(datas) == " ".join(FULL.split()[:40])


async def test_a_stalled_stream_holds_the_connection_in_silence() -> None:
    async with FaultUpstream("up", "m", Fault("stall", words=30), chunk_delay=0) as up:
        reader, writer = await raw_post(up, chat())
        raw = b""
        while raw.count(b"data: ") < 31:  # the role event and 30 words
            raw += await reader.read(65_536)
        await settle()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.05)
        writer.close()
    # Each event went out in its own HTTP chunk: the events are whole between the chunks' framing.
    datas = [d.decode() for d in re.findall(rb"data: (.*?)\n\n", raw)]
    assert content(datas) == " ".join(FULL.split()[:30])


async def test_a_malformed_event_follows_its_words(http: httpx.AsyncClient) -> None:
    async with FaultUpstream("up", "m", Fault("malformed", words=25), chunk_delay=0) as up:
        r = await http.post(f"{up.url}/v1/chat/completions", json=chat())
    datas = events(r.text)
    assert content(datas[:-1]) == " ".join(FULL.split()[:25])
    with pytest.raises(json.JSONDecodeError):
        json.loads(datas[-1])


async def test_no_done_sends_the_whole_answer_and_ends_cleanly(http: httpx.AsyncClient) -> None:
    async with FaultUpstream("up", "m", Fault("no_done"), chunk_delay=0) as up:
        r = await http.post(f"{up.url}/v1/chat/completions", json=chat())
    datas = events(r.text)
    assert "[DONE]" not in datas
    assert json.loads(datas[-1])["choices"][0]["finish_reason"] == "stop"
    assert content(datas) == FULL


async def test_prefill_is_refused_where_configured_and_the_instruction_form_continues(
    http: httpx.AsyncClient,
) -> None:
    sent = " ".join(FULL.split()[:60])
    prefill = [*PROMPT, {"role": "assistant", "content": sent}]
    instruction = [*prefill, {"role": "user", "content": "Continue exactly where you stopped."}]
    async with (
        FaultUpstream("strict", "m", rejects_prefill=True, chunk_delay=0) as strict,
        FaultUpstream("lenient", "m", chunk_delay=0) as lenient,
    ):
        refused = await http.post(f"{strict.url}/v1/chat/completions", json=chat(messages=prefill))
        continued = await http.post(f"{strict.url}/v1/chat/completions", json=chat(messages=instruction))
        prefilled = await http.post(f"{lenient.url}/v1/chat/completions", json=chat(messages=prefill))
        whole = await http.post(
            f"{lenient.url}/v1/chat/completions", json=chat(stream=False, messages=instruction)
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == PREFILL_REFUSAL
    assert [c.did for c in strict.calls] == ["prefill_rejected", "healthy"]
    assert sent + content(events(continued.text)) == FULL
    assert sent + content(events(prefilled.text)) == FULL
    assert sent + whole.json()["choices"][0]["message"]["content"] == FULL
