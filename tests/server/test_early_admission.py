"""A brief request is admitted, or refused for load, as soon as its body is read (EarlyAdmission).

Refused there, it never reaches the framework's routing and the route; admitted there, the route
serves it on that admission (each request is admitted once); bad input is still reported before load.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from brownout.briefs.answer import BriefAnswer
from brownout.briefs.service import BriefTicket
from brownout.chaos.fakellm import FakeLLM
from brownout.server.errors import parse_json_body
from brownout.server.routes.briefs import BriefRequest, EarlyAdmission
from support.stack import Stack, assert_overloaded, brief_of, sample, serve
from support.wait import until

_FULL = {"queue": {"max_size": 2, "max_concurrent": 1}}


@asynccontextmanager
async def _saturated(fakes: dict[str, FakeLLM], tmp_path: Path) -> AsyncIterator[tuple[Stack, list[int]]]:
    """A stack whose one generator slot is taken and whose queue of two is full (by three requests
    left running in the background); yields it and the count of requests the route answered."""
    async with serve(fakes, tmp_path, _FULL) as stack:
        service = stack.service
        answered = [0]
        route_answer: Callable[[BriefTicket], Awaitable[BriefAnswer]] = service.answer

        async def counting_answer(ticket: BriefTicket) -> BriefAnswer:
            answered[0] += 1
            return await route_answer(ticket)

        service.answer = counting_answer  # type: ignore[method-assign]
        fakes["qwen"].set("slow", delay=0.3)
        busy = [
            asyncio.create_task(stack.post(f"a request that waits for the model, number {i}", "balanced"))
            for i in range(3)
        ]
        await until(
            lambda: service.admission.in_flight == 1 and service.admission.queue_size == 2,
            "one call running and two waiting",
        )
        try:
            yield stack, answered
        finally:
            for response in await asyncio.gather(*busy):
                assert response.status_code == 200, response.text
                brief_of(response.json())


async def test_a_refusal_for_load_is_answered_before_the_route(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with _saturated(fakes, tmp_path) as (stack, answered):
        refused = await asyncio.gather(
            *(stack.post(f"one more distinct request, number {i}", "balanced") for i in range(5))
        )
        for response in refused:
            assert_overloaded(response, queue_size=2)
        # Only the three that got in were answered by the route.
        assert answered[0] == 3
        metrics = await stack.metrics()
        assert sample(metrics, "brief_rejections_total", reason="queue_full") == 5
        assert sample(metrics, "http_errors_total", status="503") == 5
        assert sample(metrics, "brownout_shed_seconds_count") == 5


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"mode": "fast"}', {"content-type": "application/json"}, 422, "validation_failed"),
        (b'{"text": "rose", "mode": "x"}', {"content-type": "application/json"}, 422, "validation_failed"),
        (b'{"text": "   "}', {"content-type": "application/json"}, 422, "invalid_value"),
        (b'{"text": "' + b"r" * 2001 + b'"}', {"content-type": "application/json"}, 422, "invalid_value"),
        (b"{not json", {"content-type": "application/json"}, 400, "invalid_json"),
        (b'{"text": "a rose perfume"}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ],
)
async def test_bad_input_is_reported_before_load(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    async with _saturated(fakes, tmp_path) as (stack, _):
        response = await stack.http.post("/v1/briefs", content=content, headers=headers)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert "Retry-After" not in response.headers
        metrics = await stack.metrics()
        assert sample(metrics, "brief_rejections_total", reason="queue_full") == 0


async def test_an_admitted_request_is_admitted_once(
    fakes: dict[str, FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(fakes, tmp_path) as stack:
        service = stack.service
        admissions: list[str] = []
        admit = service._admit

        def counting_admit(mode: str) -> Any:
            admissions.append(mode)
            return admit(mode)

        monkeypatch.setattr(service, "_admit", counting_admit)
        body = await stack.brief("a first request: a green tea cologne", "balanced")
        assert body["served_mode"] == "balanced"
        assert admissions == ["balanced"]
        # A repeat is answered from the cache, without an admission.
        again = await stack.http.post(
            "/v1/briefs", json={"text": "a first request: a green tea cologne", "mode": "balanced"}
        )
        assert again.status_code == 200
        assert again.json()["cached"] is True
        assert admissions == ["balanced"]


async def test_the_route_admits_a_request_that_came_without_a_ticket(
    fakes: dict[str, FakeLLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def declines(self: EarlyAdmission, scope: Any, body: bytes, send: Any) -> bool:
        return False  # a front that admitted nothing: the route is then the only way in

    monkeypatch.setattr(EarlyAdmission, "__call__", declines)
    async with _saturated(fakes, tmp_path) as (stack, answered):
        response = await stack.post("a request the front let through, refused by the route", "balanced")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "overloaded"
        # It reached the route, which admitted it itself and refused it: only the three were answered.
        assert answered[0] == 3
        metrics = await stack.metrics()
        assert sample(metrics, "brief_rejections_total", reason="queue_full") == 1
    async with serve(fakes, tmp_path / "idle") as stack:
        body = await stack.brief("a request the front let through, served by the route", "fast")
        assert body["served_mode"] == "fast"


_TEXTS = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
_BODIES = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda text, mode, extra, ascii_only: json.dumps(
            {"text": text, **({"mode": mode} if mode is not None else {}), **extra}, ensure_ascii=ascii_only
        ).encode("utf-8", "surrogatepass"),
        _TEXTS,
        st.one_of(st.none(), st.sampled_from(["fast", "balanced", "creative", "turbo", ""])),
        st.dictionaries(st.sampled_from(["colour", "mode", "text"]), st.none() | st.integers(), max_size=1),
        st.booleans(),
    ),
    st.builds(lambda text: b'{"text": "' + text + b'"}', st.binary(max_size=16)),
)


@given(_BODIES)
@settings(max_examples=400, deadline=None)
def test_the_early_admission_takes_only_bodies_the_route_takes(body: bytes) -> None:
    # What EarlyAdmission parses (pydantic's JSON parser) is never more than the route takes (the
    # strict parser, then the same model): a body it would admit or refuse for load is one the route
    # would serve, so bad input is never answered with a 503.
    try:
        early = BriefRequest.model_validate_json(body)
    except ValidationError:
        return
    routed = BriefRequest.model_validate(parse_json_body(body))
    assert (routed.text, routed.mode) == (early.text, early.mode)
