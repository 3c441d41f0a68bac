"""The HTTP routes of ``brownout serve``, by concern, each module given the parts it uses.

* :mod:`~brownout.server.routes.briefs` -- ``POST /v1/briefs``;
* :mod:`~brownout.server.routes.health` -- ``/health``, ``/health/models/{name}``, ``/health/llm``,
  ``/metrics``;
* :mod:`~brownout.server.routes.recovery` -- the recovery API (``/api/v1/recovery/...``);
* :mod:`~brownout.server.routes.docs` -- ``/docs`` and ``/openapi.json``;
* :mod:`~brownout.server.routes.live` -- the live view's streams, ``/api/v1/status``, the dashboard;
* :mod:`~brownout.server.routes.check` -- the pre-promotion check's read-only routes.

Each module has an ``install`` function that adds its routes to the app's router;
:func:`~brownout.server.app.create_app` calls them in order. The gateway's routes are in
:mod:`brownout.gateway.routes`.
"""

from __future__ import annotations

from brownout.briefs.service import BriefService
from brownout.server.errors import ApiError

__all__ = ["running"]


def running(service: BriefService) -> BriefService:
    """``service`` once it has started; before, a 503 that says the server is starting up."""
    if not service.started:
        raise ApiError(503, "the service is starting up", code="starting", retry_after=5)
    return service
