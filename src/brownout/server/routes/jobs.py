"""The jobs API: long lists of work handed over in one request, run by the server's own workers.

* ``POST /v1/jobs`` ``{"type": "briefs", "items": [{"text": ..., "mode": ...}, ...], "webhook": ...}``
  -> **202** ``{"id", "state": "queued", ...}`` and ``Location: /v1/jobs/{id}``. With an
  ``Idempotency-Key`` header, a retry of the same submission gets the job it created: **200**, the
  same ``id``, and ``Idempotent-Replayed: true``; the same key with a different body is refused (422,
  ``idempotency_key_reused``). Refusals, in the one error shape: 422 for a bad body (an unknown
  ``type``, no items, a bad item -- ``param`` names it, ``items.3.text``), 413 for more items than
  ``jobs.max_items`` (default 1,000) or a body over ``jobs.max_body_bytes``, 503 while the jobs
  cannot be stored (database away) or jobs are switched off.
* ``GET /v1/jobs/{id}`` -> the job: ``id``, ``type``, ``state``, ``reason``, ``progress``
  (``done``: items with a result, ``failed``, ``total``, ``mock``: results from the rule-based
  brief, ``pending``), ``created_at``, ``updated_at``, ``started_at``, ``finished_at``, ``waiting``
  (why its next item waits, when it does), and a page of ``items`` (``index``, ``state``,
  ``result``, ``served_by``, ``error``, ``mock``, ``attempts``): ``?offset=0&limit=100`` (at most
  1,000), ``?items=false`` for none; ``items_page`` says which.
* ``GET /v1/jobs?state=running&limit=100&offset=0`` -> ``{"jobs": [...]}``, newest first, no items.
* ``POST /v1/jobs/{id}/cancel`` -> the job, ``cancelled`` (running items may finish and keep their
  results; no new one starts); 409 when it had already ended, 404 for an unknown id.

The same job's progress goes out on the live channel (``/api/v1/events``, ``/api/v1/ws``) as ``job``
messages, and to its ``webhook`` when it ends.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, field_validator

from brownout.config import JobsSection
from brownout.durable.jobs import JOB_STATES, ItemRow, JobRow
from brownout.server.errors import ApiError
from brownout.server.jobs import JobsCollector, JobWorkers
from brownout.server.routes.briefs import BriefRequest

__all__ = ["JobRequest", "install", "job_view"]

MAX_PAGE = 1000
"""The most items one ``GET /v1/jobs/{id}`` returns."""


class JobRequest(BaseModel):
    """The body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["briefs"] = Field(description="the job type: briefs (a brief per item)")
    items: list[BriefRequest] = Field(min_length=1, description="the work: one brief request per item")
    webhook: str | None = Field(
        default=None, max_length=2000, description="an http(s) URL POSTed the job's summary when it ends"
    )

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("webhook must be an http:// or https:// URL")
        return value


class Progress(BaseModel):
    """How far a job is."""

    done: int = Field(description="items with a result")
    failed: int = Field(description="items that failed for good")
    total: int = Field(description="items in the job")
    mock: int = Field(description="results from the rule-based brief (no model wrote them)")
    pending: int = Field(description="items without an outcome (cancelled ones included)")


class JobItem(BaseModel):
    """One item of a job."""

    index: int
    state: str = Field(description="pending, running, succeeded, failed or cancelled")
    result: dict[str, Any] | None = Field(description="the answer (a brief), once done")
    served_by: str | None = Field(description="what wrote it: model:qwen, cache, rules, ...")
    error: str | None = Field(description="why it failed: the failure kind, then what happened")
    mock: bool = Field(description="the result is the rule-based brief: no model wrote it")
    attempts: int


class JobView(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` shows it."""

    id: str
    type: str
    state: str = Field(description=", ".join(JOB_STATES))
    reason: str | None
    progress: Progress
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    waiting: str | None = Field(default=None, description="why its next item waits now (interactive first)")
    items: list[JobItem] | None = None
    items_page: dict[str, int] | None = None


class JobList(BaseModel):
    """``GET /v1/jobs``."""

    jobs: list[JobView]


def _stamp(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _item(row: ItemRow) -> dict[str, Any]:
    return {
        "index": row.index,
        "state": row.state,
        "result": row.result,
        "served_by": row.served_by,
        "error": row.error,
        "mock": row.mock,
        "attempts": row.attempts,
    }


def job_view(
    job: JobRow, items: list[ItemRow] | None = None, *, offset: int = 0, waiting: str | None = None
) -> dict[str, Any]:
    """The JSON of ``job`` (and a page of its ``items`` from ``offset``, when given)."""
    view: dict[str, Any] = {
        "id": job.id,
        "type": job.type,
        "state": job.state,
        "reason": job.reason,
        "progress": {
            "done": job.done,
            "failed": job.failed,
            "total": job.total,
            "mock": job.mock,
            "pending": job.total - job.done - job.failed,
        },
        "created_at": _stamp(job.created_at),
        "updated_at": _stamp(job.updated_at),
        "started_at": _stamp(job.started_at),
        "finished_at": _stamp(job.finished_at),
        "waiting": waiting,
    }
    if items is not None:
        view["items"] = [_item(i) for i in items]
        view["items_page"] = {"offset": offset, "count": len(items), "total": job.total}
    return view


def _request_hash(body: JobRequest) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _unavailable(e: Exception) -> ApiError:
    return ApiError(503, f"jobs cannot be reached in the database now: {type(e).__name__}", retry_after=5)


def install(
    router: APIRouter, *, section: JobsSection, workers: JobWorkers, registry: CollectorRegistry | None = None
) -> None:
    """Add the jobs routes to ``router``, run by ``workers``; their metrics go to ``registry``."""
    store = workers.store
    if registry is not None:
        registry.register(JobsCollector(workers))

    def ready() -> None:
        if not section.enabled:
            raise ApiError(
                503, "jobs are switched off here (jobs.enabled)", code="jobs_disabled", retry_after=300
            )
        if not workers.ready:
            raise ApiError(503, "jobs wait for the database", code="starting", retry_after=5)

    @router.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobView,
        responses={
            200: {"model": JobView, "description": "a retried submission (same Idempotency-Key): its job"}
        },
    )
    async def submit_job(
        body: JobRequest,
        idempotency_key: Annotated[
            str | None,
            Header(max_length=255, description="a retry with the same key gets the same job (200)"),
        ] = None,
    ) -> JSONResponse:
        """Submit a job (202); a retried submission with the same ``Idempotency-Key`` gets it again (200)."""
        ready()
        if len(body.items) > section.max_items:
            raise ApiError(
                413,
                f"the job has {len(body.items)} items; the limit is {section.max_items} (jobs.max_items)",
                code="too_many_items",
                param="items",
            )
        handler = workers.handlers.get(body.type)
        if handler is None:
            raise ApiError(
                422, f"this server does not run {body.type!r} jobs", code="unknown_type", param="type"
            )
        items = [item.model_dump() for item in body.items]
        for i, item in enumerate(items):
            try:
                handler.check(item)
            except ValueError as e:
                raise ApiError(
                    422, f"items.{i}.text: {e}", code="invalid_value", param=f"items.{i}.text"
                ) from e
        digest = _request_hash(body)
        try:
            job, created = await store.submit(
                body.type, items, idempotency_key=idempotency_key, request_hash=digest, webhook=body.webhook
            )
        except Exception as e:
            raise _unavailable(e) from e
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if not created:
            if job.request_hash != digest:
                raise ApiError(
                    422,
                    "this Idempotency-Key was used for a different job; use a new key for new work",
                    code="idempotency_key_reused",
                    param="Idempotency-Key",
                )
            headers["Idempotent-Replayed"] = "true"
        else:
            workers.kick()
        view = job_view(job, waiting=workers.waiting_for(job.id))
        return JSONResponse(view, status_code=202 if created else 200, headers=headers)

    @router.get("/v1/jobs/{job_id}", response_model=JobView)
    async def get_job(
        job_id: str,
        items: Annotated[bool, Query(description="include a page of items")] = True,
        offset: Annotated[int, Query(ge=0, description="first item index of the page")] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="items in the page")] = 100,
    ) -> JSONResponse:
        """A job, its progress and a page of its items."""
        ready()
        try:
            job = await store.get(job_id)
            if job is None:
                raise ApiError(404, f"no job {job_id!r}", code="job_not_found", param="job_id")
            rows = await store.items(job_id, offset=offset, limit=limit) if items else None
        except ApiError:
            raise
        except Exception as e:
            raise _unavailable(e) from e
        return JSONResponse(job_view(job, rows, offset=offset, waiting=workers.waiting_for(job_id)))

    @router.get("/v1/jobs", response_model=JobList)
    async def list_jobs(
        state: Annotated[
            Literal["queued", "running", "succeeded", "partially_succeeded", "failed", "cancelled"] | None,
            Query(description="only jobs in this state"),
        ] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> JSONResponse:
        """Jobs, newest first (without their items)."""
        ready()
        try:
            found = await store.list_jobs(state=state, offset=offset, limit=limit)
        except Exception as e:
            raise _unavailable(e) from e
        return JSONResponse({"jobs": [job_view(j, waiting=workers.waiting_for(j.id)) for j in found]})

    @router.post("/v1/jobs/{job_id}/cancel", response_model=JobView)
    async def cancel_job(job_id: str) -> JSONResponse:
        """Cancel a job: no new item starts; running ones may finish and keep their results."""
        ready()
        try:
            before = await store.get(job_id)
            if before is None:
                raise ApiError(404, f"no job {job_id!r}", code="job_not_found", param="job_id")
            job = await workers.cancel(job_id)
        except ApiError:
            raise
        except Exception as e:
            raise _unavailable(e) from e
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", code="job_not_found", param="job_id")
        if job.state != "cancelled" or before.state not in ("queued", "running"):
            raise ApiError(
                409, f"job {job_id} has already ended: {job.state}", code="job_ended", param="job_id"
            )
        return JSONResponse(job_view(job))
