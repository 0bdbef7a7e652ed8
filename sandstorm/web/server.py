"""Hypercorn, hardened for untrusted clients.

Two gaps in Hypercorn 0.17/0.18's trio TCP server matter for a gateway facing strangers:

* an exception other than ``OSError`` in one connection (for example h11's
  ``LocalProtocolError`` when a client pipelines a request after a refused WebSocket upgrade)
  propagates out of the connection handler and stops the whole server;
* writes are shielded from cancellation with no deadline, so a client that stops reading holds
  its connection (and, for a stream, its slot) forever.

``GuardedTCPServer`` confines errors to their connection and gives every write a deadline: a
client that takes nothing for ``write_timeout`` seconds is disconnected. It also reads up to
``RECEIVE_SIZE`` at a time (Hypercorn reads 64 KiB): an upload's body then crosses the HTTP
parser and the ASGI hand-over in a quarter as many pieces.

``GatewayH11Protocol`` keeps a connection usable after an answer that did not read its
request's body (Hypercorn deadlocks there) and writes an answer's head together with its body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from math import inf

import h11
import hypercorn.protocol
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, Data, EndBody, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import ASGIReceiveEvent, H11SendableEvent

log = logging.getLogger(__name__)
DEFAULT_WRITE_TIMEOUT_S = 15.0
DEFAULT_DRAIN_LIMIT = 16 * 1024 * 1024
RECEIVE_SIZE = 256 * 1024


class GuardedTCPServer(TCPServer):
    write_timeout: float = DEFAULT_WRITE_TIMEOUT_S

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:
            # One broken connection must never take the listener down with it.
            log.warning("connection closed after a protocol error", exc_info=True)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()

    async def _read_data(self) -> None:
        # Hypercorn's loop, with a larger read.
        while True:
            try:
                with trio.fail_after(self.config.read_timeout or inf):
                    data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        async with self.send_lock:
            timed_out = False
            try:
                # Shielded as Hypercorn does (a half-written frame would corrupt the stream),
                # but with a deadline of its own.
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self.write_timeout
                    await self.stream.send_all(event.data)
                timed_out = scope.cancelled_caught
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
                return
        if timed_out:
            log.info("client read nothing for %.0fs: disconnecting it", self.write_timeout)
            await self._close()
            await self.protocol.handle(Closed())


class GatewayH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol with two changes.

    **A body the application did not read is discarded, and the connection goes on.** An
    answer can come before its request's body is read (a 404, a 413, a refused upload), and
    Hypercorn then deadlocks: the reading task waits to hand body chunks to an application
    that has finished (its queue holds ``max_app_queue_size`` chunks), so the connection never
    reads the next request. Here a hand-over is dropped once the application has finished, the
    rest of the body is read and thrown away, and the connection is reused. At most
    ``drain_limit`` bytes are discarded: when more is due (or its size is unknown, or the
    client waits for ``100 Continue``), the answer says ``Connection: close`` and the
    connection ends after it.

    **An answer's head goes out with its first body bytes** (or its end) in one write, and a
    sized body's empty end is not written: Hypercorn writes head, body and end separately,
    which wakes the client two extra times per answer. A streamed answer's head therefore
    waits for its first chunk.
    """

    drain_limit: int = DEFAULT_DRAIN_LIMIT
    _head: bytes = b""
    #: The request's declared body length (None: chunked) and the body bytes read so far.
    _declared: int | None = 0
    _received: int = 0
    #: Set while the rest of a body the application left unread is being discarded.
    _draining: bool = False
    _app_finished: bool = False
    _pending_put: trio.CancelScope | None = None

    async def _handle_events(self) -> None:
        # Hypercorn's loop, with the rest of an unread body discarded and counted.
        while True:
            if self.connection.they_are_waiting_for_100_continue:
                await self._send_h11_event(
                    h11.InformationalResponse(
                        status_code=100, headers=self.config.response_headers("h11")
                    )
                )
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError as error:
                if self.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                    await self._send_error_response(error.error_status_hint)
                await self.send(Closed())
                break
            if isinstance(event, h11.Request):
                self._declared, self._received = _declared_length(event), 0
                self._app_finished, self._draining = False, False
                await self.send(Updated(idle=False))
                await self._check_protocol(event)
                await self._create_stream(event)
            elif event is h11.PAUSED:
                await self.can_read.clear()
                await self.can_read.wait()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                break
            elif isinstance(event, h11.Data):
                self._received += len(event.data)
                if not self._draining and self.stream is not None:
                    await self.stream.handle(Body(stream_id=STREAM_ID, data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                if self._draining:
                    self._draining = False
                    await self._recycle()
                elif self.stream is not None:
                    await self.stream.handle(EndBody(stream_id=STREAM_ID))
            elif self.stream is None:
                break
            elif isinstance(event, Data):
                await self.stream.handle(event)  # WebSocket pass-through

    async def _create_stream(self, request: h11.Request) -> None:
        await super()._create_stream(request)
        stream = self.stream
        if isinstance(stream, HTTPStream) and stream.app_put is not None:
            stream.app_put = self._guarded_put(stream.app_put)

    def _guarded_put(
        self, put: Callable[[ASGIReceiveEvent], Awaitable[None]]
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        async def guarded(message: ASGIReceiveEvent) -> None:
            if self._app_finished:
                return  # nobody will ever take it
            with trio.CancelScope() as scope:
                self._pending_put = scope
                try:
                    await put(message)
                finally:
                    self._pending_put = None

        return guarded

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed):
            # The application has finished: release a hand-over it will never take.
            self._app_finished = True
            if self._pending_put is not None:
                self._pending_put.cancel()
        await super().stream_send(event)

    async def _maybe_recycle(self) -> None:
        if (
            self.connection.our_state is h11.DONE
            and self.connection.their_state is h11.SEND_BODY
            and not self.context.terminated.is_set()
        ):
            # The answer left at most drain_limit bytes unread (see _must_close): the reading
            # task discards them, then recycles the connection.
            await self._close_stream()
            self._draining = True
            await self.send(Updated(idle=True))  # the keep-alive timeout bounds the discard
            return
        await super()._maybe_recycle()

    async def _recycle(self) -> None:
        try:
            self.connection.start_next_cycle()
        except h11.LocalProtocolError:
            await self.send(Closed())
        else:
            await self.send(Updated(idle=True))

    def _must_close(self) -> bool:
        """Whether an answer sent now leaves more unread body than this connection discards."""
        if self.connection.their_state is not h11.SEND_BODY:
            return False
        if self.connection.they_are_waiting_for_100_continue or self._declared is None:
            return True
        return self._declared - self._received > self.drain_limit

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        if isinstance(event, h11.Response) and self._must_close():
            headers = [(n, v) for n, v in event.headers if n != b"connection"]
            event = h11.Response(
                status_code=event.status_code, headers=[*headers, (b"connection", b"close")]
            )
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if data is None:
            return
        if isinstance(event, h11.Response):
            self._head += data
            return
        if self._head:
            data, self._head = self._head + data, b""
        if data:
            await self.send(RawData(data=data))


def _declared_length(request: h11.Request) -> int | None:
    """The body length a request declares: None when it is chunked (h11 has validated it)."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
        if name == b"transfer-encoding":
            return None
    return 0


async def serve_http(
    app: object,
    config: HypercornConfig,
    shutdown: trio.Event,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT_S,
    drain_limit: int = DEFAULT_DRAIN_LIMIT,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's trio ``serve`` with :class:`GuardedTCPServer` for every connection."""
    GuardedTCPServer.write_timeout = write_timeout
    GatewayH11Protocol.drain_limit = drain_limit
    # Hypercorn builds its connection handlers and their HTTP/1.1 protocol from these
    # module-level names.
    setattr(hypercorn_run, "TCPServer", GuardedTCPServer)  # noqa: B010 - patch the module name
    setattr(hypercorn.protocol, "H11Protocol", GatewayH11Protocol)  # noqa: B010
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
