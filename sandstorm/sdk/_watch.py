"""Watching a sandbox's files: a stream of its own that carries one ``watch`` and its ``fs``
events."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import ConnectionClosed

from sandstorm.api.types import ErrorEvent, FsEvent, WatchAcceptedEvent
from sandstorm.sdk._http import SandstormError
from sandstorm.sdk._stream import CLOSE_TIMEOUT_S, MAX_FRAME_BYTES, Stream, open_stream

#: ``since`` past any real seq: the stream replays nothing and carries only live events.
LIVE_ONLY = 10**15
#: The HTTP status each error code of a stream frame stands for (as on REST); others are 400.
FRAME_ERROR_STATUS = {
    "not_found": 404,
    "file_not_found": 404,
    "permission_denied": 403,
    "wrong_file_type": 409,
    "sandbox_not_running": 409,
    "at_capacity": 503,
    "runtime_unavailable": 503,
    "internal": 500,
}


def frame_error(event: ErrorEvent) -> SandstormError:
    status = FRAME_ERROR_STATUS.get(event.code, 400)
    return SandstormError(status, event.code, event.message, {})


class FsEvents:
    """The ``fs`` events of one watch, in order (``overflow`` on the watched path says changes
    were lost); ends when the stream closes (the sandbox ended)."""

    def __init__(self, stream: Stream, watch_id: str) -> None:
        self.stream = stream
        self.watch_id = watch_id

    def __aiter__(self) -> FsEvents:
        return self

    async def __anext__(self) -> FsEvent:
        async for frame in self.stream:
            if isinstance(frame, FsEvent) and frame.watch == self.watch_id:
                return frame
            if isinstance(frame, ErrorEvent) and frame.id in (self.watch_id, None):
                raise frame_error(frame)
        raise StopAsyncIteration


async def _accepted(stream: Stream, watch_id: str) -> None:
    """Wait for the gateway's ``watch_accepted`` (the watch is in place from then on)."""
    async for frame in stream:
        if isinstance(frame, WatchAcceptedEvent) and frame.id == watch_id:
            return
        if isinstance(frame, ErrorEvent) and frame.id in (watch_id, None):
            raise frame_error(frame)
    raise SandstormError(502, "stream_closed", "the stream closed before the watch began", {})


@asynccontextmanager
async def watch_events(
    url: str, api_key: str | None, sandbox_id: str, path: str, *, recursive: bool
) -> AsyncIterator[FsEvents]:
    """Open a stream on the sandbox, watch ``path`` on it, and hand over its events once the
    watch is in place (changes made after entering are seen); on leaving, send ``unwatch``
    and close the stream. A path that cannot be watched raises :class:`SandstormError`."""
    async with open_stream(
        url, api_key, sandbox_id, LIVE_ONLY, message_queue_size=64, max_message_size=MAX_FRAME_BYTES
    ) as stream:
        watch_id = f"w{uuid.uuid4().hex}"
        await stream.watch(watch_id, path, recursive=recursive)
        await _accepted(stream, watch_id)
        try:
            yield FsEvents(stream, watch_id)
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(CLOSE_TIMEOUT_S),
                contextlib.suppress(ConnectionClosed, trio.ClosedResourceError),
            ):
                await stream.unwatch(watch_id)
