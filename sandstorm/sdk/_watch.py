"""Watching a sandbox's files: a stream of its own that carries one ``watch`` and its ``fs``
events."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from sandstorm.api.types import ErrorEvent
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
    """The ``fs`` events of one watch, in order; ends when the stream closes (the sandbox
    ended). An ``error`` frame (the path is missing, say) raises :class:`SandstormError`."""

    def __init__(self, stream: Stream, watch_id: str) -> None:
        self.stream = stream
        self.watch_id = watch_id

    def __aiter__(self) -> FsEvents:
        return self

    async def __anext__(self) -> Any:
        async for frame in self.stream:
            if isinstance(frame, ErrorEvent):
                raise frame_error(frame)
            if is_fs_event(frame, self.watch_id):
                return frame
        raise StopAsyncIteration


def is_fs_event(frame: Any, watch_id: str) -> bool:
    if isinstance(frame, dict):
        return frame.get("type") == "fs" and frame.get("watch") == watch_id
    return getattr(frame, "watch", None) == watch_id


@asynccontextmanager
async def watch_events(
    url: str, api_key: str | None, sandbox_id: str, path: str, *, recursive: bool
) -> AsyncIterator[FsEvents]:
    """Open a stream on the sandbox, watch ``path`` on it, and hand over its events; on leaving,
    send ``unwatch`` and close the stream."""
    async with open_stream(
        url, api_key, sandbox_id, LIVE_ONLY, message_queue_size=64, max_message_size=MAX_FRAME_BYTES
    ) as stream:
        watch_id = f"w{uuid.uuid4().hex}"
        await stream.watch(watch_id, path, recursive=recursive)
        try:
            yield FsEvents(stream, watch_id)
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(CLOSE_TIMEOUT_S),
                contextlib.suppress(ConnectionClosed, trio.ClosedResourceError),
            ):
                await stream.unwatch(watch_id)
