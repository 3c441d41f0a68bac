"""``brownout bench jobs``: a job against the same items sent one by one, and a dead worker's reclaim.

1. **Throughput on the embedded model.** A default ``brownout serve`` (built-in config: the embedded
   model, its own temporary directory, a free port on 127.0.0.1) runs one ``briefs`` job of
   ``items`` distinct texts in ``mode``; then the same number of other distinct texts (no cache hit
   between the two) go as single ``POST /v1/briefs`` requests, ``level`` at a time, per level. The
   figure is briefs a model wrote per minute (a level high enough to make the server dim answers
   more, from rules and similar answers: not the same work); the job path's against the best
   level's, and the job items' retries (a busy model's 503 is retried with backoff).
2. **Reclaim after a worker dies.** Two replicas on a private Redis and PostgreSQL, their models
   :class:`~brownout.chaos.fakellm.FakeLLM` servers answering after ``fake_delay`` seconds (the
   figure is about handing work over, not about a model), ``jobs.lease`` of ``lease`` seconds. A job
   of ``reclaim_items`` items runs on both; once both have started items, the replica holding the job
   is killed with SIGKILL. Measured from the kill: when the live replica took the dead one's first
   item over (``item_reclaimed_s``: its reclaim counter moves), when it held the job
   (``job_reclaimed_s``), and when the job ended (``finished_s``); and that every item is stored once.

Load goes to 127.0.0.1 only, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from brownout.bench import child_env
from brownout.bench.client import brief_text

__all__ = ["Replica", "job_done", "metric", "run", "run_async"]


def metric(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The value of metric ``name`` (with ``labels``, in any order among others) in a Prometheus
    text exposition; 0.0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in (labels or {}).items()):
            return float(value)
    return 0.0


def job_done(job: Mapping[str, Any]) -> bool:
    """Whether a job (``GET /v1/jobs/{id}``'s JSON) has ended."""
    return job.get("state") not in ("queued", "running")


class Replica:
    """One ``python -m brownout serve`` on a config of its own (``config``, written as YAML in
    ``home``), its output in ``home/serve.log``; :meth:`kill` is SIGKILL."""

    def __init__(self, home: Path, config: Mapping[str, Any]) -> None:
        from brownout.llm.local import free_port

        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "serve.log"
        self.config_path = home / "brownout.yaml"
        server = {**dict(config.get("server", {})), "port": self.port}
        self.config_path.write_text(yaml.safe_dump({**dict(config), "server": server}))
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 120.0) -> None:
        """Start it and wait until ``/health`` answers 200."""
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "brownout",
                "serve",
                "--config",
                str(self.config_path),
                "--log-level",
                "warning",
                cwd=self.home,
                env=child_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0, trust_env=False) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        return
                if self.proc.returncode is not None:
                    raise RuntimeError(f"brownout serve exited while starting:\n{self.tail()}")
                if time.monotonic() > end:
                    raise RuntimeError(f"brownout serve did not start within {timeout:g}s:\n{self.tail()}")
                await asyncio.sleep(0.1)

    def tail(self, lines: int = 30) -> str:
        """The end of its output."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def kill(self) -> None:
        """SIGKILL: no clean stop, no lease given back."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20.0)
        except TimeoutError:
            await self.kill()


# ------------------------------------------------------------------------------------ throughput


async def _job_rate(
    http: httpx.AsyncClient, texts: Sequence[str], mode: str, timeout: float
) -> dict[str, Any]:
    items = [{"text": t, "mode": mode} for t in texts]
    started = time.monotonic()
    response = await http.post("/v1/jobs", json={"type": "briefs", "items": items})
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:300]}")
    job_id = response.json()["id"]
    while True:
        job = (await http.get(f"/v1/jobs/{job_id}")).json()
        if job_done(job):
            break
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the job did not end within {timeout:g}s: {job['progress']}")
        await asyncio.sleep(0.5)
    elapsed = time.monotonic() - started
    full = (await http.get(f"/v1/jobs/{job_id}", params={"limit": len(texts)})).json()
    served: dict[str, int] = {}
    for item in full["items"]:
        key = str(item.get("served_by"))
        served[key] = served.get(key, 0) + 1
    exposition = (await http.get("/metrics")).text
    return {
        "state": job["state"],
        "items": len(texts),
        "seconds": round(elapsed, 1),
        "items_per_min": round(len(texts) / elapsed * 60.0, 2),
        "model_items_per_min": _model_rate(served, elapsed),
        "progress": job["progress"],
        "served_by": served,
        "item_retries": metric(exposition, "brownout_job_item_retries_total"),
    }


def _model_rate(served: Mapping[str, int], elapsed: float) -> float:
    """Briefs a model wrote, per minute (a dimmed server answers more, from rules and similar
    answers: those are not the same work)."""
    model = sum(n for key, n in served.items() if key.startswith("model:"))
    return round(model / elapsed * 60.0, 2)


async def _single_rate(
    http: httpx.AsyncClient, texts: Sequence[str], mode: str, level: int
) -> dict[str, Any]:
    queue = list(texts)
    statuses: dict[int, int] = {}
    served: dict[str, int] = {}

    async def client() -> None:
        while queue:
            text = queue.pop()
            for _ in range(50):  # a refusal (503, Retry-After) is waited out and sent again
                response = await http.post("/v1/briefs", json={"text": text, "mode": mode})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code != 503:
                    break
                await asyncio.sleep(min(5.0, float(response.headers.get("retry-after", "1") or 1)))
            if response.status_code == 200:
                stages = response.json().get("stages") or [{}]
                key = str(stages[0].get("served_by"))
                served[key] = served.get(key, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(level)))
    elapsed = time.monotonic() - started
    return {
        "concurrency": level,
        "items": len(texts),
        "seconds": round(elapsed, 1),
        "items_per_min": round(len(texts) / elapsed * 60.0, 2),
        "model_items_per_min": _model_rate(served, elapsed),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "served_by": served,
    }


async def throughput(items: int, levels: Sequence[int], mode: str, startup_timeout: float) -> dict[str, Any]:
    """Part 1 (module docstring) on a default server: the job's rate, each level's, the best level."""
    with tempfile.TemporaryDirectory(prefix="brownout-bench-jobs-") as tmp:
        server = Replica(Path(tmp), {})
        try:
            await server.start(startup_timeout)
            async with httpx.AsyncClient(base_url=server.url, timeout=600.0, trust_env=False) as http:
                # The embedded model may still be loading after /health answers: one brief first.
                await http.post("/v1/briefs", json={"text": brief_text(10_000_000), "mode": mode})
                job = await _job_rate(http, [brief_text(i) for i in range(items)], mode, timeout=items * 60.0)
                rows = []
                for n, level in enumerate(levels):
                    base = 1_000_000 * (n + 1)
                    texts = [brief_text(base + i) for i in range(items)]
                    rows.append(await _single_rate(http, texts, mode, level))
        finally:
            await server.stop()
    # The best level is the one whose models wrote the most briefs per minute.
    best = max(rows, key=lambda r: r["model_items_per_min"]) if rows else None
    ratio = None
    if best is not None and best["model_items_per_min"] > 0:
        ratio = round(job["model_items_per_min"] / best["model_items_per_min"], 2)
    return {"job": job, "single": rows, "best_single": best, "job_vs_best_single": ratio}


# ------------------------------------------------------------------------------------ reclaim


def replica_config(
    home: Path, *, redis_url: str, database_url: str, model_urls: Mapping[str, str], lease: float
) -> dict[str, Any]:
    """A replica's config: roles on ``model_urls``, no local models, jobs on the shared stream."""
    return {
        "models": {
            "local": {"enabled": False},
            "health_interval": 3600.0,
            "roles": {
                role: {"endpoints": [{"url": url}], "timeout": 10.0} for role, url in model_urls.items()
            },
        },
        "loop_block": {"enabled": False},
        "resources": {"enabled": False},
        "redis": {"url": redis_url},
        "database": {"url": database_url, "spool_path": str(home / "spool.db")},
        "events": {"outbox_path": str(home / "events.db")},
        "jobs": {"distribute": "redis", "lease": lease, "poll_interval": 0.1},
    }


async def _metrics(http: httpx.AsyncClient, url: str) -> str:
    return (await http.get(f"{url}/metrics")).text


async def reclaim(items: int, lease: float, fake_delay: float) -> dict[str, Any]:
    """Part 2 (module docstring): two replicas, the job's holder killed mid-job."""
    from brownout.chaos.fakellm import FakeLLM
    from brownout.chaos.servers import PostgresServer, RedisServer
    from brownout.config import ROLES
    from brownout.durable.jobs import JobStore
    from brownout.durable.store import BriefStore

    fakes = [FakeLLM(model=role, delay=fake_delay) for role in ROLES]
    with tempfile.TemporaryDirectory(prefix="brownout-bench-reclaim-") as tmp:
        base = Path(tmp)
        redis = RedisServer()
        postgres = PostgresServer()
        replicas: list[Replica] = []
        try:
            await asyncio.gather(*(f.start() for f in fakes))
            await asyncio.gather(redis.astart(), postgres.astart())
            database = await asyncio.to_thread(postgres.create_database)
            urls = {role: fake.url for role, fake in zip(ROLES, fakes, strict=True)}
            for name in ("a", "b"):
                home = base / name
                home.mkdir()
                config = replica_config(
                    home, redis_url=redis.url, database_url=database.url, model_urls=urls, lease=lease
                )
                replicas.append(Replica(home, config))
            await asyncio.gather(*(r.start() for r in replicas))
            return await _reclaim_run(replicas, database.url, items, lease, JobStore, BriefStore)
        finally:
            await asyncio.gather(*(r.stop() for r in replicas))
            await asyncio.gather(asyncio.to_thread(redis.cleanup), asyncio.to_thread(postgres.cleanup))
            await asyncio.gather(*(f.stop() for f in fakes))


async def _reclaim_run(
    replicas: list[Replica], database_url: str, items: int, lease: float, job_store: Any, brief_store: Any
) -> dict[str, Any]:
    a, b = replicas
    body = {"type": "briefs", "items": [{"text": brief_text(i), "mode": "fast"} for i in range(items)]}
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
        response = await http.post(f"{a.url}/v1/jobs", json=body)
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:300]}")
        job_id = response.json()["id"]
        store = brief_store(database_url)
        jobs = job_store(store)
        try:
            # Both replicas at work, and some items done, before the kill.
            end = time.monotonic() + 120.0
            while True:
                texts = await asyncio.gather(*(_metrics(http, r.url) for r in replicas))
                taken = [metric(t, "brownout_jobs_claims_total", {"what": "item"}) for t in texts]
                job = await jobs.get(job_id)
                if job is not None and job.owner and min(taken) >= 2 and job.done >= items // 5:
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"the replicas did not both start the job's items: {taken}")
                await asyncio.sleep(0.05)
            holder_owner = job.owner
            victim, survivor = (a, b) if str(a.home) in holder_owner else (b, a)
            done_before = job.done
            await victim.kill()
            killed = time.monotonic()
            item_at = job_at = finished_at = None
            while finished_at is None:
                now = time.monotonic() - killed
                if now > 30.0 * lease + 120.0:
                    raise RuntimeError("the live replica did not finish the job")
                text = await _metrics(http, survivor.url)
                if item_at is None and metric(text, "brownout_jobs_reclaims_total", {"what": "item"}) > 0:
                    item_at = now
                if job_at is None and metric(text, "brownout_jobs_reclaims_total", {"what": "job"}) > 0:
                    job_at = now
                row = await jobs.get(job_id)
                if row is not None and row.state not in ("queued", "running"):
                    finished_at = now
                    break
                await asyncio.sleep(0.05)
            counts = await jobs.item_counts(job_id)
            final = await jobs.get(job_id)
        finally:
            await store.aclose()
    return {
        "items": items,
        "lease_s": lease,
        "done_before_kill": done_before,
        "item_reclaimed_s": None if item_at is None else round(item_at, 2),
        "job_reclaimed_s": None if job_at is None else round(job_at, 2),
        "finished_s": round(finished_at, 2),
        "state": None if final is None else final.state,
        "item_states": counts,
        "every_item_once": counts == {"succeeded": items} and final is not None and final.done == items,
    }


# ------------------------------------------------------------------------------------ the bench


def _machine() -> dict[str, Any]:
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "note": "a shared machine: other sessions run tests beside this one, so figures are provisional",
    }


async def run_async(
    *,
    items: int = 30,
    levels: Sequence[int] = (1, 2, 4),
    mode: str = "fast",
    throughput_part: bool = True,
    reclaim_part: bool = True,
    reclaim_items: int = 60,
    lease: float = 5.0,
    fake_delay: float = 0.3,
    startup_timeout: float = 300.0,
) -> dict[str, Any]:
    """The whole bench (module docstring); returns the ``--json`` document."""
    if items < 1 or reclaim_items < 4:
        raise ValueError("items must be at least 1 and reclaim items at least 4")
    if not levels or min(levels) < 1 or max(levels) > 64:
        raise ValueError("levels must be between 1 and 64")
    result: dict[str, Any] = {"bench": "jobs", "machine": _machine(), "mode": mode}
    if throughput_part:
        result["throughput"] = await throughput(items, levels, mode, startup_timeout)
    if reclaim_part:
        result["reclaim"] = await reclaim(reclaim_items, lease, fake_delay)
    return result


def run(**kwargs: Any) -> dict[str, Any]:
    """:func:`run_async` in a new event loop."""
    return asyncio.run(run_async(**kwargs))
