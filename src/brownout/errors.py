"""Every error brownout raises, in one tree.

::

    BrownoutError
    ├── ConfigError            a setting is invalid; names the key (also a ValueError)
    ├── Rejected               the call was not run (or was cut short); carries ``retry_after`` seconds
    │   ├── CircuitOpen        a breaker refused the call (open, forced open, half-open probes busy)
    │   ├── Overloaded         admission control shed the call (queue full, waited too long, tripped)
    │   ├── DeadlineExceeded   the caller's deadline passed (also a TimeoutError)
    │   ├── ModelUnavailable   no endpoint of a model role can take a call now
    │   └── ServiceUnavailable the service cannot answer now (HTTP 503 with Retry-After)
    ├── ModelError             a model endpoint failed: connection, HTTP status, malformed answer
    ├── GuardFailed            the JSON guard got no schema-valid answer within its attempts
    ├── ModelIntegrityError    a model file is missing or its sha256 is not the expected one
    ├── AllFallbacksFailed     every strategy of a fallback chain failed; carries each cause
    └── RemoteComputationFailed  another replica's computation of a shared key failed; its error

A retry that gives up re-raises the last error it saw, unchanged, so callers handle the real cause;
the reason it stopped (attempts, budget, deadline) is added as a note on that exception.

``retry_after`` is what an HTTP layer puts in a ``Retry-After`` header: the policy's best estimate of
when trying again could succeed.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AllFallbacksFailed",
    "BrownoutError",
    "CircuitOpen",
    "ConfigError",
    "DeadlineExceeded",
    "GuardFailed",
    "ModelError",
    "ModelIntegrityError",
    "ModelUnavailable",
    "Overloaded",
    "Rejected",
    "RemoteComputationFailed",
    "ServiceUnavailable",
]


class BrownoutError(Exception):
    """Base class of every error brownout raises."""


class ConfigError(BrownoutError, ValueError):
    """A configuration value is invalid. ``key`` is the dotted path of the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class Rejected(BrownoutError):
    """A policy refused to run the call, or cut it short.

    ``retry_after`` (seconds, never negative) says when trying again may succeed; ``policy`` names the
    policy instance that refused.
    """

    def __init__(self, message: str, *, retry_after: float, policy: str = "") -> None:
        super().__init__(message)
        self.retry_after = max(0.0, float(retry_after))
        self.policy = policy


class CircuitOpen(Rejected):
    """A circuit breaker refused the call. ``state`` is the breaker state at the time."""

    def __init__(self, name: str, state: str, *, retry_after: float) -> None:
        super().__init__(
            f"circuit breaker {name!r} is {state}; retry after {retry_after:.3g}s",
            retry_after=retry_after,
            policy=name,
        )
        self.state = state


class Overloaded(Rejected):
    """Admission control shed the call.

    ``reason`` is one of ``"queue_full"``, ``"queue_timeout"`` or ``"tripped"``; ``queue_size`` and
    ``in_flight`` describe the load when it happened.
    """

    def __init__(
        self, name: str, reason: str, *, retry_after: float, queue_size: int, in_flight: int
    ) -> None:
        super().__init__(
            f"{name!r} is overloaded ({reason}: {queue_size} waiting, {in_flight} running); "
            f"retry after {retry_after:.3g}s",
            retry_after=retry_after,
            policy=name,
        )
        self.reason = reason
        self.queue_size = queue_size
        self.in_flight = in_flight


class DeadlineExceeded(Rejected, TimeoutError):
    """The deadline passed before the call finished (or before it could start).

    ``timeout`` is the budget the scope was given, in seconds.
    """

    def __init__(self, timeout: float, *, retry_after: float = 1.0, policy: str = "deadline") -> None:
        super().__init__(f"deadline of {timeout:.3g}s exceeded", retry_after=retry_after, policy=policy)
        self.timeout = timeout


class ModelUnavailable(Rejected):
    """No endpoint of model role ``role`` can take a call now (every breaker open, or none healthy)."""

    def __init__(self, role: str, *, retry_after: float, reason: str = "all endpoints unavailable") -> None:
        super().__init__(f"model {role!r} unavailable: {reason}", retry_after=retry_after, policy=role)
        self.role = role
        self.reason = reason


class ServiceUnavailable(Rejected):
    """The service cannot answer now; an HTTP layer answers 503 with ``Retry-After``."""


class ModelError(BrownoutError):
    """A call to a model endpoint failed.

    ``endpoint`` is the endpoint's URL, ``status`` the HTTP status when there was one (None for
    connection errors and malformed answers), ``retry_after`` the endpoint's own ``Retry-After`` hint
    in seconds when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.retry_after = retry_after


class GuardFailed(BrownoutError):
    """The JSON guard got no schema-valid answer. ``errors`` lists why each attempt failed."""

    def __init__(self, name: str, errors: Sequence[str], *, attempts: int) -> None:
        detail = "; ".join(errors[-3:])
        super().__init__(f"JSON guard {name!r} gave up after {attempts} attempt(s): {detail}")
        self.name = name
        self.errors: tuple[str, ...] = tuple(errors)
        self.attempts = attempts


class ModelIntegrityError(BrownoutError):
    """A model file is missing, or its sha256 is not ``expected`` (``actual`` is what it has).

    ``path`` is the file checked; ``actual`` is None when the file does not exist.
    """

    def __init__(self, path: str, *, expected: str, actual: str | None) -> None:
        found = "missing" if actual is None else f"sha256 {actual[:16]}..."
        super().__init__(f"model file {path!r} failed its checksum: expected {expected[:16]}..., {found}")
        self.path = path
        self.expected = expected
        self.actual = actual


class AllFallbacksFailed(BrownoutError):
    """Every strategy of a fallback chain failed or declined.

    ``causes`` holds ``(strategy name, exception)`` in the order tried. ``retry_after`` is the smallest
    ``retry_after`` among the causes that carry one, else ``default_retry_after``.
    """

    def __init__(
        self,
        name: str,
        causes: Sequence[tuple[str, BaseException]],
        *,
        default_retry_after: float = 30.0,
    ) -> None:
        detail = "; ".join(f"{s}: {type(e).__name__}: {e}" for s, e in causes) or "no strategies"
        super().__init__(f"all fallbacks of {name!r} failed ({detail})")
        self.name = name
        self.causes: tuple[tuple[str, BaseException], ...] = tuple(causes)
        hints = [e.retry_after for _, e in causes if isinstance(e, Rejected)]
        self.retry_after = min(hints) if hints else default_retry_after


class RemoteComputationFailed(BrownoutError):
    """The computation for ``key`` failed in another replica; this is its error, as it was stored.

    ``error_type`` is the name of the exception's class there and ``remote_message`` its message.
    Raised by :class:`~brownout.state.singleflight.RedisSingleflight`; defined here so that callers can
    catch it by class without importing the Redis support.
    """

    def __init__(self, name: str, key: str, error_type: str, remote_message: str) -> None:
        super().__init__(
            f"singleflight {name!r}: the computation for {key!r} failed in another replica: "
            f"{error_type}: {remote_message}"
        )
        self.name = name
        self.key = key
        self.error_type = error_type
        self.remote_message = remote_message
