"""The gateway's connection to a shim (``protocol/shim.md``): attaching at a stream offset, and
the agent channel over it with the shim's own frames (acknowledge, stop, kill)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import trio

from sandstorm.agent import HEADER, AgentChannel, Frame
from sandstorm.shim import wire
from sandstorm.shim.process import ShimPaths, read_exit_status

ATTACH_TIMEOUT_S: Final = 5.0
STOP_SEND_S: Final = 1.0


class ShimAttachError(Exception):
    """No usable connection to a shim: none lives, it does not answer, or its journal no
    longer holds the offset asked for; the message says which."""


@dataclass(frozen=True, slots=True)
class Handshake:
    """The shim's answer to ATTACH."""

    shim_pid: int
    runtime_pid: int
    first_offset: int  # the oldest journal byte still held
    start_offset: int  # where the stream that follows begins (the offset asked for)
    end_offset: int  # the journal's end when the shim answered
    exited: bool
    status: int  # the runtime's exit status when ``exited``

    @property
    def usable(self) -> bool:
        return self.first_offset <= self.start_offset <= self.end_offset


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        # At most what is missing: bytes after the handshake belong to the agent channel.
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise ShimAttachError("the shim closed the connection during the handshake")
        data += chunk
    return bytes(data)


async def attach(
    paths: ShimPaths, offset: int, *, just_started: bool = False
) -> tuple[trio.SocketStream, Handshake]:
    """Connect to a live shim and ask for its stream from ``offset``.

    Raises :class:`ShimAttachError` with the reason when there is no live shim, it does not
    answer within :data:`ATTACH_TIMEOUT_S`, or the bytes from ``offset`` are not in its journal.
    A shim ``just_started`` has no such bound: its start-up is bounded by the caller's boot
    deadline instead.
    """
    try:
        stream = await trio.open_unix_socket(str(paths.socket))
    except OSError as exc:
        recorded = read_exit_status(paths)
        if recorded is not None:
            raise ShimAttachError(f"the sandbox exited with status {recorded}") from None
        raise ShimAttachError(f"no live shim at {paths.socket}: {exc.strerror}") from None
    try:
        with trio.move_on_after(math.inf if just_started else ATTACH_TIMEOUT_S) as scope:
            request = wire.OFFSET.pack(offset)
            await stream.send_all(HEADER.pack(wire.ATTACH, 0, len(request)) + request)
            header = await _receive_exactly(stream, HEADER.size)
            kind, _channel, length = HEADER.unpack(header)
            if kind != wire.ATTACHED_KIND or length != wire.ATTACHED.size:
                raise ShimAttachError(f"unexpected shim handshake (kind {kind}, {length} bytes)")
            shim_pid, runtime_pid, first, start, end, exited, status = wire.ATTACHED.unpack(
                await _receive_exactly(stream, length)
            )
        if scope.cancelled_caught:
            raise ShimAttachError(f"the shim did not answer within {ATTACH_TIMEOUT_S:.0f}s")
        handshake = Handshake(shim_pid, runtime_pid, first, start, end, bool(exited), status)
        if not handshake.usable:
            raise ShimAttachError(
                f"offset {offset} is not in the shim's journal "
                f"(it holds {handshake.first_offset}..{handshake.end_offset})"
            )
    except (OSError, trio.BrokenResourceError) as exc:
        await stream.aclose()
        raise ShimAttachError(f"the shim's connection failed: {exc}") from None
    except BaseException:
        await stream.aclose()
        raise
    return stream, handshake


class ShimChannel(AgentChannel):
    """An :class:`AgentChannel` over a shim's socket, with the shim's own frames.

    ``auto_ack``: after every ``ack_every`` bytes received, tell the shim it may drop them
    (skipped while another send holds the lock; the next frame tries again). Turn it off to
    acknowledge only what is durable elsewhere, with :meth:`send_ack`.
    """

    def __init__(
        self, stream: trio.SocketStream, *, offset: int, ack_every: int, auto_ack: bool = True
    ) -> None:
        super().__init__(stream, stream, offset=offset)
        self._stream = stream
        self.acked = offset
        self.ack_every = ack_every
        self.auto_ack = auto_ack

    async def receive_frame(self) -> Frame | None:
        # Acknowledge before waiting for more, never after a frame was taken: a cancelled ack
        # must not lose a frame.
        if (
            self.auto_ack
            and self.offset - self.acked >= self.ack_every
            and not self._send_lock.locked()
        ):
            await self.send_ack(self.offset)
        return await super().receive_frame()

    async def _send_shim_frame(self, kind: int, payload: bytes = b"") -> None:
        async with self._send_lock:
            await self._send_locked(HEADER.pack(kind, 0, len(payload)) + payload)

    async def send_ack(self, offset: int) -> None:
        """Everything before ``offset`` is durable on the gateway's side: the shim may drop it."""
        await self._send_shim_frame(wire.ACK, wire.OFFSET.pack(offset))
        self.acked = max(self.acked, offset)

    async def send_kill(self) -> None:
        await self._send_shim_frame(wire.KILL)

    async def aclose(self) -> None:
        """Ask the sandbox to stop (the shim closes the agent's stdin after the frames sent
        before), then close the connection. Completes even if cancelled."""
        try:
            with trio.move_on_after(STOP_SEND_S):
                await self._send_shim_frame(wire.STOP)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await super().aclose()

    async def detach(self) -> None:
        """Close the connection and leave the sandbox running: the shim keeps journaling."""
        await super().aclose()

    def close_now(self) -> None:
        """Close the socket at once (the shim is gone); a task still using it gets
        :class:`trio.ClosedResourceError`."""
        self._stream.socket.close()
