"""The fault-injecting OpenAI-compatible server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import httpx
import pytest
from pydantic import BaseModel, Field, ValidationError

from brownout.chaos.fakellm import GARBAGE, MODES, FakeBehaviour, FakeLLM, schema_instance, schema_violation


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        yield client


def chat_body(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "a brief please"}]}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "brief", "schema": schema}}
    return body


async def chat(
    http: httpx.AsyncClient, fake: FakeLLM, schema: dict[str, Any] | None = None, **kw: Any
) -> httpx.Response:
    return await http.post(f"{fake.url}/v1/chat/completions", json=chat_body(schema), **kw)


def content_of(response: httpx.Response) -> str:
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


# ------------------------------------------------------------------ a schema like the briefs' one


class Family(enum.Enum):
    FLORAL = "floral"
    WOODY = "woody"


class Note(BaseModel):
    name: Annotated[str, Field(min_length=2, max_length=12)]
    weight: Annotated[int, Field(ge=1, le=9)]


class Brief(BaseModel):
    description: Annotated[str, Field(max_length=4)]
    family: Family
    longevity: Literal["short", "medium", "long"]
    intensity: Annotated[int, Field(ge=0, le=100)]
    ratio: Annotated[float, Field(gt=0, lt=1)]
    notes: Annotated[list[Note], Field(min_length=2, max_length=5)]
    tags: Annotated[list[Literal["a", "b", "c"]], Field(min_length=3)]
    vegan: bool
    season: Literal["spring", "autumn"] | None
    comment: str | None = None


BRIEF_SCHEMA = Brief.model_json_schema()


def test_schema_instance_is_valid_for_a_nested_pydantic_schema() -> None:
    instance = schema_instance(BRIEF_SCHEMA)
    brief = Brief.model_validate_json(json.dumps(instance), strict=True)
    assert brief.family is Family.FLORAL  # enum -> first value
    assert brief.longevity == "short"
    assert brief.intensity == 50  # midpoint of 0..100
    assert 0 < brief.ratio < 1
    assert len(brief.notes) == 2  # minItems
    assert all(n.weight == 5 for n in brief.notes)
    assert len(brief.description) <= 4
    assert brief.season == "spring"  # first non-null branch of anyOf
    assert "comment" not in instance  # optional properties are left out
    assert schema_instance(BRIEF_SCHEMA) == instance  # deterministic


def check(schema: dict[str, Any], value: Any) -> list[str]:
    """A tiny JSON-schema checker for the keywords the generator promises to honour."""
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{value!r} not in enum")
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{value!r} is not an object"]
        errors += [f"missing {k}" for k in schema.get("required", []) if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += check(sub, value[key])
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{value!r} is not an array"]
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 10**9):
            errors.append(f"{len(value)} items")
        if schema.get("uniqueItems") and len({json.dumps(v) for v in value}) != len(value):
            errors.append("items not unique")
        for item in value:
            errors += check(schema.get("items", {}), item)
    elif kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int if kind == "integer" else (int, float)):
            return [f"{value!r} is not a {kind}"]
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{value} < minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{value} > maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{value} <= exclusiveMinimum")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            errors.append(f"{value} >= exclusiveMaximum")
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{value!r} is not a string"]
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9):
            errors.append(f"length {len(value)} of {value!r}")
    elif kind == "boolean" and not isinstance(value, bool):
        errors.append(f"{value!r} is not a boolean")
    return errors


HAND_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["top", "tiers", "codes", "score", "flag", "ids", "tiny"],
    "properties": {
        "top": {"type": "string", "enum": ["fresh", "warm"]},
        "tiers": {
            "type": "array",
            "minItems": 2,
            "maxItems": 3,
            "items": {
                "type": "object",
                "required": ["level", "label"],
                "properties": {
                    "level": {"type": "integer", "minimum": 3, "maximum": 8},
                    "label": {"type": "string", "minLength": 10, "maxLength": 12},
                    "unused": {"type": "string"},
                },
            },
        },
        "codes": {"type": "array", "uniqueItems": True, "minItems": 3, "items": {"enum": ["x", "y", "z"]}},
        "ids": {
            "type": "array",
            "uniqueItems": True,
            "minItems": 3,
            "items": {"type": "string", "maxLength": 2},
        },
        "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
        "flag": {"type": "boolean"},
        "tiny": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
        "optional": {"type": "integer"},
    },
}


def test_schema_instance_honours_bounds_lengths_and_uniqueness() -> None:
    instance = schema_instance(HAND_SCHEMA)
    assert check(HAND_SCHEMA, instance) == []
    assert instance["tiers"][0] == {"level": 5, "label": "samplexxxx"}
    assert instance["tiny"] == 1
    assert instance["score"] == 0.25
    assert set(instance["codes"]) == {"x", "y", "z"}
    assert "optional" not in instance


def test_schema_violation_breaks_the_schema_but_is_json() -> None:
    bad = schema_violation(BRIEF_SCHEMA)
    json.dumps(bad)  # valid JSON
    with pytest.raises(ValidationError):
        Brief.model_validate(bad)
    assert check(HAND_SCHEMA, schema_violation(HAND_SCHEMA)) != []
    assert "top" not in schema_violation(HAND_SCHEMA)  # first required key dropped
    # Nothing to push out of range: still not an instance of the schema.
    assert check({"type": "string"}, schema_violation({"type": "string"})) != []


def test_recursive_schemas_terminate() -> None:
    class Node(BaseModel):
        name: str
        children: list[Node]

    instance = schema_instance(Node.model_json_schema())
    Node.model_validate(instance)
    depth, node = 0, instance
    while node["children"]:
        depth, node = depth + 1, node["children"][0]
    assert 1 <= depth <= 10


# ------------------------------------------------------------------ modes over HTTP


async def test_ok_mode_answers_like_openai(http: httpx.AsyncClient) -> None:
    async with FakeLLM(model="tiny") as fake:
        assert fake.url.startswith("http://127.0.0.1:")
        health = await http.get(f"{fake.url}/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        models = await http.get(f"{fake.url}/v1/models")
        assert models.json()["data"][0]["id"] == "tiny"
        r = await chat(http, fake)
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["model"] == "m"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 1
        assert fake.last_chat == chat_body()
        assert (fake.requests, fake.chat_requests) == (3, 1)


async def test_ok_mode_generates_the_requested_schema(http: httpx.AsyncClient) -> None:
    async with FakeLLM() as fake:
        r = await chat(http, fake, BRIEF_SCHEMA)
        Brief.model_validate_json(content_of(r), strict=True)
        fake.set("ok", content="fixed text")
        assert content_of(await chat(http, fake, BRIEF_SCHEMA)) == "fixed text"


async def test_error_mode_sends_status_and_retry_after(http: httpx.AsyncClient) -> None:
    async with FakeLLM("error") as fake:
        r = await chat(http, fake)
        assert r.status_code == 500
        assert "retry-after" not in r.headers
        assert r.json()["error"]["code"] == 500
        assert (await http.get(f"{fake.url}/health")).status_code == 503
        fake.set("error", status=429, retry_after=7)
        r = await chat(http, fake)
        assert (r.status_code, r.headers["retry-after"]) == (429, "7")


async def test_down_mode_fails_health_and_chat(http: httpx.AsyncClient) -> None:
    async with FakeLLM("down", retry_after=3) as fake:
        assert (await http.get(f"{fake.url}/health")).json() == {"status": "loading"}
        r = await chat(http, fake)
        assert (r.status_code, r.headers["retry-after"]) == (503, "3")


async def test_hang_mode_holds_the_request_until_the_client_gives_up(http: httpx.AsyncClient) -> None:
    async with FakeLLM("hang") as fake:
        with pytest.raises(httpx.ReadTimeout):
            await chat(http, fake, timeout=0.2)
        assert (await http.get(f"{fake.url}/health")).status_code == 200  # the server itself is alive
        fake.set("ok")
        assert content_of(await chat(http, fake)) == "ok"


async def test_stopping_releases_held_requests_and_leaks_no_tasks(http: httpx.AsyncClient) -> None:
    fake = FakeLLM("hang")
    await fake.start()
    held = asyncio.create_task(chat(http, fake, timeout=30))
    # The fake offers no hook for "a request arrived"; polling its counter is the honest wait.
    while fake.chat_requests == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await fake.stop()
    assert not fake.running
    assert (await held).status_code == 503  # answered at shutdown, not after 30 s
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_slow_mode_answers_after_the_delay(http: httpx.AsyncClient) -> None:
    async with FakeLLM("slow", delay=0.3) as fake:
        with pytest.raises(httpx.ReadTimeout):
            await chat(http, fake, timeout=0.1)
        assert content_of(await chat(http, fake, timeout=3.0)) == "ok"
    assert FakeBehaviour(mode="slow").effective_delay == 2.0
    assert FakeBehaviour(mode="ok").effective_delay == 0.0


async def test_slots_queue_requests_beyond_them_inside_the_server(http: httpx.AsyncClient) -> None:
    async with FakeLLM("slow", delay=0.2, slots=2) as fake:
        answers = await asyncio.gather(*(chat(http, fake, timeout=10.0) for _ in range(5)))
        assert [r.status_code for r in answers] == [200] * 5
        assert fake.peak_open_chats == 5  # the server took all five ...
        assert fake.peak_answering == 2  # ... and answered two at a time
        assert fake.open_chats == 0
        state = (await http.get(f"{fake.url}/_control")).json()
        assert (state["peak_open_chats"], state["peak_answering"]) == (5, 2)
        # A client that gives up while its request waits for a slot leaves nothing behind.
        fake.set("hang")
        with pytest.raises(httpx.ReadTimeout):
            await asyncio.gather(*(chat(http, fake, timeout=0.3) for _ in range(3)))
        fake.set("ok")
        assert content_of(await chat(http, fake, timeout=10.0)) == "ok"
    with pytest.raises(ValueError, match="slots"):
        FakeLLM(slots=0)


async def test_without_slots_every_request_is_answered_at_once(http: httpx.AsyncClient) -> None:
    async with FakeLLM("slow", delay=0.2) as fake:
        await asyncio.gather(*(chat(http, fake, timeout=10.0) for _ in range(4)))
        assert fake.peak_answering == 4


async def test_garbage_mode_answers_prose(http: httpx.AsyncClient) -> None:
    async with FakeLLM("garbage") as fake:
        text = content_of(await chat(http, fake, BRIEF_SCHEMA))
        assert text == GARBAGE
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


async def test_wrong_schema_mode_answers_json_that_fails_validation(http: httpx.AsyncClient) -> None:
    async with FakeLLM("wrong_schema") as fake:
        text = content_of(await chat(http, fake, BRIEF_SCHEMA))
        document = json.loads(text)
        assert isinstance(document, dict)
        assert "description" not in document  # the first required key is missing
        assert document["intensity"] == 101  # pushed out of range
        with pytest.raises(ValidationError):
            Brief.model_validate(document)


async def test_flaky_mode_fails_n_times_then_answers(http: httpx.AsyncClient) -> None:
    async with FakeLLM("flaky", fail_times=2) as fake:
        statuses = [(await chat(http, fake)).status_code for _ in range(4)]
        assert statuses == [500, 500, 200, 200]


async def test_malformed_mode_answers_a_body_that_is_not_a_completion(http: httpx.AsyncClient) -> None:
    async with FakeLLM("malformed") as fake:
        r = await chat(http, fake)
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            r.json()
        fake.set("malformed", content='{"object": "chat.completion"}')
        assert (await chat(http, fake)).json() == {"object": "chat.completion"}


async def test_control_endpoint_switches_modes_and_reports_counters(http: httpx.AsyncClient) -> None:
    async with FakeLLM() as fake:
        await chat(http, fake)
        r = await http.post(f"{fake.url}/_control", json={"mode": "error", "status": 502})
        assert r.json()["mode"] == "error"
        assert (await chat(http, fake)).status_code == 502
        state = (await http.get(f"{fake.url}/_control")).json()
        assert (state["mode"], state["status"], state["requests"], state["chat_requests"]) == (
            "error",
            502,
            2,
            2,
        )
        bad = await http.post(f"{fake.url}/_control", json={"mode": "sideways"})
        assert bad.status_code == 422
        assert (await http.post(f"{fake.url}/_control", json={"moed": "ok"})).status_code == 422
        assert fake.behaviour.mode == "error"  # a rejected control leaves the behaviour alone
        await http.post(f"{fake.url}/_control", json={"mode": "ok"})
        assert fake.behaviour == FakeBehaviour()  # each control message is the whole behaviour


async def test_bad_requests_get_400(http: httpx.AsyncClient) -> None:
    async with FakeLLM() as fake:
        r = await http.post(f"{fake.url}/v1/chat/completions", content=b"{nope")
        assert r.status_code == 400
        r = await http.post(f"{fake.url}/v1/chat/completions", json={"prompt": "x"})
        assert r.status_code == 400


async def test_restart_keeps_port_and_counters(http: httpx.AsyncClient) -> None:
    fake = FakeLLM()
    async with fake:
        url = fake.url
        await chat(http, fake)
    with pytest.raises(httpx.ConnectError):
        await http.get(f"{url}/health")
    async with fake:
        assert fake.url == url
        assert (await http.get(f"{url}/health")).status_code == 200
        assert fake.chat_requests == 1


def test_every_mode_is_documented_and_settable() -> None:
    fake = FakeLLM()
    for mode in MODES:
        fake.set(mode)  # type: ignore[arg-type]
        assert fake.behaviour.mode == mode
    with pytest.raises(ValidationError):
        fake.set("ok", delay=-1)


def test_runs_as_a_process_and_dies_on_sigkill() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "brownout.chaos.fakellm", "--port", "0", "--mode", "ok", "--delay", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        assert ready, "fakellm did not start within 20 s"
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:"), line
        url = line.split()[1]
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            assert client.get(f"{url}/health").json() == {"status": "ok"}
            r = client.post(f"{url}/v1/chat/completions", json=chat_body())
            assert r.json()["choices"][0]["message"]["content"] == "ok"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            with pytest.raises(httpx.ConnectError):
                client.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
