"""Hypercorn, hardened for untrusted clients.

Two gaps in Hypercorn 0.17/0.18's trio TCP server matter for a gateway facing strangers:

* an exception other than ``OSError`` in one connection (for example h11's
  ``LocalProtocolError`` when a client pipelines a request after a refused WebSocket upgrade)
  propagates out of the connection handler and stops the whole server;
* writes are shielded from cancellation with no deadline, so a client that stops reading holds
  its connection (and, for a stream, its slot) forever.

``GuardedTCPServer`` confines errors to their connection and gives every write a deadline: a
client that takes nothing for ``write_timeout`` seconds is disconnected.

``CoalescingH11Protocol`` writes an HTTP/1.1 answer's head together with its body: Hypercorn
writes the head, the body and an empty end of message separately, three writes through this
server's send path and two wake-ups of the client for every answer.
"""

from __future__ import annotations

import logging

import h11
import hypercorn.protocol
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import H11SendableEvent

log = logging.getLogger(__name__)
DEFAULT_WRITE_TIMEOUT_S = 15.0


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


class CoalescingH11Protocol(H11Protocol):
    """Holds an answer's head (status line and headers) until its first body bytes or its end,
    and sends them in one write; skips the empty write of a sized body's end. Every answer of
    this gateway is a whole body (no streamed HTTP answer: the live stream is a WebSocket), so
    nothing waits on a head held back."""

    _head: bytes = b""

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
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


async def serve_http(
    app: object,
    config: HypercornConfig,
    shutdown: trio.Event,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT_S,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's trio ``serve`` with :class:`GuardedTCPServer` for every connection."""
    GuardedTCPServer.write_timeout = write_timeout
    # Hypercorn builds its connection handlers and their HTTP/1.1 protocol from these
    # module-level names.
    setattr(hypercorn_run, "TCPServer", GuardedTCPServer)  # noqa: B010 - patch the module name
    setattr(hypercorn.protocol, "H11Protocol", CoalescingH11Protocol)  # noqa: B010
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
