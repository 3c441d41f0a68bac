"""brownout: keep ML and LLM services answering while their parts fail.

The public API. Everything importable from here is documented and stable within a minor version;
modules whose names start with an underscore are not.

Policies (``brownout.policies``), each one engine with ``call``, decorator and ``wrap`` forms:
:class:`CircuitBreaker`, :class:`Retry` (with :class:`RetryBudget`), :class:`Deadline` /
:func:`deadline`, :class:`Admission`, :class:`AdaptiveLimiter`, :class:`Dimmer`, :class:`Singleflight`,
:class:`Cache`, :class:`FallbackChain`, stacked with :func:`compose`. Time comes from a :class:`Clock`;
tests use :class:`brownout.testing.FakeClock`. Errors form one tree rooted at :class:`BrownoutError`
(see :mod:`brownout.errors`); events go to an :class:`EventBus` (see :mod:`brownout.events`).
"""

from __future__ import annotations

from brownout.clock import SYSTEM_CLOCK, Clock, SystemClock
from brownout.errors import (
    AllFallbacksFailed,
    BrownoutError,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    Overloaded,
    Rejected,
)
from brownout.events import DEFAULT_BUS, Event, EventBus
from brownout.policies.admission import Admission, AdmissionConfig
from brownout.policies.breaker import (
    BreakerConfig,
    BreakerGroupConfig,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
)
from brownout.policies.cache import Cache, CacheConfig, CacheResult
from brownout.policies.compose import Composition, compose
from brownout.policies.deadline import Deadline, DeadlineConfig, deadline, remaining
from brownout.policies.dimmer import Dimmer, DimmerConfig, DimmerDecision, DimmerSnapshot
from brownout.policies.fallback import Decline, Degraded, FallbackChain, FallbackResult, Strategy
from brownout.policies.limiter import AdaptiveLimiter, LimiterConfig
from brownout.policies.retry import Retry, RetryBudget, RetryConfig
from brownout.policies.singleflight import Singleflight

__version__ = "0.1.0"

__all__ = [
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
