"""An OpenAI-compatible resilient gateway: ``POST /v1/chat/completions`` over model groups.

Clients send OpenAI chat requests to ``brownout serve`` naming a *model group*; each group has
replicas (endpoints) behind their own circuit breakers, a retry budget, admission control, fallback
groups, an optional exact-match cache for deterministic requests and a JSON guard for
``response_format`` schemas. Streams pass through event by event.

* :mod:`brownout.gateway.config` -- the ``gateway`` config section;
* :mod:`brownout.gateway.router` -- the engine (:class:`Gateway`): choosing endpoints, retries,
  fallbacks, whole answers;
* :mod:`brownout.gateway.stream` -- streaming pass-through;
* :mod:`brownout.gateway.upstream` -- the keep-alive HTTP/1.1 client of the upstream calls;
* :mod:`brownout.gateway.guard`, :mod:`brownout.gateway.cache` -- the JSON guard and the cache key;
* :mod:`brownout.gateway.routes` -- the ASGI routes and :func:`install_gateway`;
* :mod:`brownout.gateway.stats` -- the counters the engine keeps;
* :mod:`brownout.gateway.metrics` -- the Prometheus collector that reads them.

The config names are imported here; the rest (which needs the ``server`` extra) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from brownout.gateway.config import (
    GatewayAdmissionSection,
    GatewayBreakerSection,
    GatewayCacheSection,
    GatewayEndpoint,
    GatewayHedgeSection,
    GatewaySection,
    ModelGroup,
)

if TYPE_CHECKING:
    from brownout.gateway.metrics import GatewayCollector
    from brownout.gateway.router import Answer, Gateway, GatewayUnavailable
    from brownout.gateway.routes import install_gateway

__all__ = [
    "Answer",
    "Gateway",
    "GatewayAdmissionSection",
    "GatewayBreakerSection",
    "GatewayCacheSection",
    "GatewayCollector",
    "GatewayEndpoint",
    "GatewayHedgeSection",
    "GatewaySection",
    "GatewayUnavailable",
    "ModelGroup",
    "install_gateway",
]

_LAZY = {
    "Answer": "brownout.gateway.router",
    "Gateway": "brownout.gateway.router",
    "GatewayUnavailable": "brownout.gateway.router",
    "GatewayCollector": "brownout.gateway.metrics",
    "install_gateway": "brownout.gateway.routes",
}


def __getattr__(name: str) -> Any:
    """Import the runtime names on first use (they need prometheus-client and jsonschema-rs)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
