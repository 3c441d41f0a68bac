"""The jobs API on the app with fake models: shape, refusals, idempotency, mock items, cancel, progress.

Each test runs the whole server (:func:`support.stack.serve`) with the brief roles on
:class:`~brownout.chaos.fakellm.FakeLLM` servers on 127.0.0.1; jobs run through the real workers,
the real pipeline and the real SQLite database.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from brownout.chaos.fakellm import FakeLLM
from brownout.durable.jobs import FINAL_STATES
from brownout.server.routes.jobs import JobRequest, job_view
from support.live import Receiver, serve_app
from support.stack import Stack, brief_of, distinct_text, sample, serve
from support.wait import until

FAST = {"jobs": {"poll_interval": 0.05, "backoff_base": 0.01}}


def _items(n: int, mode: str = "fast") -> list[dict[str, str]]:
    return [{"text": distinct_text(i), "mode": mode} for i in range(n)]


async def _submit(stack: Stack, items: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    return await stack.http.post(
        "/v1/jobs", json={"type": "briefs", "items": items, **extra}, headers=headers
    )


async def _wait_end(stack: Stack, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal last
        response = await stack.http.get(f"/v1/jobs/{job_id}", params={"limit": 1000})
        assert response.status_code == 200, response.text
        last = response.json()
        return last["state"] in FINAL_STATES

    await until(ended, f"job {job_id} to end", timeout=timeout, interval=0.05)
    return last


async def test_a_job_runs_each_item_through_the_pipeline_once_and_ends_succeeded(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path, FAST) as stack:
        before = fakes["qwen"].chat_requests
        response = await _submit(stack, _items(6))
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["state"] == "queued"
        assert body["progress"] == {"done": 0, "failed": 0, "total": 6, "mock": 0, "pending": 6}
        assert response.headers["location"] == f"/v1/jobs/{body['id']}"
        job = await _wait_end(stack, body["id"])
        assert job["state"] == "succeeded", job
        assert job["progress"] == {"done": 6, "failed": 0, "total": 6, "mock": 0, "pending": 0}
        assert [item["index"] for item in job["items"]] == list(range(6))
        for item in job["items"]:
            assert item["state"] == "succeeded"
            assert item["served_by"] == "model:qwen"
            assert item["mock"] is False
            assert item["error"] is None
            assert item["result"]["served_mode"] == "fast"
            brief_of(item["result"])
        # One generator call per item: nothing ran twice.
        assert fakes["qwen"].chat_requests - before == 6
        assert await stack.runtime.jobs.store.item_counts(body["id"]) == {"succeeded": 6}
        assert job["started_at"] is not None
        assert job["finished_at"] is not None
        # Listing, by state, and pages of items.
        listed = (await stack.http.get("/v1/jobs", params={"state": "succeeded"})).json()["jobs"]
        assert [j["id"] for j in listed] == [body["id"]]
        assert "items" not in listed[0]
        assert (await stack.http.get("/v1/jobs", params={"state": "queued"})).json() == {"jobs": []}
        page = (await stack.http.get(f"/v1/jobs/{body['id']}", params={"offset": 4, "limit": 5})).json()
        assert [i["index"] for i in page["items"]] == [4, 5]
        assert page["items_page"] == {"offset": 4, "count": 2, "total": 6}
        bare = (await stack.http.get(f"/v1/jobs/{body['id']}", params={"items": "false"})).json()
        assert "items" not in bare
        metrics = await stack.metrics()
        assert sample(metrics, "brownout_job_items_total", outcome="succeeded") == 6
        await until(lambda: stack.runtime.jobs.counts.get("succeeded") == 1, "the workers' next round")
        metrics = await stack.metrics()
        assert sample(metrics, "brownout_jobs", state="succeeded") == 1
        assert sample(metrics, "brownout_jobs", state="queued") == 0
        assert sample(metrics, "brownout_jobs_queue_age_seconds") == 0


async def test_refusals_name_what_is_wrong_in_the_one_error_shape(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path, {"jobs": {"max_items": 10}}) as stack:

        async def refused(body: dict[str, Any], status: int) -> dict[str, Any]:
            response = await stack.http.post("/v1/jobs", json=body)
            assert response.status_code == status, response.text
            error: dict[str, Any] = response.json()["error"]
            return error

        error = await refused({"type": "briefs", "items": []}, 422)
        assert error["param"] == "items"
        error = await refused({"type": "videos", "items": _items(1)}, 422)
        assert error["param"] == "type"
        error = await refused({"type": "briefs", "items": [*_items(2), {"text": ""}]}, 422)
        assert error["param"] == "items.2.text"
        error = await refused({"type": "briefs", "items": [*_items(1), {"text": "   ", "mode": "fast"}]}, 422)
        assert error["param"] == "items.1.text"
        assert "empty" in error["message"]
        error = await refused({"type": "briefs", "items": [{"text": "x", "mode": "turbo"}]}, 422)
        assert error["param"] == "items.0.mode"
        error = await refused({"type": "briefs", "items": _items(11)}, 413)
        assert error["code"] == "too_many_items"
        assert "limit is 10" in error["message"]
        error = await refused({"type": "briefs", "items": _items(1), "webhook": "ftp://x"}, 422)
        assert error["param"] == "webhook"
        missing = await stack.http.get("/v1/jobs/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "job_not_found"
        assert (await stack.http.post("/v1/jobs/nope/cancel")).status_code == 404
        assert (await stack.http.get("/v1/jobs", params={"state": "lost"})).status_code == 422
        # Bodies beyond server.max_body_bytes are fine here, up to jobs.max_body_bytes.
        big = [{"text": "rose " * 399, "mode": "fast"}] * 10
        assert len(json.dumps({"type": "briefs", "items": big})) > stack.runtime.config.server.max_body_bytes
        accepted = await _submit(stack, big)
        assert accepted.status_code == 202, accepted.text
        schema = (await stack.http.get("/openapi.json")).json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"} <= set(schema["paths"])
        assert "JobRequest" in schema["components"]["schemas"]


async def test_a_retried_submission_with_the_same_idempotency_key_gets_the_same_job(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path, FAST) as stack:
        key = {"Idempotency-Key": "order-42"}
        first = await _submit(stack, _items(3), headers=key)
        again = await _submit(stack, _items(3), headers=key)
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["id"] == again.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        other = await _submit(stack, _items(2), headers=key)
        assert other.status_code == 422
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        await _wait_end(stack, first.json()["id"])
        later = await _submit(stack, _items(3), headers=key)
        assert later.status_code == 200
        assert later.json()["state"] == "succeeded"
        assert len((await stack.http.get("/v1/jobs")).json()["jobs"]) == 1
        assert await stack.runtime.jobs.store.item_counts(first.json()["id"]) == {"succeeded": 3}


async def test_with_the_models_down_items_finish_in_mock_mode_and_say_so(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path, FAST) as stack:
        for fake in fakes.values():
            fake.set("down")
        response = await _submit(stack, _items(4, "balanced"))
        job = await _wait_end(stack, response.json()["id"])
        assert job["state"] == "succeeded"
        assert job["progress"]["mock"] == 4
        assert job["progress"]["done"] == 4
        assert "4 in mock mode" in job["reason"]
        for item in job["items"]:
            assert item["mock"] is True
            assert item["served_by"] in ("rules", "popular")
            assert item["result"]["reliability"] == "low"
        assert sample(await stack.metrics(), "brownout_job_items_total", outcome="mock") == 4


async def test_a_cancelled_job_stops_starting_items_within_a_second(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path, {"jobs": {"poll_interval": 0.05, "concurrency": 2}}) as stack:
        fakes["qwen"].set("ok", delay=0.5)
        before = fakes["qwen"].chat_requests
        response = await _submit(stack, _items(20))
        job_id = response.json()["id"]
        await until(lambda: fakes["qwen"].open_chats >= 1, "the first items to reach the model")
        loop = asyncio.get_running_loop()
        asked = loop.time()
        cancelled = await stack.http.post(f"/v1/jobs/{job_id}/cancel")
        assert loop.time() - asked < 1.0
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        assert cancelled.json()["reason"] == "cancelled by request"
        started = fakes["qwen"].chat_requests - before
        await until(lambda: stack.runtime.jobs.running == [], "the job's running items to finish")
        # No item started after the cancel; the ones running finished and kept their results.
        assert fakes["qwen"].chat_requests - before == started <= 2
        job = (await stack.http.get(f"/v1/jobs/{job_id}")).json()
        assert job["state"] == "cancelled"
        counts = await stack.runtime.jobs.store.item_counts(job_id)
        assert counts.get("succeeded", 0) == job["progress"]["done"] == started
        assert counts["cancelled"] == 20 - started
        again = await stack.http.post(f"/v1/jobs/{job_id}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "job_ended"


async def test_progress_goes_out_on_the_live_channel_and_the_end_to_the_webhook(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    receiver = Receiver(fail_first=1)
    async with serve_app(receiver.app()) as hook_url, serve(fakes, tmp_path, FAST) as stack:
        client = stack.runtime.live.connect()
        response = await _submit(stack, _items(3), webhook=f"{hook_url}/hook/t")
        job_id = response.json()["id"]
        await _wait_end(stack, job_id)
        seen: list[dict[str, Any]] = []
        while not client.queue.empty():
            message = client.queue.get_nowait()
            if message is not None and message.type == "job":
                seen.append(json.loads(message.data)["job"])
        assert [m["progress"]["done"] for m in seen if m["state"] == "running"][-1] == 3
        assert seen[-1]["state"] == "succeeded"
        assert seen[-1]["id"] == job_id
        # The end is kept for late joiners; progress is not.
        assert [e["job"]["state"] for e in stack.runtime.live.recent if e["type"] == "job"] == ["succeeded"]
        await until(lambda: receiver.received, "the webhook")
        assert receiver.attempts == 2  # the first POST got 503 and was sent again
        assert receiver.received[0]["id"] == job_id
        assert receiver.received[0]["state"] == "succeeded"
        assert receiver.received[0]["progress"]["done"] == 3


def test_the_request_model_and_the_view_are_plain_data() -> None:
    body = JobRequest.model_validate({"type": "briefs", "items": [{"text": "rose"}]})
    assert body.items[0].mode == "balanced"
    assert job_view.__doc__
