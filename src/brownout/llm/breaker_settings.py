"""A model endpoint's circuit breaker in the configuration's words, and their one translation.

The YAML keeps the key names of the original LLM-ensemble configuration (``failure_threshold``,
``timeout``, ``half_open_requests``, ...; see docs/origins.md); the toolkit's
:class:`~brownout.policies.breaker.BreakerConfig` names them for what they do
(``failure_rate_threshold``, ``open_wait``, ``half_open_max_calls``, ...).
:class:`BreakerSettings` holds the YAML keys, their defaults and limits, and is the only place that
maps them to the policy. Both breaker sections are built on it:

* ``circuit_breaker`` (:class:`brownout.config.CircuitBreakerSection`): the brief pipeline's model
  endpoints, plus per-model overrides under ``models`` (checked by :meth:`BreakerSettings.override`);
* ``gateway.groups.<name>.breaker`` (:class:`brownout.gateway.config.GatewayBreakerSection`): each
  replica of a gateway group.

A bad value is reported under the key the user wrote (``circuit_breaker.timeout``), never under the
policy's name for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from brownout.policies.breaker import BreakerConfig

__all__ = ["BreakerSettings"]

_POLICY_KEYS: Final = {
    "failure_threshold": "failure_rate_threshold",
    "success_threshold": "success_threshold",
    "timeout": "open_wait",
    "timeout_multiplier": "open_wait_multiplier",
    "max_timeout": "open_wait_max",
    "half_open_requests": "half_open_max_calls",
    "minimum_calls": "minimum_calls",
    "window_size": "window_size",
}
"""YAML key -> the :class:`~brownout.policies.breaker.BreakerConfig` field it sets."""


class BreakerSettings(BaseModel):
    """One circuit breaker's settings under the YAML's keys (defaults: open at 50 % failures, 20-call window).

    :meth:`policy` turns them into the breaker's own config. Values that no breaker can use (an
    infinite ``timeout``, ``minimum_calls`` above ``window_size``) are refused here, when the
    configuration is loaded, rather than when the breakers are built.
    """

    # Not-a-number and infinity are refused as the policy refuses them, so the error names the YAML key.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    failure_threshold: float = Field(default=0.5, gt=0, le=1, description="failure rate that opens")
    success_threshold: int = Field(default=5, ge=1, description="successful probes that close")
    timeout: float = Field(default=60.0, gt=0, description="seconds open before probing")
    timeout_multiplier: float = Field(
        default=1.0, ge=1, description="the open wait grows by this factor on each re-open without a close"
    )
    max_timeout: float | None = Field(
        default=None, gt=0, description="longest grown open wait, seconds (default: max(600, timeout))"
    )
    half_open_requests: int = Field(default=3, ge=1, description="probes at once while half-open")
    minimum_calls: int = Field(default=5, ge=1, description="calls in the window before a rate counts")
    window_size: int = Field(default=20, ge=1, description="calls in the sliding window")

    @model_validator(mode="after")
    def _check_window(self) -> BreakerSettings:
        if self.minimum_calls > self.window_size:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) cannot exceed window_size ({self.window_size}): "
                "the failure rate would never count"
            )
        if (
            self.max_timeout is not None
            and self.max_timeout < self.timeout
            and "max_timeout" in self.model_fields_set
        ):
            raise ValueError(f"max_timeout ({self.max_timeout}) cannot be below timeout ({self.timeout})")
        return self

    def policy(self) -> BreakerConfig:
        """The settings as a :class:`~brownout.policies.breaker.BreakerConfig`."""
        values = {ours: getattr(self, yaml) for yaml, ours in _POLICY_KEYS.items()}
        if self.max_timeout is not None:
            # A default cap below a first wait the user raised gives way to it.
            values["open_wait_max"] = max(self.max_timeout, self.timeout)
        return BreakerConfig(**values)

    def override(self, where: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (some of the YAML keys) checked as a change of these settings, in the policy's keys.

        The result is what a :class:`~brownout.policies.breaker.BreakerGroupConfig` takes as one
        name's override. Raises ValueError naming ``where`` and the YAML key: ``models.qwen: unknown
        key(s) ['speed']; ...`` or ``models.qwen.failure_threshold: Input should be ...``.
        """
        unknown = [k for k in values if k not in _POLICY_KEYS]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed {list(_POLICY_KEYS)}")
        own = {key: getattr(self, key) for key in _POLICY_KEYS}
        try:
            BreakerSettings.model_validate({**own, **values})
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(part) for part in err["loc"])
            # A rule across keys (minimum_calls above window_size) has no key of its own.
            msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
            raise ValueError(f"{where}.{key}: {msg}" if key else f"{where}: {msg}") from None
        return {_POLICY_KEYS[k]: v for k, v in values.items()}
