"""The sandbox's files (SPEC §8): access for the file routes while the sandbox is up, and the
watches stream clients make, whose changes go into the event log as ``fs`` events.

A file request is activity: it holds the sandbox busy while it runs (keep_alive counts idle
time only from its end), and it is refused while the sandbox is not up (a snapshot, the
teardown), as an exec is.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import partial

from sandstorm.actors.sandbox.dispatch import AgentDispatch
from sandstorm.agent.files import AgentFiles
from sandstorm.agent.fs_wire import FsEntry, FsEvent
from sandstorm.api.types import FsEvent as FsStreamEvent
from sandstorm.errors import InvalidRequest, NotFound, SandboxNotRunning

#: Watches one sandbox may have at once (each is an inotify instance in the agent).
MAX_WATCHES = 16


class FileAccess(AgentDispatch):
    def _check_up(self) -> None:
        if self.state not in ("idle", "running") or self._instance is None:
            raise SandboxNotRunning(f"sandbox {self.id} is {self.state}", state=self.state)

    @contextlib.asynccontextmanager
    async def file_access(self) -> AsyncIterator[AgentFiles]:
        """The sandbox's files for the length of the block, which counts as activity.

        Raises :class:`SandboxNotRunning` unless the sandbox is up. Requests made in the block
        fail with it when the sandbox ends or is snapshotted meanwhile."""
        self._check_up()
        self._file_requests += 1
        self._touch()
        try:
            yield self.files
        finally:
            self._file_requests -= 1
            self._touch()

    async def watch(self, watch_id: str, path: str, *, recursive: bool) -> FsEntry:
        """Start watch ``watch_id`` on ``path``; its changes become ``fs`` events in the log.

        Raises :class:`InvalidRequest` for an id the sandbox already has in use or past
        :data:`MAX_WATCHES`, or the file errors of the agent (the path is missing or not a
        directory)."""
        self._check_up()
        if watch_id in self._watches:
            raise InvalidRequest(f"watch {watch_id!r} is already in use", field="id")
        if len(self._watches) >= MAX_WATCHES:
            raise InvalidRequest(f"a sandbox has at most {MAX_WATCHES} watches", field="id")

        def publish(events: list[FsEvent]) -> None:
            for event in events:
                self.events.append(partial(_stream_event, watch_id, event))

        # Reserved first: a second watch with this id while the agent answers is refused.
        self._watches[watch_id] = None
        try:
            watch = await self.files.watch(path, recursive=recursive, on_events=publish)
        except BaseException:
            self._watches.pop(watch_id, None)
            raise
        self._watches[watch_id] = watch
        return watch.entry

    async def unwatch(self, watch_id: str) -> None:
        """Stop watch ``watch_id`` (shielded and bounded: safe in cleanup). Raises
        :class:`NotFound` for an id not in use."""
        if watch_id not in self._watches:
            raise NotFound(f"no watch {watch_id!r} in {self.id}", id=watch_id)
        watch = self._watches.pop(watch_id)
        if watch is not None:
            await watch.aclose()


def _stream_event(watch_id: str, event: FsEvent, seq: int, ts: str) -> FsStreamEvent:
    return FsStreamEvent(seq=seq, ts=ts, watch=watch_id, op=event.op, path=event.path, to=event.to)
