"""`/openapi.json` and `/docs` (Swagger UI from the `swagger_ui_bundle` package, offline)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from service.openapi import Operation, build_openapi, downgrade_to_30, operation

#: Swagger UI's static files, served under `/docs/static/`.
SWAGGER_UI_DIR = Path(str(swagger_ui_path))

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>boothd API</title>
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script src="/docs/static/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/docs/openapi-3.0.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout"
    });
  </script>
</body>
</html>
"""


@operation(
    Operation(
        summary="OpenAPI 3.1 document",
        responses={200: "application/json"},
        public=True,
        tags=("service",),
    )
)
async def openapi_json(request: web.Request) -> web.Response:
    """This API, generated from the routes and the pydantic models the handlers use."""
    return web.json_response(build_openapi(request.app))


@operation(
    Operation(
        summary="OpenAPI 3.0 rendition",
        responses={200: "application/json"},
        public=True,
        tags=("service",),
    )
)
async def openapi_30_json(request: web.Request) -> web.Response:
    """The same document in OpenAPI 3.0 terms, for the bundled Swagger UI (4.x), which
    renders no 3.1 documents."""
    return web.json_response(downgrade_to_30(build_openapi(request.app)))


@operation(
    Operation(summary="Swagger UI", responses={200: "text/html"}, public=True, tags=("service",))
)
async def docs(request: web.Request) -> web.Response:
    """Interactive API documentation; works without internet access."""
    return web.Response(text=_PAGE, content_type="text/html")
