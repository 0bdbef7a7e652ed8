"""Structured logs: one JSON object per line on stderr, each carrying the request id (and the
sandbox and exec ids when known) of the work it is about.

The ids travel in one context variable holding a small mutable record per request. Trio copies
the context into every task it starts, so the record reaches every task serving the request, and
an id bound in one of them (the sandbox a create made) shows in the request's access line too. A
sandbox actor, which outlives the request that created it, takes a record of its own
(:func:`bind_sandbox`).

What is logged is chosen so that secrets cannot leak: request bodies (environment values, code,
stdin) and headers (Authorization) are never logged, only methods, paths, statuses and ids.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]
REQUEST_ID_HEADER = "X-Request-Id"
# An incoming id is echoed into every log line and response: keep it short and inert.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_LOGGED_PATH = 256

_IDS = ("request_id", "sandbox_id", "exec_id")
access_log = logging.getLogger("sandstorm.access")


@dataclass(slots=True)
class LogContext:
    request_id: str | None = None
    sandbox_id: str | None = None
    exec_id: str | None = None


log_context: ContextVar[LogContext | None] = ContextVar("sandstorm_log_context", default=None)


def current_request_id() -> str | None:
    """The id of the request the current task serves (None outside requests)."""
    ctx = log_context.get()
    return ctx.request_id if ctx is not None else None


class _RequestIdVar:
    """Read-only, ContextVar-like view of the request id (``request_id_var.get()``)."""

    def get(self) -> str | None:
        return current_request_id()


request_id_var = _RequestIdVar()


def request_id_from(incoming: str | None) -> str:
    """The client's id when it is sane (bounded, safe characters), else a fresh one."""
    if incoming is not None and _SAFE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def bind(*, sandbox_id: str | None = None, exec_id: str | None = None) -> None:
    """Name the sandbox (and exec) the current request works on, for its log lines."""
    ctx = log_context.get()
    if ctx is None:
        ctx = LogContext()
        log_context.set(ctx)
    # Ids from a path are the client's: bounded before they reach every line.
    if sandbox_id is not None:
        ctx.sandbox_id = sandbox_id[:64]
    if exec_id is not None:
        ctx.exec_id = exec_id[:64]


def bind_sandbox(sandbox_id: str) -> None:
    """For a sandbox actor's own tasks: they outlive the request that started them."""
    log_context.set(LogContext(sandbox_id=sandbox_id))


class ContextFilter(logging.Filter):
    """Copy the context ids onto every record (unless the call gave them in ``extra``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = log_context.get()
        for name in _IDS:
            if getattr(record, name, None) is None:
                setattr(record, name, getattr(ctx, name) if ctx is not None else None)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _IDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        for name in ("method", "path", "status", "duration_ms"):
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [getattr(record, name, None) for name in _IDS]
        record.ids = "".join(f" [{i}]" for i in ids if i is not None)
        return super().format(record)


# Records formatted but not yet written to stderr; beyond this, new ones are dropped (counted)
# rather than stall the event loop behind a slow reader of stderr.
LOG_QUEUE_RECORDS = 10_000


class _QueueHandler(logging.handlers.QueueHandler):
    """Formats on the caller's thread (the context ids are there) and hands the line to the
    writer thread without ever blocking: a full queue drops the record."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


_listener: logging.handlers.QueueListener | None = None


def configure(fmt: LogFormat = "json", level: str | int = "INFO") -> None:
    """Send every logger's records to stderr in ``fmt`` (replaces earlier root handlers).

    The write itself happens on a thread of its own: a blocking ``write(2)`` to a pipe whose
    reader is slow (a log shipper) would otherwise stop the whole gateway mid-request."""
    _stop_writer()
    writer = logging.StreamHandler(sys.stderr)  # writes the prepared line as it is
    handler = _QueueHandler(queue.Queue(LOG_QUEUE_RECORDS))
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    global _listener
    _listener = logging.handlers.QueueListener(handler.queue, writer)
    _listener.start()


@atexit.register  # what is queued is written before the process exits
def _stop_writer() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


# ---------------------------------------------------------------------------- ASGI

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Any ASGI app (Quart's own signature uses its typed events, which are mappings too).
ASGIApp = Callable[..., Awaitable[None]]
_STARTS = ("http.response.start", "websocket.http.response.start", "websocket.accept")


class RequestIdMiddleware:
    """Give every HTTP request and WebSocket a request id (the client's ``X-Request-Id`` when
    sane), bind it for the request's log lines, return it on every response, refused upgrades
    and accepted WebSockets included, and write one access line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = request_id_from(incoming)
        log_context.set(LogContext(request_id=request_id))
        header = (b"x-request-id", request_id.encode())
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind in _STARTS:
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), header]
                status = 101 if kind == "websocket.accept" else int(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The path only: the query string is the client's, and it is never needed here.
            method = scope.get("method", "WEBSOCKET")
            path = str(scope.get("path", ""))[:_MAX_LOGGED_PATH]
            elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
            access_log.info(
                "%s %s %s %.1fms", method, path, status, elapsed_ms,
                extra={"method": method, "path": path, "status": status, "duration_ms": elapsed_ms},
            )  # fmt: skip
