"""The web console: one static page (``GET /``) and its assets under ``/static/``.

Plain HTML, CSS and an ES module, no build step and nothing fetched from elsewhere. Every
response carries a strict Content-Security-Policy: scripts and styles only from this origin,
connections only to this origin's REST API and its WebSocket stream.
"""

from __future__ import annotations

from pathlib import Path

import trio
from quart import Blueprint, Response

from sandstorm.errors import NotFound

blueprint = Blueprint("console", __name__)

STATIC_DIR = Path(__file__).parent / "static"
# The only files served, with their types: a fixed table, so no path from a URL reaches the disk.
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "files.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",  # 'self' covers ws:/wss: to this same host
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _asset(name: str) -> Response:
    content_type = _ASSETS.get(name)
    if content_type is None:
        raise NotFound(f"no console asset {name!r}")
    try:
        body = await trio.Path(STATIC_DIR / name).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"console asset {name!r} is not installed") from None
    response = Response(body, status=200, content_type=content_type)
    response.headers.update(SECURITY_HEADERS)
    return response


@blueprint.get("/")
async def index() -> Response:
    return await _asset("index.html")


@blueprint.get("/static/<name>")
async def static_asset(name: str) -> Response:
    return await _asset(name)
