"""The OpenAPI page and the start page.

The page at ``/api/2/openapi`` renders the OpenAPI document with Scalar's API reference,
shipped in the package (``static/``, version :data:`SCALAR_VERSION`, MIT licence beside it)
and served from here with a year's cache (the file name carries the version): the page works
offline and shows the same renderer every time. Scalar's web fonts are off (they come from its
CDN); the browser's own are used. ``/`` redirects to the page (later to a console).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, get
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.response import File, Redirect

__all__ = ["OPENAPI_PATH", "SCALAR_VERSION", "LocalScalarPlugin", "docs_handlers"]

OPENAPI_PATH = "/api/2/openapi"
SCALAR_VERSION = "1.40.9"
SCALAR_FILE = f"scalar-api-reference-{SCALAR_VERSION}.js"
SCALAR_URL = f"{OPENAPI_PATH}/assets/{SCALAR_FILE}"
STATIC = Path(__file__).parent / "static"
# Versioned file name: a new version is a new URL, so the browser may keep this one for good.
IMMUTABLE = "public, max-age=31536000, immutable"


class LocalScalarPlugin(ScalarRenderPlugin):
    """Scalar from the package: no stylesheet, favicon or fonts from a CDN, no telemetry."""

    def __init__(self) -> None:
        super().__init__(
            js_url=SCALAR_URL,
            favicon="",
            options={"withDefaultFonts": False, "telemetry": False},
        )

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = openapi_schema["info"]["title"]
        options = msgspec.json.encode(self.options).decode()
        return f"""<!DOCTYPE html>
<html>
  <head>
    <title>{title}</title>
    <meta charset="utf-8"/>
    <meta name="viewport" content="width=device-width, initial-scale=1">
    {self.style}
  </head>
  <body>
    <noscript>The API reference needs JavaScript; the document itself is at
      <a href="{self.get_openapi_json_route(request)}">openapi.json</a>.</noscript>
    <script id="api-reference" data-url="{self.get_openapi_json_route(request)}"
      data-configuration='{options}'></script>
    <script src="{self.js_url}"></script>
  </body>
</html>
""".encode()


@get(SCALAR_URL, include_in_schema=False, media_type="text/javascript", sync_to_thread=False)
def scalar_js() -> File:
    return File(
        path=STATIC / SCALAR_FILE,
        media_type="text/javascript",
        content_disposition_type="inline",
        headers={"cache-control": IMMUTABLE},
    )


@get("/", include_in_schema=False, sync_to_thread=False)
def start_page() -> Redirect:
    """``/``: the OpenAPI page (302, not cached: the start page may become a console)."""
    return Redirect(path=OPENAPI_PATH, status_code=302)


def docs_handlers() -> list[HTTPRouteHandler]:
    return [scalar_js, start_page]
