"""Bounded load against a brownout server on 127.0.0.1, every answer classified.

:class:`Load` sends ``POST /v1/briefs`` at a fixed rate (open loop, at most ``max_in_flight`` at once)
with unique texts, so each request reaches the pipeline rather than the response cache, and records a
:class:`Sample` per request. :meth:`Load.burst` sends many at once (stampede, queue overflow).

:func:`classify` reads the answer as a client would (the response shape of
:mod:`brownout.briefs.service` and :mod:`brownout.server.app`):

* ``full`` -- HTTP 200, served in the requested mode, every stage served by its model, not degraded
  (or an exact-cache hit, ``cached: true``: only such answers are cached);
* ``downshifted`` -- HTTP 200 in a poorer pipeline mode (``fast``/``balanced``), every stage by a model;
* ``fallback`` -- HTTP 200 served by a fallback: ``fallback``/``emergency`` mode, or a stage served by
  ``cache``/``reduced_context``/``rules``/``template``/``popular``, or flagged degraded;
* ``rejected`` -- 503 or 429 with a ``Retry-After`` header (the service said when to come back);
* ``failed`` -- anything else: 5xx without Retry-After, an unexpected status or body, a timeout, a
  connection error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11

from brownout.bench.client import LoadClient, LocalOnly, brief_text
from brownout.chaos.drills.spec import OUTCOMES, Outcome
from brownout.clock import SYSTEM_CLOCK, Clock

__all__ = ["Load", "Sample", "brief_text", "classify", "refusal_info"]

_INFO = ("retry_after", "queue_size", "suggestion", "type", "code")


@dataclass(slots=True)
class Sample:
    """One request: when it was sent and answered (clock seconds), how it ended, what it acknowledged."""

    index: int
    sent: float
    done: float
    outcome: Outcome
    status: int | None
    served_mode: str | None = None
    request_id: str | None = None
    cached: bool = False
    detail: str = ""
    retry_after: float | None = None
    info: dict[str, Any] | None = None
    """What a refusal said: ``error`` (its message), ``retry_after``, ``queue_size``, ``suggestion``,
    ``type`` and ``code`` (from the server's error object, ``{"error": {...}}``)."""
    connect: float = 0.0
    """Seconds of :attr:`latency` spent opening a new connection (0.0 on a kept-alive one)."""

    @property
    def acknowledged(self) -> bool:
        """True when the server acknowledged a stored brief (HTTP 200, not served from the cache)."""
        return self.status == 200 and self.request_id is not None and not self.cached

    @property
    def latency(self) -> float:
        """Seconds from sending to the answer (or the error)."""
        return self.done - self.sent

    @property
    def answer_time(self) -> float:
        """Seconds from the request being on its connection to the answer: :attr:`latency` without
        the connection's opening, which under a burst of new clients is mostly the load client's
        own work (the kernel completes the handshake; the client's event loop sets up each one)."""
        return self.done - self.sent - self.connect


def _error_chain(e: BaseException) -> str:
    """``Type: message`` of an error and its causes (a connection error's own message is often empty)."""
    parts: list[str] = []
    seen: BaseException | None = e
    while seen is not None and len(parts) < 4:
        parts.append(f"{type(seen).__name__}: {seen}".rstrip(": "))
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def refusal_info(body: Any) -> dict[str, Any] | None:
    """The fields of an error answer ``{"error": {"message", ...}}`` (None when it is not one)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    return {"error": error.get("message"), **{k: error[k] for k in _INFO if k in error}}


def classify(status: int, headers: Mapping[str, str], body: Any, requested_mode: str) -> tuple[Outcome, str]:
    """The outcome of one answer (module docstring) and a short reason for the non-full ones."""
    if status == 200:
        if not isinstance(body, dict) or not isinstance(body.get("brief"), dict):
            return "failed", "HTTP 200 without a brief"
        served = body.get("served_mode")
        if body.get("cached") is True and not body.get("degraded"):
            # An exact-cache hit (its one stage is "cache"): only full-quality answers are cached.
            return "full", ""
        stages = body.get("stages") or []
        by = [str(s.get("served_by", "")) for s in stages if isinstance(s, dict)]
        not_model = [b for b in by if not b.startswith("model:")]
        if served in ("fallback", "emergency") or not_model:
            return "fallback", f"{served}: " + ",".join(not_model or by)
        if body.get("downshifted") or served != requested_mode:
            return "downshifted", f"{requested_mode}->{served}"
        if body.get("degraded"):
            return "fallback", f"degraded ({body.get('reliability')})"
        return "full", ""
    if status in (429, 503) and _retry_after(headers) is not None:
        return "rejected", f"HTTP {status}, Retry-After {headers.get('retry-after')}"
    return "failed", f"HTTP {status}" + ("" if status < 500 else " without Retry-After")


class Load:
    """Requests at ``rate`` per second to ``base_url`` (127.0.0.1) until stopped; see the module docstring.

    ``timeout`` bounds each request (a timeout is a failure). ``max_in_flight`` bounds concurrency:
    when reached, sending waits, so the load can never run away. ``on_sample`` is called for each
    finished request (live progress). Time comes from ``clock``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        mode: str = "creative",
        rate: float = 8.0,
        max_in_flight: int = 64,
        timeout: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
        text: Callable[[int], str] = brief_text,
        on_sample: Callable[[Sample], object] | None = None,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        try:
            # Drills send load to a local stack only, never to a host on the network. The light client
            # costs a tenth of httpx per request: 200 drill clients must measure the server, not
            # themselves (brownout.bench.client).
            self._http = LoadClient(base_url, timeout=timeout, max_connections=max(max_in_flight, 1100))
        except LocalOnly:
            raise ValueError(f"drill load goes to 127.0.0.1 only, not {base_url!r}") from None
        self.base_url = base_url
        self.mode = mode
        self.rate = rate
        self.timeout = timeout
        self.clock = clock
        self.samples: list[Sample] = []
        self._text = text
        self._on_sample = on_sample
        self._sem = asyncio.Semaphore(max_in_flight)
        self._counter = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ reading

    def counts(self, since: float | None = None, until: float | None = None) -> Counter[str]:
        """Outcomes of the requests answered in ``[since, until)`` (all by default)."""
        out: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        for s in self.samples:
            if (since is None or s.done >= since) and (until is None or s.done < until):
                out[s.outcome] += 1
        return out

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._tasks)

    # ------------------------------------------------------------------ sending

    async def send(self, text: str | None = None, mode: str | None = None) -> Sample:
        """Send one request now and return its sample (also recorded)."""
        index = next(self._counter)
        return await self._one(index, text if text is not None else self._text(index), mode or self.mode)

    async def _one(self, index: int, text: str, mode: str) -> Sample:
        clock = self.clock
        sent = clock.now()
        try:
            response = await self._http.post_json("/v1/briefs", {"text": text, "mode": mode})
        except TimeoutError as e:
            sample = Sample(index, sent, clock.now(), "failed", None, detail=f"timeout ({type(e).__name__})")
        except (OSError, h11.ProtocolError) as e:
            sample = Sample(index, sent, clock.now(), "failed", None, detail=_error_chain(e))
        else:
            done = clock.now()
            try:
                body: Any = response.json()
            except ValueError:
                body = None
            outcome, detail = classify(response.status, response.headers, body, mode)
            ok = isinstance(body, dict)
            sample = Sample(
                index,
                sent,
                done,
                outcome,
                response.status,
                served_mode=body.get("served_mode") if ok else None,
                request_id=body.get("request_id") if ok and response.status == 200 else None,
                cached=bool(body.get("cached")) if ok else False,
                detail=detail,
                retry_after=_retry_after(response.headers),
                info=refusal_info(body) if response.status != 200 else None,
                connect=response.connect,
            )
        self.samples.append(sample)
        if self._on_sample is not None:
            self._on_sample(sample)
        return sample

    async def burst(
        self, n: int, text: Callable[[int], str] | None = None, mode: str | None = None
    ) -> list[Sample]:
        """Send ``n`` requests at once (``text(i)`` for the i-th; unique texts by default); wait for all."""
        make = text or self._text
        indices = [next(self._counter) for _ in range(n)]
        return list(await asyncio.gather(*(self._one(i, make(i), mode or self.mode) for i in indices)))

    async def warm(self, n: int) -> None:
        """Open ``n`` connections now (``GET /health`` on each), so that a burst right after goes out
        on open connections: what arrives "at once" is then the requests, not ``n`` TCP handshakes."""

        async def one() -> None:
            with contextlib.suppress(TimeoutError, OSError, h11.ProtocolError):
                await self._http.get("/health")

        await asyncio.gather(*(one() for _ in range(n)))

    def start(self) -> None:
        """Start sending at ``rate`` in the background."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="drill-load")

    async def _run(self) -> None:
        clock = self.clock
        interval = 1.0 / self.rate
        next_at = clock.now()
        while True:
            await self._sem.acquire()
            index = next(self._counter)
            task = asyncio.create_task(self._guarded(index))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            next_at += interval
            await clock.sleep(next_at - clock.now())

    async def _guarded(self, index: int) -> None:
        try:
            await self._one(index, self._text(index), self.mode)
        finally:
            self._sem.release()

    async def stop(self, drain: float = 30.0) -> None:
        """Stop sending; wait up to ``drain`` seconds for requests in flight (the rest are cancelled)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        if self._tasks:
            _, pending = await asyncio.wait(tuple(self._tasks), timeout=drain)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def aclose(self) -> None:
        """Stop and close the HTTP client."""
        await self.stop()
        await self._http.aclose()

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
