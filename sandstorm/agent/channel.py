"""The gateway's framed connection to one agent (see ``protocol/agent.md``).

Every frame received is checked against the direction, the size limits and the channel rules of
``wire`` before anything else looks at it; every frame sent is checked the same way before any
byte of it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Self

import trio

from .wire import (
    AGENT_TO_GATEWAY,
    GATEWAY_TO_AGENT,
    HEADER,
    MAX_AGENT_FRAME,
    MAX_CHANNEL,
    MAX_GATEWAY_FRAME,
    MAX_PING_PAYLOAD,
    NEEDS_CHANNEL,
    AgentProtocolError,
    Frame,
    FrameKind,
    Hello,
    decode_hello,
    encode_exec,
    encode_signal,
    encode_write_file,
)

__all__ = ["AgentChannel", "AgentChannelStatistics"]

_RECEIVE_SIZE: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class AgentChannelStatistics:
    frames_sent: int
    frames_received: int
    bytes_buffered: int


def _check_channel(channel: int, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= channel <= MAX_CHANNEL:
        raise ValueError(f"channel {channel} out of range {low}..{MAX_CHANNEL}")


def _encode_frame(kind: FrameKind, channel: int, payload: bytes) -> bytes:
    """A frame to the agent, checked: raises :class:`ValueError` for a kind the gateway may not
    send, a channel out of range or a payload over :data:`MAX_GATEWAY_FRAME`."""
    kind = FrameKind(kind)
    if kind not in GATEWAY_TO_AGENT:
        raise ValueError(f"frame kind {kind.name} is not sent by the gateway")
    _check_channel(channel, allow_zero=kind not in NEEDS_CHANNEL)
    if len(payload) > MAX_GATEWAY_FRAME:
        raise ValueError(f"{kind.name} payload of {len(payload)} bytes exceeds {MAX_GATEWAY_FRAME}")
    return HEADER.pack(kind, channel, len(payload)) + payload


class AgentChannel:
    """One framed connection to an agent, over a pair of byte streams.

    In gVisor the streams are the stdin and stdout pipes of the ``runsc`` process. One task may
    receive while any number of tasks send; sends are serialised by a FIFO lock so frames never
    interleave. The receive buffer holds at most one partial frame plus one read
    (``MAX_AGENT_FRAME + 9`` bytes plus one read of 256 KiB).

    After an :class:`AgentProtocolError` the receive side is unusable (the framing is lost): every
    later :meth:`receive_frame` raises again. After a send is cancelled or fails part-way the send
    side is unusable (a partial frame may have been written): later sends raise
    :class:`trio.BrokenResourceError`.
    """

    def __init__(
        self,
        send_stream: trio.abc.SendStream,
        receive_stream: trio.abc.ReceiveStream,
        *,
        offset: int = 0,
    ) -> None:
        self._send_stream = send_stream
        self._receive_stream = receive_stream
        self._send_lock = trio.StrictFIFOLock()
        self._buffer = bytearray()
        self._receiving = False
        self._receive_error: AgentProtocolError | None = None
        self._send_broken = False
        self._eof = False
        self._frames_sent = 0
        self._frames_received = 0
        self._offset = offset

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def statistics(self) -> AgentChannelStatistics:
        return AgentChannelStatistics(
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            bytes_buffered=len(self._buffer),
        )

    @property
    def offset(self) -> int:
        """Stream offset just past the last whole frame received (``offset`` given at start
        plus every byte of every frame returned): where a replay would resume cleanly."""
        return self._offset

    # -- receiving -----------------------------------------------------------------------

    def _parse_header(self) -> tuple[FrameKind, int, int]:
        raw_kind, channel, length = HEADER.unpack_from(self._buffer)
        try:
            kind = FrameKind(raw_kind)
        except ValueError:
            raise AgentProtocolError(f"unknown frame kind {raw_kind}") from None
        if kind not in AGENT_TO_GATEWAY:
            raise AgentProtocolError(f"frame kind {kind.name} is not allowed from the agent")
        if length > MAX_AGENT_FRAME:
            raise AgentProtocolError(
                f"{kind.name} frame of {length} bytes exceeds the limit of {MAX_AGENT_FRAME}"
            )
        if kind is FrameKind.HELLO and channel != 0:
            raise AgentProtocolError(f"HELLO on channel {channel}, expected channel 0")
        if kind in NEEDS_CHANNEL and channel == 0:
            raise AgentProtocolError(f"{kind.name} frame on channel 0")
        return kind, channel, length

    async def receive_frame(self) -> Frame | None:
        """Receive the next frame, or ``None`` on a clean end of stream between frames.

        Raises :class:`AgentProtocolError` on a malformed frame or an end of stream inside a
        frame, and :class:`trio.BusyResourceError` if another task is already receiving.
        Cancellation is safe: bytes already read stay buffered and the next call resumes the
        same frame.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving from this agent")
        if self._receive_error is not None:
            raise AgentProtocolError(f"channel already failed: {self._receive_error}")
        self._receiving = True
        try:
            return await self._receive_frame()
        except AgentProtocolError as exc:
            self._receive_error = exc
            raise
        finally:
            self._receiving = False

    async def _receive_frame(self) -> Frame | None:
        header: tuple[FrameKind, int, int] | None = None
        while True:
            if header is None and len(self._buffer) >= HEADER.size:
                header = self._parse_header()
            if header is not None:
                kind, channel, length = header
                end = HEADER.size + length
                if len(self._buffer) >= end:
                    with memoryview(self._buffer) as view:  # one copy, not two
                        payload = bytes(view[HEADER.size : end])
                    del self._buffer[:end]
                    self._frames_received += 1
                    self._offset += end
                    return Frame(kind, channel, payload)
            if self._eof:
                if self._buffer:
                    raise AgentProtocolError(
                        f"agent stream ended inside a frame ({len(self._buffer)} bytes pending)"
                    )
                return None
            data = await self._receive_stream.receive_some(_RECEIVE_SIZE)
            if not data:
                self._eof = True
            else:
                self._buffer += data

    async def wait_hello(self) -> Hello:
        """Wait for the agent's HELLO, which must be its first frame.

        Raises :class:`AgentProtocolError` if the stream ends first, another frame comes first,
        or the protocol version differs. Cancellation is safe (see :meth:`receive_frame`).
        """
        frame = await self.receive_frame()
        if frame is None:
            error = AgentProtocolError("agent closed its stream before sending HELLO")
            self._receive_error = error
            raise error
        if frame.kind is not FrameKind.HELLO:
            error = AgentProtocolError(f"expected HELLO as the first frame, got {frame.kind.name}")
            self._receive_error = error
            raise error
        return decode_hello(frame.payload)

    # -- sending -------------------------------------------------------------------------

    async def send_frame(self, kind: FrameKind, channel: int, payload: bytes = b"") -> None:
        """Send one frame; concurrent callers are served in FIFO order, never interleaved.

        Raises :class:`ValueError` for a kind the gateway may not send, a channel out of range or
        a payload over :data:`MAX_GATEWAY_FRAME`. Cancellation while waiting for the lock sends
        nothing; cancellation (or an error) while writing leaves the send side broken.
        """
        data = _encode_frame(kind, channel, payload)
        async with self._send_lock:
            await self._send_locked(data)
        self._frames_sent += 1

    async def send_frames(self, frames: list[tuple[FrameKind, int, bytes]]) -> None:
        """Send several frames in one write (checked as :meth:`send_frame` checks each); nothing
        else comes between them. Cancellation and errors as for :meth:`send_frame`."""
        data = b"".join(_encode_frame(kind, channel, payload) for kind, channel, payload in frames)
        async with self._send_lock:
            await self._send_locked(data)
        self._frames_sent += len(frames)

    async def _send_locked(self, data: bytes) -> None:
        """Write ``data`` whole; the caller holds the send lock (subclasses that carry their own
        frames on the same stream, like the shim's, go through here too)."""
        if self._send_broken:
            raise trio.BrokenResourceError("an earlier send to the agent did not complete")
        try:
            await self._send_stream.send_all(data)
        except BaseException:
            self._send_broken = True
            raise

    async def send_exec(
        self,
        channel: int,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        *,
        last: bool = False,
        background: bool = False,
    ) -> None:
        """Start ``argv`` with exactly ``env`` in ``cwd`` as exec ``channel`` (>= 1, unique).
        ``last``: the sandbox ends after this exec, so the agent prepares nothing for later.
        When the process ends, the agent kills what is left in its process group, unless
        ``background``: then those processes run on (until the sandbox ends)."""
        if not argv:
            raise ValueError("argv must not be empty")
        payload = encode_exec(argv, env, cwd, last=last, background=background)
        await self.send_frame(FrameKind.EXEC, channel, payload)

    async def send_stdin(self, channel: int, data: bytes) -> None:
        """Send stdin for an exec, split into frames of at most :data:`MAX_GATEWAY_FRAME`.

        Other frames may be sent between the pieces. The agent buffers at most
        :data:`MAX_STDIN_BUFFER` per exec and drops the excess with an ERROR, so callers
        pace large inputs. Cancellation may leave a prefix of ``data`` sent.
        """
        view = memoryview(data)
        for start in range(0, len(view), MAX_GATEWAY_FRAME):
            await self.send_frame(
                FrameKind.STDIN, channel, bytes(view[start : start + MAX_GATEWAY_FRAME])
            )

    async def send_stdin_close(self, channel: int) -> None:
        """Close the exec's stdin once the agent has delivered the input buffered so far."""
        await self.send_frame(FrameKind.STDIN_CLOSE, channel)

    async def send_signal(self, channel: int, signum: int) -> None:
        """Send ``signum`` (1..64) to the exec's whole process group."""
        if not 1 <= signum <= 64:
            raise ValueError(f"signal {signum} out of range 1..64")
        await self.send_frame(FrameKind.SIGNAL, channel, encode_signal(signum))

    async def send_write_file(
        self, channel: int, path: str, data: bytes, mode: int, *, append: bool = False
    ) -> None:
        """Ask the agent to write ``data`` to the absolute ``path``; it answers FILE_WRITTEN.

        ``append`` adds to the file instead of replacing it: larger files are sent as chunks of
        at most :data:`WRITE_FILE_CHUNK` bytes. The base64 request must fit
        :data:`MAX_GATEWAY_FRAME` (about 767 KiB of data), otherwise :class:`ValueError` is
        raised before anything is sent.
        """
        if not path.startswith("/"):
            raise ValueError(f"path must be absolute: {path!r}")
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"mode {mode:#o} out of range")
        payload = encode_write_file(path, data, mode, append=append)
        await self.send_frame(FrameKind.WRITE_FILE, channel, payload)

    async def send_quiesce(self) -> None:
        """Send QUIESCE: the agent stops what it runs for itself (its python zygote) before a
        checkpoint. No answer of its own: follow it with a PING, whose PONG comes after."""
        await self.send_frame(FrameKind.QUIESCE, 0, b"")

    async def send_ping(self, payload: bytes = b"", *, channel: int = 0) -> None:
        """Send PING; the agent answers PONG with the same payload and channel."""
        if len(payload) > MAX_PING_PAYLOAD:
            raise ValueError(f"PING payload of {len(payload)} bytes exceeds {MAX_PING_PAYLOAD}")
        await self.send_frame(FrameKind.PING, channel, payload)

    async def aclose(self) -> None:
        """Close both streams (the agent sees EOF, kills its execs and exits).

        Like every trio ``aclose``, it completes even if cancelled, closing forcefully.
        """
        try:
            await self._send_stream.aclose()
        finally:
            await self._receive_stream.aclose()
