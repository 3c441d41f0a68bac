"""Failure classification: which kind of failure an exception (or an error text) is.

:func:`classify` reads the whole story of an error -- the exception, its ``__cause__`` and
``__context__`` chain, the members of an :class:`ExceptionGroup` and the causes carried by
:class:`~brownout.errors.AllFallbacksFailed` -- and returns the *most specific* kind found anywhere in
it, so a ``ServiceUnavailable`` raised because a model process was OOM-killed is a system resource
error, not a pipeline error. Specificity, most first:

1. ``vram_exhaustion``: CUDA/GPU out of memory (torch's ``OutOfMemoryError``, ``cudaMalloc``,
   ``CUBLAS_STATUS_ALLOC_FAILED``, llama.cpp's CUDA buffer allocation errors);
2. ``hardware_optimization_failure``: the hardware cannot run the optimised build or kernel (illegal
   instruction / SIGILL, AVX/AMX, "not compiled with CUDA", cuDNN, flash attention, xformers);
3. ``system_resource_error``: the machine ran out of something (``MemoryError``, ENOMEM, ENOSPC,
   too many open files, a process killed by SIGKILL -- the OOM killer's signal);
4. ``model_loading_failure``: the model could not be loaded (missing or corrupt file, checksum
   mismatch, llama.cpp's "failed to load model", a local model server that died while starting);
5. ``network_error``: connection refused/reset, DNS, transport timeouts (httpx's transport errors);
6. ``generation_pipeline_error``: the model answered badly or not at all (HTTP 5xx, malformed
   answers, the JSON guard giving up, open breakers, a crashed model process);
7. ``unknown``: nothing matched.

The rules look at exception class names (the whole MRO, so subclasses count) and at the text, never
import the libraries they recognise, and are cheap enough to run on every reported failure.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Classification", "FailureType", "classify"]


class FailureType(StrEnum):
    """The failure kinds recovery tells apart (values: the recovery API's names), plus ``unknown``."""

    MODEL_LOADING = "model_loading_failure"
    VRAM_EXHAUSTION = "vram_exhaustion"
    PIPELINE_ERROR = "generation_pipeline_error"
    HARDWARE_OPTIMISATION = "hardware_optimization_failure"
    SYSTEM_RESOURCE = "system_resource_error"
    NETWORK = "network_error"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Classification:
    """What :func:`classify` decided: the failure ``type`` and the ``evidence`` that decided it."""

    type: FailureType
    evidence: str


@dataclass(frozen=True, slots=True)
class _Rule:
    type: FailureType
    classes: frozenset[str]
    text: re.Pattern[str] | None
    errnos: frozenset[int] = frozenset()


_I = re.IGNORECASE

# Most specific first: the first rule that matches any link of the chain wins.
_RULES: tuple[_Rule, ...] = (
    _Rule(
        FailureType.VRAM_EXHAUSTION,
        frozenset({"OutOfMemoryError"}),  # torch.cuda.OutOfMemoryError
        re.compile(
            r"cuda out of memory|(cuda|gpu|vram|device)\b[^.\n]{0,60}out of memory"
            r"|out of memory[^.\n]{0,60}\b(cuda|gpu|vram|device)\b|cudaMalloc|CUBLAS_STATUS_ALLOC_FAILED"
            r"|cudaErrorMemoryAllocation|ggml_(backend_)?cuda[^\n]{0,80}(alloc|buffer)"
            r"|failed to allocate (cuda|vulkan|metal|gpu)|\bvram\b[^.\n]{0,40}(exhaust|full|insufficient)",
            _I,
        ),
    ),
    _Rule(
        FailureType.HARDWARE_OPTIMISATION,
        frozenset(),
        re.compile(
            r"illegal instruction|\bSIGILL\b|\b(avx(2|512)?|amx|sse4(\.\d)?|fma)\b[^.\n]{0,40}"
            r"(not supported|unsupported|required|missing)|unsupported (cpu|instruction|hardware|gpu)"
            r"|not compiled with (cuda|gpu|rocm)|no cuda gpus are available|cudnn|xformers"
            r"|flash[ _-]?att(n|ention)|compute capability|tensorrt|hardware optimi[sz]ation",
            _I,
        ),
    ),
    _Rule(
        FailureType.SYSTEM_RESOURCE,
        frozenset({"MemoryError"}),
        re.compile(
            r"cannot allocate memory|\bout of memory\b|no space left|too many open files|disk full"
            r"|killed by SIGKILL|\boom[- ]?kill|resource temporarily unavailable|memory exhausted",
            _I,
        ),
        frozenset({errno.ENOMEM, errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.EDQUOT}),
    ),
    _Rule(
        FailureType.MODEL_LOADING,
        frozenset({"ModelIntegrityError"}),
        re.compile(
            r"failed to load model|error loading model|unable to load model|llama_model_load"
            r"|could not load (the )?model|checksum|sha256 mismatch|invalid magic|corrupt"
            r"|\.gguf\b|safetensors|model file|model_path|while starting|not healthy within",
            _I,
        ),
    ),
    # A model that accepted the connection but never answered is hung, not unreachable.
    _Rule(FailureType.PIPELINE_ERROR, frozenset({"ReadTimeout", "WriteTimeout", "PoolTimeout"}), None),
    _Rule(
        FailureType.NETWORK,
        frozenset(
            {
                "ConnectionError",  # ConnectionRefusedError, ConnectionResetError, ...
                "TransportError",  # httpx: ConnectError, ReadTimeout, RemoteProtocolError, ...
                "gaierror",
                "herror",
            }
        ),
        re.compile(
            r"connection (refused|reset|aborted|closed|error)|connecterror|connecttimeout"
            r"|name or service not known|temporary failure in name resolution|network is unreachable"
            r"|no route to host|server disconnected|remote end closed|remoteprotocolerror",
            _I,
        ),
        frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ENETUNREACH, errno.EHOSTUNREACH}),
    ),
    _Rule(
        FailureType.PIPELINE_ERROR,
        frozenset(
            {
                "ModelError",
                "GuardFailed",
                "AllFallbacksFailed",
                "Rejected",  # CircuitOpen, ModelUnavailable, ServiceUnavailable, DeadlineExceeded
                "NoModeAvailable",
                "JSONDecodeError",
                "ValidationError",
            }
        ),
        re.compile(
            r"pipeline|generation failed|inference failed|\bHTTP 5\d\d\b|status 5\d\d|killed by SIG"
            r"|exited with status|circuit breaker|unhealthy|no answer within",
            _I,
        ),
    ),
)

_MAX_LINKS = 32  # an exception chain longer than this is a bug elsewhere; do not walk it forever


def _links(error: BaseException) -> Iterator[BaseException]:
    """The exception and everything it carries: causes, contexts, group members, fallback causes."""
    seen: set[int] = set()
    stack = [error]
    while stack and len(seen) < _MAX_LINKS:
        exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        inner: list[BaseException] = []
        if isinstance(exc, BaseExceptionGroup):
            inner.extend(exc.exceptions)
        causes = getattr(exc, "causes", None)  # AllFallbacksFailed: (strategy, exception) pairs
        if isinstance(causes, tuple):
            inner.extend(c[1] for c in causes if isinstance(c, tuple) and len(c) == 2)
        if exc.__cause__ is not None:
            inner.append(exc.__cause__)
        elif exc.__context__ is not None and not exc.__suppress_context__:
            inner.append(exc.__context__)
        stack.extend(reversed(inner))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _match(rule: _Rule, exc: BaseException | None, text: str) -> str | None:
    if exc is not None:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if rule.classes & names:
            return _describe(exc)
        if rule.errnos and isinstance(exc, OSError) and exc.errno in rule.errnos:
            return _describe(exc)
    if rule.text is not None:
        found = rule.text.search(text)
        if found is not None:
            return text
    return None


def classify(error: BaseException | str) -> Classification:
    """Classify ``error`` (an exception, or an error text such as a failed health probe's).

    Returns the most specific :class:`FailureType` that any link of the exception chain shows, with
    the link's description as evidence; ``unknown`` (evidence: the error itself) when none does.
    """
    if isinstance(error, str):
        for rule in _RULES:
            if _match(rule, None, error) is not None:
                return Classification(rule.type, error)
        return Classification(FailureType.UNKNOWN, error)
    links = [(exc, _describe(exc)) for exc in _links(error)]
    for rule in _RULES:
        for exc, text in links:
            evidence = _match(rule, exc, text)
            if evidence is not None:
                return Classification(rule.type, evidence)
    return Classification(FailureType.UNKNOWN, _describe(error))
