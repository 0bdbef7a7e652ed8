"""The Quart-Trio application: thin wiring of routes and error translation.

It owns no tasks: every request becomes a call on the gateway's actors.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from quart import Response, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from sandstorm.api.types import JSON_ENCODER, ErrorDetail, ErrorResponse
from sandstorm.errors import (
    AtCapacity,
    GatewayError,
    OriginNotAllowed,
    QuotaExceeded,
    RangeNotSatisfiable,
    Unauthorized,
)
from sandstorm.logs import RequestIdMiddleware, bind
from sandstorm.store import StoreError
from sandstorm.web import auth

if TYPE_CHECKING:
    from sandstorm.supervisor.gateway import Gateway

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(status: int, code: str, message: str, details: dict[str, object]) -> Response:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, details=details))
    return Response(JSON_ENCODER.encode(body), status=status, content_type="application/json")


def create_app(gateway: Gateway) -> QuartTrio:
    from sandstorm.web.bodies import GatewayHTTPConnection
    from sandstorm.web.console import blueprint as console_blueprint
    from sandstorm.web.files import blueprint as files_blueprint
    from sandstorm.web.rest import blueprint
    from sandstorm.web.stream import blueprint as stream_blueprint

    app = QuartTrio("sandstorm")
    # Upload routes get bodies that hold at most a megabyte their handler has not taken.
    app.asgi_http_class = GatewayHTTPConnection
    app.config["SANDSTORM_GATEWAY"] = gateway
    # Quart refuses bodies above this from Content-Length, or while streaming, before reading
    # them whole (413).
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.max_body_bytes
    app.config["BODY_TIMEOUT"] = 60
    app.register_blueprint(blueprint)
    app.register_blueprint(stream_blueprint)
    app.register_blueprint(files_blueprint)
    app.register_blueprint(console_blueprint)
    # Outermost: every response carries X-Request-Id, errors and WebSocket upgrades included.
    app.asgi_app = RequestIdMiddleware(app.asgi_app)  # type: ignore[method-assign,assignment]

    async def bind_ids() -> None:
        """Name the sandbox and exec in the request's log lines (they come from the path)."""
        ctx = websocket if has_websocket_context() else request
        args = ctx.view_args or {}
        bind(sandbox_id=args.get("sandbox_id"), exec_id=args.get("exec_id"))

    app.before_request(bind_ids)
    app.before_websocket(bind_ids)

    async def same_origin_only() -> None:
        """Refuse what a browser sends on behalf of another site's page: state-changing
        requests and WebSocket upgrades whose Origin is not this gateway. Clients that are not
        browsers send no Origin and are not affected."""
        ctx = websocket if has_websocket_context() else request
        if not has_websocket_context() and request.method in ("GET", "HEAD", "OPTIONS"):
            return
        origin = ctx.headers.get("Origin")
        if origin is None:
            return
        if urlsplit(origin).netloc.lower() != ctx.headers.get("Host", "").lower():
            raise OriginNotAllowed(f"requests from {origin} are not allowed", origin=origin)

    app.before_request(same_origin_only)
    app.before_websocket(same_origin_only)
    # Every route but the probes and the console page requires the caller's API key (once
    # any exists), and every mutating call leaves an audit record (see web/auth.py).
    app.before_request(auth.authenticate)
    app.before_websocket(auth.authenticate)
    app.after_request(auth.audit)
    app.teardown_request(auth.audit_abandoned)

    @app.errorhandler(GatewayError)
    async def gateway_error(exc: GatewayError) -> Response:
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        if has_websocket_context():
            # A refused upgrade ends the connection; nothing may follow on it.
            response.headers["Connection"] = "close"
        if isinstance(exc, (QuotaExceeded, AtCapacity)):
            response.headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, Unauthorized):
            auth.challenge(response)
        if isinstance(exc, RangeNotSatisfiable):
            response.headers["Content-Range"] = f"bytes */{exc.details.get('size', 0)}"
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is larger than {gateway.config.max_body_bytes} bytes"
        details: dict[str, object] = {"field": "body"} if status in (400, 413) else {}
        # A 413's body stays unread: the HTTP protocol (web/server.py) ends the connection
        # after it and says so in the answer.
        return error_response(status, code, message, details)

    @app.errorhandler(sqlite3.Error)
    @app.errorhandler(StoreError)
    async def store_failed(exc: Exception) -> Response:
        # The store could not write a record the answer depends on (disk full, locked): the
        # call is refused, retryable, never a 500.
        log.error("store error: %s", exc)
        response = error_response(
            503, "at_capacity", "the gateway could not write its records; try again", {}
        )
        response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error; see the gateway log", {})

    return app
