"""Hypercorn, hardened for untrusted clients.

Two gaps in Hypercorn 0.17/0.18's trio TCP server matter for a gateway facing strangers:

* an exception other than ``OSError`` in one connection (for example h11's
  ``LocalProtocolError`` when a client pipelines a request after a refused WebSocket upgrade)
  propagates out of the connection handler and stops the whole server;
* writes are shielded from cancellation with no deadline, so a client that stops reading holds
  its connection (and, for a stream, its slot) forever.

``GuardedTCPServer`` confines errors to their connection and gives every write a deadline: a
client that takes nothing for ``write_timeout`` seconds is disconnected.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer

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
    # Hypercorn builds its connection handlers from this module-level name.
    setattr(hypercorn_run, "TCPServer", GuardedTCPServer)  # noqa: B010 - patch the module name
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
