"""Request bodies the file routes stream into a sandbox, with back-pressure.

Quart reads a request's body into a buffer as fast as the client sends it, whether or not the
handler takes it. For an upload that buffer would hold whatever the sandbox has not written yet
— up to the whole file. Here an upload route's body holds at most :data:`UPLOAD_BUFFER` bytes:
past that the connection stops reading the socket until the handler takes what is there, so
TCP slows the client to the sandbox's pace. Other routes keep Quart's body (their bodies are
JSON, read whole, at most ``max_body_bytes``).
"""

from __future__ import annotations

import re
from typing import Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart import Request
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody

__all__ = ["UPLOAD_BUFFER", "UPLOAD_ROUTE", "BoundedBody", "GatewayHTTPConnection"]

#: Bytes of an upload received but not yet taken by its handler, at most (plus one read).
UPLOAD_BUFFER: Final = 1024 * 1024
#: The routes whose body is a file or an archive: ``PUT`` of ``files/content`` and
#: ``files/archive``.
UPLOAD_ROUTE: Final = re.compile(r"^/v1/sandboxes/[^/]+/files/(?:content|archive)$")


class BoundedBody(TrioBody):
    """A body the handler iterates (``async for chunk in request.body``), holding at most
    :data:`UPLOAD_BUFFER` bytes it has not taken. Its limit is ``max_upload_bytes`` for a
    declared ``Content-Length``; a chunked body is counted by its handler."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        super().__init__(expected_content_length, max_content_length)
        self._taken = trio.Event()

    def append(self, data: bytes) -> None:
        # Quart's own check counts only what is buffered; the whole size is its handler's.
        if data == b"" or self._must_raise is not None:
            return
        self._data.extend(data)
        self._has_data.set()

    async def __anext__(self) -> bytes:
        data = await super().__anext__()
        self._taken.set()
        return data

    async def wait_for_room(self) -> None:
        """Return once the buffer is below :data:`UPLOAD_BUFFER` (cancellable)."""
        while len(self._data) >= UPLOAD_BUFFER and self._must_raise is None:
            self._taken = trio.Event()
            await self._taken.wait()


class GatewayHTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, with :class:`BoundedBody` for the upload routes."""

    def _create_request_from_scope(self, send: ASGISendCallable) -> Request:
        request = super()._create_request_from_scope(send)
        if self.scope["method"] == "PUT" and UPLOAD_ROUTE.match(self.scope["path"]):
            limit = self.app.config["SANDSTORM_GATEWAY"].config.max_upload_bytes
            request.body = BoundedBody(request.content_length, limit)
        return request

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: ASGIReceiveCallable
    ) -> None:
        body = request.body
        while True:
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
                elif isinstance(body, BoundedBody):
                    await body.wait_for_room()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()
