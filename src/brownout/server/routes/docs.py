"""The API documentation: ``/docs`` (Swagger UI, its assets served from this package, so it works
offline) and ``/openapi.json``, which documents the gateway's routes too."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response

from brownout.gateway.routes import gateway_openapi
from brownout.server.errors import ApiError

__all__ = ["install"]

_SWAGGER: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css; charset=utf-8"),
    "favicon-32x32.png": ("swagger-ui/favicon-32x32.png", "image/png"),
}


def install(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's assets from this package (works offline) and an ``/openapi.json``
    that documents the gateway's routes too (they stay on their fast ASGI path)."""
    static = resources.files("brownout.server") / "static"
    assets = {name: (static.joinpath(path).read_bytes(), media) for name, (path, media) in _SWAGGER.items()}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            gateway_openapi(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
            oauth2_redirect_url=None,
            # No call to the public spec validator: nothing leaves this machine.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/docs/static/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            raise ApiError(404, f"no docs asset {name!r}", code="not_found")
        body, media = found
        return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=86400"})
