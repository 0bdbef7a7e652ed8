"""The gateway's side of the agent's file requests (``FS`` frames, "Files" in
``protocol/agent.md``): stat, list, read, write, mkdir, move, remove, links, merge and watch,
each inside the sandbox, as its user, on its own paths.

Bytes move with back-pressure both ways. Towards the agent, a write sends its body as FS_DATA
frames through the same bounded stream as everything else (the shim and the agent's pipe hold a
bounded amount, then the send waits). From the agent, a read or a walk sends only what the
gateway has granted as credit (FS_CREDIT): each holds at most its window of bytes here, however
slowly its consumer takes them, and the agent's other frames (exec output) never wait behind it.
An agent that sends past its credit breaks the protocol.

The owner (the sandbox actor) gives every request a fresh channel, sends through its own path to
the agent, hands every FS_* frame to :meth:`AgentFiles.dispatch`, and calls
:meth:`AgentFiles.fail_all` when the connection to the agent ends.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from sandstorm.errors import GatewayError, SandboxNotRunning

from .channel import AgentChannel
from .fs_wire import (
    FS_DATA_CHUNK,
    FileError,
    FsEntry,
    FsEvent,
    FsReply,
    decode_events,
    decode_listing,
    decode_reply,
    encode_credit,
    encode_request,
    file_error,
)
from .wire import AgentProtocolError, FrameKind

__all__ = ["AgentFiles", "Download", "FileError", "Walk", "Watch", "file_error"]

#: Bytes of a read the agent may send ahead of its consumer.
READ_WINDOW: Final = 4 * 1024 * 1024
#: Bytes of listing a walk may send ahead of its consumer.
WALK_WINDOW: Final = 1024 * 1024
#: How long the agent gets to answer one request (a recursive remove of a large tree is slow).
REPLY_TIMEOUT_S: Final = 120.0

#: FS_END of a write that must not be committed: the agent removes what it wrote.
_ABORT: Final = b'{"abort":true}'

Send = Callable[[Callable[[AgentChannel], Awaitable[None]]], Awaitable[None]]


@dataclass(eq=False)
class _Request:
    channel: int
    path: str
    streams: bool = False  # a read or a walk: FS_DATA then FS_END follow an ok reply
    reply: FsReply | None = None
    end: FsReply | None = None
    error: GatewayError | None = None
    data: deque[bytes] = field(default_factory=deque)
    granted: int = 0  # credit given to the agent in all
    received: int = 0  # FS_DATA bytes it sent
    taken: int = 0  # FS_DATA bytes the consumer has taken
    on_events: Callable[[list[FsEvent]], None] | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def wake(self) -> None:
        self.changed.set()

    async def wait(self) -> None:
        await self.changed.wait()
        self.changed = trio.Event()


class Download:
    """A file being read: its ``entry``, the byte range (``offset``, ``length``) and, by
    iteration, the bytes of that range in order. Exhausting it checks that the agent ended the
    read cleanly; leaving early (the context manager of :meth:`AgentFiles.read` closing) stops
    the read in the agent."""

    def __init__(self, files: AgentFiles, request: _Request, reply: FsReply) -> None:
        assert reply.entry is not None
        self.entry: FsEntry = reply.entry
        self.offset = reply.offset
        self.length = reply.length
        self._files = files
        self._request = request

    def __aiter__(self) -> Download:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._files._next_data(self._request, READ_WINDOW)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class Walk:
    """A directory being walked: its own ``entry``, then by iteration every entry under it in
    walk order (a directory before its contents), to the requested depth and entry limit;
    ``truncated`` once the iteration is over."""

    def __init__(self, files: AgentFiles, request: _Request, reply: FsReply) -> None:
        assert reply.entry is not None
        self.entry: FsEntry = reply.entry
        self.truncated = False
        self._files = files
        self._request = request
        self._entries: deque[FsEntry] = deque()

    def __aiter__(self) -> Walk:
        return self

    async def __anext__(self) -> FsEntry:
        while not self._entries:
            chunk = await self._files._next_data(self._request, WALK_WINDOW)
            if chunk is None:
                end = self._request.end
                self.truncated = end is not None and end.truncated
                raise StopAsyncIteration
            self._entries.extend(decode_listing(chunk).entries)
        return self._entries.popleft()


class Watch:
    """A watch on a path: events go to its callback until :meth:`aclose`."""

    def __init__(self, files: AgentFiles, request: _Request, entry: FsEntry) -> None:
        self.entry = entry
        self._files = files
        self._request = request

    async def aclose(self) -> None:
        """Stop the watch in the agent (idempotent; safe while cancelled: shielded, bounded)."""
        await self._files._finish(self._request)


class AgentFiles:
    """File requests to one agent, over its owner's channel.

    Every method raises the gateway error for what the agent reports (:func:`file_error`),
    :class:`SandboxNotRunning` when the sandbox ends or stops answering, and
    :class:`AgentProtocolError` from :meth:`dispatch` for frames that break the protocol.
    Cancelling a call abandons its request in the agent (a write is aborted and leaves no
    file behind).
    """

    def __init__(
        self,
        send: Send,
        next_channel: Callable[[], int],
        *,
        write_guard: Callable[[int], None] | None = None,
    ) -> None:
        self._send = send
        self._next_channel = next_channel
        # Called with the bytes of each write's next frames before they are sent; raises to
        # stop the write (the sandbox has no room for them).
        self._write_guard = write_guard
        self._requests: dict[int, _Request] = {}
        self._closed: GatewayError | None = None

    def statistics(self) -> dict[str, int]:
        return {
            "requests": len(self._requests),
            "bytes_buffered": sum(sum(map(len, r.data)) for r in self._requests.values()),
        }

    # ------------------------------------------------------------------ from the agent

    def dispatch(self, kind: int, channel: int, payload: bytes) -> None:
        """Apply one FS_* frame from the (untrusted) agent; frames for requests the gateway
        has given up are dropped. Raises :class:`AgentProtocolError` on nonsense."""
        request = self._requests.get(channel)
        if request is None:
            if kind == FrameKind.FS_REPLY:
                decode_reply(payload)  # still checked: a reply is never nonsense
            return
        if kind == FrameKind.FS_REPLY:
            if request.reply is not None:
                raise AgentProtocolError(f"second FS_REPLY on channel {channel}")
            request.reply = decode_reply(payload)
        elif kind == FrameKind.FS_DATA:
            if not request.streams or request.reply is None or request.end is not None:
                raise AgentProtocolError(f"FS_DATA on channel {channel} sends no data")
            request.received += len(payload)
            if request.received > request.granted:
                raise AgentProtocolError(
                    f"FS_DATA on channel {channel} past its credit of {request.granted} bytes"
                )
            request.data.append(payload)
        elif kind == FrameKind.FS_END:
            if not request.streams or request.reply is None or request.end is not None:
                raise AgentProtocolError(f"unexpected FS_END on channel {channel}")
            request.end = decode_reply(payload, "FS_END")
        elif kind == FrameKind.FS_EVENT:
            if request.on_events is None or request.reply is None:
                raise AgentProtocolError(f"FS_EVENT on channel {channel}, which watches nothing")
            request.on_events(decode_events(payload).events)
        else:
            raise AgentProtocolError(f"frame kind {kind} is not a file frame")
        request.wake()

    def fail_all(self, error: GatewayError, *, keep_watches: bool = False) -> None:
        """The connection to the agent is gone: every request fails with ``error``, and so do
        later ones until :meth:`reopen`. ``keep_watches``: watches stay (the agent keeps them
        across a snapshot, and sends their events on the new connection)."""
        self._closed = error
        for request in self._requests.values():
            if keep_watches and request.on_events is not None:
                continue
            request.error = error
            request.wake()

    def reopen(self) -> None:
        """A new connection to the same sandbox (after a snapshot): requests work again."""
        self._closed = None

    # ------------------------------------------------------------------ plumbing

    def _open(self, path: str, *, streams: bool = False, granted: int = 0) -> _Request:
        if self._closed is not None:
            raise self._closed
        request = _Request(channel=self._next_channel(), path=path, streams=streams)
        request.granted = granted
        self._requests[request.channel] = request
        return request

    async def _frame(self, kind: FrameKind, channel: int, payload: bytes = b"") -> None:
        await self._send(lambda ch: ch.send_frame(kind, channel, payload))

    async def _reply(self, request: _Request) -> FsReply:
        """The request's FS_REPLY; raises its error when it failed."""
        with trio.move_on_after(REPLY_TIMEOUT_S) as scope:
            while request.reply is None and request.error is None:
                await request.wait()
        if scope.cancelled_caught:
            raise SandboxNotRunning(f"the sandbox did not answer a file request for {request.path}")
        if request.error is not None:
            raise request.error
        assert request.reply is not None
        failure = request.reply.failure
        if failure is not None:
            raise file_error(failure, request.path)
        return request.reply

    async def _finish(self, request: _Request) -> None:
        """Forget a read, a walk or a watch; one the agent may still be serving (or about to
        start: no answer yet) is told to stop with FS_END. Shielded and bounded: safe in
        cleanup."""
        if self._requests.pop(request.channel, None) is None:
            return
        done = request.streams and request.end is not None
        refused = request.reply is not None and not request.reply.ok
        if request.error is None and not done and not refused:
            await self._tell_end(request.channel, b"")

    async def _tell_end(self, channel: int, payload: bytes) -> None:
        """FS_END to a request the gateway gives up; shielded and bounded, errors ignored (a
        sandbox that is gone has nothing left to stop)."""
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(5),
            contextlib.suppress(GatewayError, trio.BrokenResourceError),
        ):
            await self._frame(FrameKind.FS_END, channel, payload)

    async def _call(self, op: str, subject: str, /, **fields: object) -> FsReply:
        """One request with one reply; ``subject`` is the path errors are about."""
        request = self._open(subject)
        try:
            await self._frame(FrameKind.FS, request.channel, encode_request(op, **fields))
            return await self._reply(request)
        finally:
            self._requests.pop(request.channel, None)

    async def _next_data(self, request: _Request, window: int) -> bytes | None:
        """The request's next FS_DATA payload, granting more credit as they are taken; None at
        its FS_END, or the error that FS_END reports."""
        while True:
            if request.data:
                chunk = request.data.popleft()
                request.taken += len(chunk)
                if request.end is None and request.granted - request.taken <= window // 2:
                    # Back to a full window ahead of what is taken.
                    more = request.taken + window - request.granted
                    request.granted += more
                    await self._frame(FrameKind.FS_CREDIT, request.channel, encode_credit(more))
                return chunk
            if request.error is not None:
                raise request.error
            if request.end is not None:
                failure = request.end.failure
                if failure is not None:
                    raise file_error(failure, request.path)
                return None
            with trio.move_on_after(REPLY_TIMEOUT_S) as scope:
                await request.wait()
            if scope.cancelled_caught:
                raise SandboxNotRunning(f"the sandbox stopped sending {request.path}")

    # ------------------------------------------------------------------ requests

    async def stat(self, path: str) -> FsEntry:
        """The entry at ``path`` (a symlink is itself, not what it points to)."""
        return _entry(await self._call("stat", path, path=path))

    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> FsEntry:
        """Make a directory; with ``parents`` also its missing parents, and an existing
        directory is no error (``mkdir -p``)."""
        return _entry(await self._call("mkdir", path, path=path, parents=parents, mode=mode))

    async def move(self, source: str, target: str, *, overwrite: bool = False) -> FsEntry:
        """Rename ``source`` to ``target``; an existing ``target`` is replaced only with
        ``overwrite`` (a directory only by a directory, and only an empty one)."""
        fields = {"from": source, "to": target, "overwrite": overwrite}
        return _entry(await self._call("move", source, **fields))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, a symlink (never what it points to) or an empty directory; with
        ``recursive`` a directory and everything in it."""
        await self._call("remove", path, path=path, recursive=recursive)

    async def symlink(self, path: str, target: str) -> FsEntry:
        return _entry(await self._call("symlink", path, path=path, target=target))

    async def link(self, path: str, existing: str) -> FsEntry:
        """A hard link at ``path`` to the file ``existing``."""
        return _entry(await self._call("link", path, path=path, existing=existing))

    async def merge(self, source: str, target: str) -> None:
        """Move everything in directory ``source`` into directory ``target`` (files replace
        files, directories merge), then remove ``source``."""
        await self._call("merge", source, **{"from": source, "to": target})

    @contextlib.asynccontextmanager
    async def read(
        self, path: str, *, offset: int = 0, length: int | None = None, suffix: int | None = None
    ) -> AsyncIterator[Download]:
        """Open the regular file at ``path`` (symlinks followed) for reading: from ``offset``,
        ``length`` bytes (to the end when None), or its last ``suffix`` bytes. The range is
        clamped to the file's size at opening."""
        request = self._open(path, streams=True, granted=READ_WINDOW)
        try:
            payload = encode_request(
                "read", path=path, offset=offset, length=length, suffix=suffix, credit=READ_WINDOW
            )
            await self._frame(FrameKind.FS, request.channel, payload)
            yield Download(self, request, await self._reply(request))
        finally:
            await self._finish(request)

    @contextlib.asynccontextmanager
    async def walk(self, path: str, *, depth: int, max_entries: int) -> AsyncIterator[Walk]:
        """Walk the directory at ``path`` (symlinks to directories are not entered) down to
        ``depth`` levels, at most ``max_entries`` entries."""
        request = self._open(path, streams=True, granted=WALK_WINDOW)
        try:
            payload = encode_request(
                "list", path=path, depth=depth, max_entries=max_entries, credit=WALK_WINDOW
            )
            await self._frame(FrameKind.FS, request.channel, payload)
            yield Walk(self, request, await self._reply(request))
        finally:
            await self._finish(request)

    async def write(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        mtime: float | None = None,
        parents: bool = True,
    ) -> FsEntry:
        """Write ``chunks`` to ``path`` atomically: into a new file beside it, renamed over it
        once complete (a symlink at ``path`` is followed), so a reader sees the old file or the
        whole new one, and a failed or cancelled write leaves no file behind. Parents are
        made with ``parents``. The agent answers early when it fails (out of room): the rest of
        ``chunks`` is then not read.

        Frames go out :data:`FS_DATA_CHUNK` bytes of data at a time, the request with the first
        and the end with the last: a small file is one write to the agent."""
        request = self._open(path)
        mtime_ns = None if mtime is None else max(0, int(mtime * 1e9))
        opening = encode_request("write", path=path, mode=mode, mtime_ns=mtime_ns, parents=parents)
        queued: list[tuple[FrameKind, int, bytes]] = [(FrameKind.FS, request.channel, opening)]
        opened = committed = False
        written = 0
        try:
            pending = bytearray()
            async for chunk in chunks:
                if request.reply is not None or request.error is not None:
                    break  # failed early: the reply says why
                pending += chunk
                while len(pending) >= FS_DATA_CHUNK:
                    queued.append(
                        (FrameKind.FS_DATA, request.channel, bytes(pending[:FS_DATA_CHUNK]))
                    )
                    del pending[:FS_DATA_CHUNK]
                    written = await self._flush(queued, written)
                    opened = True
            if request.reply is None and request.error is None:
                if pending:
                    queued.append((FrameKind.FS_DATA, request.channel, bytes(pending)))
                queued.append((FrameKind.FS_END, request.channel, b""))
                await self._flush(queued, written)
                opened = committed = True
            return _entry(await self._reply(request))
        finally:
            forgotten = self._requests.pop(request.channel, None) is not None
            unanswered = request.reply is None and request.error is None
            if forgotten and opened and not committed and unanswered:
                await self._tell_end(request.channel, _ABORT)

    async def _flush(self, queued: list[tuple[FrameKind, int, bytes]], written: int) -> int:
        """Send the queued frames of a write in one go, after the room check for their data;
        the bytes written in all."""
        data = sum(len(payload) for kind, _, payload in queued if kind == FrameKind.FS_DATA)
        if self._write_guard is not None and data:
            self._write_guard(data)
        frames = list(queued)
        queued.clear()
        await self._send(lambda ch: ch.send_frames(frames))
        return written + data

    async def watch(
        self, path: str, *, recursive: bool, on_events: Callable[[list[FsEvent]], None]
    ) -> Watch:
        """Watch ``path`` (and, with ``recursive``, every directory under it, made later
        included): ``on_events`` gets each batch the agent sends, from the task that reads the
        agent, so it must not block."""
        request = self._open(path)
        request.on_events = on_events
        try:
            payload = encode_request("watch", path=path, recursive=recursive)
            await self._frame(FrameKind.FS, request.channel, payload)
            reply = await self._reply(request)
        except BaseException:
            await self._finish(request)
            raise
        return Watch(self, request, _entry(reply))


def _entry(reply: FsReply) -> FsEntry:
    if reply.entry is None:
        raise AgentProtocolError("FS_REPLY without the entry it owes")
    return reply.entry
