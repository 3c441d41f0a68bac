"""The public API of ``brownout`` and the documented error tree."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

import pytest

import brownout
from brownout import errors
from brownout.errors import (
    AllFallbacksFailed,
    BrownoutError,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    ModelUnavailable,
    Overloaded,
    Rejected,
    ServiceUnavailable,
)

EXPECTED_ALL = [
    "DEFAULT_BUS",
    "SYSTEM_CLOCK",
    "AdaptiveLimiter",
    "Admission",
    "AdmissionConfig",
    "AllFallbacksFailed",
    "BreakerConfig",
    "BreakerGroupConfig",
    "BreakerRegistry",
    "BreakerState",
    "BrownoutError",
    "Cache",
    "CacheConfig",
    "CacheResult",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "Composition",
    "ConfigError",
    "Deadline",
    "DeadlineConfig",
    "DeadlineExceeded",
    "Decline",
    "Degraded",
    "Dimmer",
    "DimmerConfig",
    "DimmerDecision",
    "DimmerSnapshot",
    "Event",
    "EventBus",
    "FallbackChain",
    "FallbackResult",
    "LimiterConfig",
    "Overloaded",
    "Rejected",
    "Retry",
    "RetryBudget",
    "RetryConfig",
    "Singleflight",
    "Strategy",
    "SystemClock",
    "__version__",
    "compose",
    "deadline",
    "remaining",
]

# How to build one instance of every Rejected subclass in brownout.errors (a new subclass must be
# added here, which makes sure it is checked for retry_after).
REJECTED_SAMPLES: dict[type[Rejected], Any] = {
    Rejected: lambda ra: Rejected("refused", retry_after=ra, policy="p"),
    CircuitOpen: lambda ra: CircuitOpen("model", "open", retry_after=ra),
    Overloaded: lambda ra: Overloaded("model", "queue_full", retry_after=ra, queue_size=3, in_flight=10),
    DeadlineExceeded: lambda ra: DeadlineExceeded(2.0, retry_after=ra),
    ModelUnavailable: lambda ra: ModelUnavailable("generator", retry_after=ra),
    ServiceUnavailable: lambda ra: ServiceUnavailable("all models down", retry_after=ra, policy="brief"),
}


def _subclasses(cls: type[Rejected]) -> set[type[Rejected]]:
    found: set[type[Rejected]] = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _subclasses(sub)
    return found


def test_all_is_exactly_the_expected_sorted_list() -> None:
    assert brownout.__all__ == EXPECTED_ALL
    # Constants first, then classes, then functions: the order ruff's RUF022 (isort-style) would keep.
    constants = [n for n in EXPECTED_ALL if n.isupper()]
    classes = [n for n in EXPECTED_ALL if not n.isupper() and n[0].isupper()]
    rest = [n for n in EXPECTED_ALL if n[0].islower() or n.startswith("_")]
    assert sorted(constants) + sorted(classes) + sorted(rest) == EXPECTED_ALL
    assert len(set(EXPECTED_ALL)) == len(EXPECTED_ALL)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("brownout")
    assert hasattr(module, name)
    namespace: dict[str, Any] = {}
    exec(f"from brownout import {name}", namespace)
    assert namespace[name] is getattr(brownout, name)


@pytest.mark.parametrize("name", [n for n in EXPECTED_ALL if n != "__version__"])
def test_every_public_class_and_function_has_a_docstring(name: str) -> None:
    obj = getattr(brownout, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        obj = type(obj)  # a constant: its class must be documented
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc, f"{name} has no docstring"
    # dataclasses invent "Name(field, ...)" when a class has none; that is not documentation.
    assert not doc.startswith(f"{obj.__name__}("), f"{name} has only a generated docstring"


def test_public_constants_are_what_they_claim() -> None:
    assert isinstance(brownout.DEFAULT_BUS, brownout.EventBus)
    assert isinstance(brownout.SYSTEM_CLOCK, brownout.SystemClock)
    assert isinstance(brownout.SYSTEM_CLOCK, brownout.Clock)


def test_version_is_a_string() -> None:
    assert isinstance(brownout.__version__, str)
    assert brownout.__version__
    assert all(part.isdigit() for part in brownout.__version__.split(".")[:2])


def test_package_docstring_exists() -> None:
    assert brownout.__doc__


# ------------------------------------------------------------------------------------- error tree


def test_every_error_derives_from_brownout_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, BrownoutError), name
        assert cls.__doc__, name
        assert name in (errors.__doc__ or ""), f"{name} is missing from the drawn error tree"


def test_every_rejected_subclass_carries_retry_after() -> None:
    in_module = {c for c in _subclasses(Rejected) if c.__module__ == "brownout.errors"} | {Rejected}
    assert in_module == set(REJECTED_SAMPLES)
    for cls, build in REJECTED_SAMPLES.items():
        error = build(2.5)
        assert type(error) is cls
        assert error.retry_after == 2.5
        assert isinstance(error, BrownoutError)
        # Never negative: an HTTP layer puts it straight into Retry-After.
        assert build(-3).retry_after == 0.0


def test_rejected_subclasses_name_their_policy() -> None:
    assert CircuitOpen("qwen", "open", retry_after=1).policy == "qwen"
    assert CircuitOpen("qwen", "half_open", retry_after=1).state == "half_open"
    overloaded = Overloaded("gpu", "queue_timeout", retry_after=4, queue_size=7, in_flight=2)
    assert (overloaded.policy, overloaded.reason, overloaded.queue_size, overloaded.in_flight) == (
        "gpu",
        "queue_timeout",
        7,
        2,
    )
    assert "gpu" in str(overloaded)


def test_deadline_exceeded_is_a_timeout_error() -> None:
    error = DeadlineExceeded(1.5)
    assert isinstance(error, TimeoutError)
    assert isinstance(error, asyncio.TimeoutError)
    assert isinstance(error, Rejected)
    assert error.timeout == 1.5
    assert error.retry_after >= 0
    with pytest.raises(TimeoutError):
        raise error


def test_config_error_is_a_value_error_naming_the_key() -> None:
    error = ConfigError("breaker.open_wait", "must be > 0")
    assert isinstance(error, ValueError)
    assert isinstance(error, BrownoutError)
    assert error.key == "breaker.open_wait"
    assert error.message == "must be > 0"
    assert "breaker.open_wait" in str(error)
    with pytest.raises(ValueError, match=r"breaker\.open_wait"):
        raise error


def test_all_fallbacks_failed_carries_causes_and_the_smallest_retry_after() -> None:
    causes: list[tuple[str, BaseException]] = [
        ("primary", CircuitOpen("qwen", "open", retry_after=30)),
        ("cache", KeyError("miss")),
        ("rules", Overloaded("rules", "queue_full", retry_after=4, queue_size=1, in_flight=1)),
        ("template", DeadlineExceeded(2.0, retry_after=9)),
    ]
    error = AllFallbacksFailed("brief", causes)
    assert isinstance(error, BrownoutError)
    assert not isinstance(error, Rejected)
    assert error.name == "brief"
    assert error.causes == tuple(causes)
    assert error.retry_after == 4
    for strategy, _ in causes:
        assert strategy in str(error)


def test_all_fallbacks_failed_without_hints_uses_the_default() -> None:
    assert AllFallbacksFailed("brief", [("cache", KeyError("miss"))]).retry_after == 30.0
    error = AllFallbacksFailed("brief", [], default_retry_after=12.0)
    assert error.retry_after == 12.0
    assert error.causes == ()
