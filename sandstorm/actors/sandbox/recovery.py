"""Crash recovery: the actor's progress records, and the take-over of a sandbox that outlived
its gateway.

A sandbox whose instance is held by a shim survives the gateway. While it runs, its actor
records its progress in the store — its own state, the output its running execs kept, the event
seq and the agent-stream offset — and then lets the shim drop the journal before that offset. A
restarted gateway rebuilds the actor from the last progress record and the shim replays the
journal after it, so the actor ends up where the old one was.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import trio

from sandstorm.actors.events import EventLog
from sandstorm.actors.execs import ExecTracker, OutputBuffer
from sandstorm.actors.sandbox.core import (
    AGENT_SEND_TIMEOUT_S,
    CHANNELS_AFTER_TAKE_OVER,
    ActorCore,
    log,
)
from sandstorm.api.timestamps import rfc3339
from sandstorm.api.types import ExecResult
from sandstorm.runtimes.base import JournaledChannel
from sandstorm.store import (
    AsyncStore,
    ExecRecordRow,
    ProgressExec,
    RunningExecState,
    SandboxProgress,
    SandboxRecord,
    Store,
)

# How often a busy sandbox records its progress (and lets its shim drop the journal before
# it), and after how many unrecorded bytes of the agent stream it does so at once.
PROGRESS_INTERVAL_S = 1.0
PROGRESS_BYTES = 8 * 1024 * 1024
# How long a shutdown that keeps its sandboxes gives each one to record its progress and let go.
HAND_OVER_S = 5.0


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a restarted gateway knows of a sandbox it takes over: its record (with the last
    progress record), its stored execs, and the output its running execs had then."""

    record: SandboxRecord
    execs: list[ExecRecordRow]
    output: dict[str, tuple[bytes, bytes]]


async def load_recovered(store: AsyncStore | None, record: SandboxRecord) -> Recovered:
    """Read from the store what taking ``record``'s sandbox over needs."""
    execs = await store.call(Store.list_execs, record.id) if store is not None else []
    output: dict[str, tuple[bytes, bytes]] = {}
    if store is not None:
        for row in execs:
            if row.state == "running":
                output[row.id] = await store.call(Store.exec_output, row.id)
    return Recovered(record, execs, output)


class RecoveryRecords(ActorCore):
    def _durable_channel(self) -> JournaledChannel | None:
        """The channel progress is recorded against: only a shim keeps the sandbox (and a
        journal of its output) across a gateway crash, and only a recorded sandbox can be taken
        over. Its acks then follow progress records (never ``auto_ack``), so the shim keeps
        every byte written after the last one."""
        instance = self._instance
        if self.recorder is None or instance is None or not self._live.is_set():
            return None
        channel = instance.journaled
        if channel is None:
            return None
        channel.auto_ack = False
        return channel

    def _progress_due(self, offset: int) -> None:
        """The agent stream reached ``offset``: record progress at once when that is
        :data:`PROGRESS_BYTES` past the last record."""
        if offset - self._recorded[0] >= PROGRESS_BYTES:
            self._progress_wanted.set()

    def _progress_covers(self, tracker: ExecTracker) -> bool:
        """Whether a progress record taken since ``tracker``'s exec started holds its row (the
        record upserts every running exec)."""
        return tracker.channel < self._recorded[2]

    async def _record_progress(self) -> None:
        """Save what a restarted gateway needs to go on from here — the actor's state, the
        output running execs wrote since the last record (raw bytes), the event seq and the
        agent-stream offset — then let the shim drop the journal before that offset.

        The state is read in one go with no await in between, so it matches the offset
        exactly; frames after the offset are replayed on top of it after a crash."""
        channel = self._durable_channel()
        recorder = self.recorder
        if channel is None or recorder is None:
            return
        async with self._progress_lock:
            offset, seq = channel.offset, self.events.last_seq
            key = (offset, seq, self._next_channel)
            if key == self._recorded:
                return
            running = [tracker for tracker in self._by_channel.values() if tracker.running]
            now_epoch, now_mono = time.time(), time.monotonic()
            progress = SandboxProgress(
                event_seq=seq,
                next_channel=self._next_channel,
                last_active=self.last_active,
                execs=[
                    RunningExecState(
                        id=tracker.exec_id,
                        channel=tracker.channel,
                        timeout_s=tracker.timeout_s,
                        started_epoch=now_epoch - (now_mono - tracker.started_mono),
                        stdout_total=tracker.stdout.total,
                        stderr_total=tracker.stderr.total,
                        kill_verdict=tracker.kill_verdict,
                        stdin_closed=tracker.stdin_closed,
                    )
                    for tracker in running
                ],
            )
            # Only what was kept since the last record (kept output only grows, to the cap).
            output: list[tuple[str, int, bytes]] = []
            recorded_output: dict[str, tuple[int, int]] = {}
            for tracker in running:
                out, err = self._recorded_output.get(tracker.exec_id, (0, 0))
                output.append((tracker.exec_id, 1, bytes(tracker.stdout.kept[out:])))
                output.append((tracker.exec_id, 2, bytes(tracker.stderr.kept[err:])))
                recorded_output[tracker.exec_id] = (
                    len(tracker.stdout.kept),
                    len(tracker.stderr.kept),
                )
            rows = [ProgressExec(id=r.exec_id, started_at=r.started_at) for r in running]
            # Finished execs and states reported so far go first (the store's one worker thread
            # runs writes in order): the ack below lets the shim drop the frames they came from.
            await recorder.write_pending()
            try:
                await recorder.store.call(
                    Store.save_progress, self.id, seq, offset, rows, progress, output
                )
            except Exception:
                log.exception("sandbox %s: could not save its progress", self.id)
                return
            self._recorded_output = recorded_output
            self._recorded = key
            if not recorder.healthy:
                return  # a report before this record is not written: keep the journal
            with (
                trio.move_on_after(AGENT_SEND_TIMEOUT_S),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await channel.send_ack(offset)

    async def _record_progress_forever(self) -> None:
        while self.alive:
            with trio.move_on_after(PROGRESS_INTERVAL_S):
                await self._progress_wanted.wait()
            self._progress_wanted = trio.Event()
            await self._record_progress()

    async def _hand_over(self) -> None:
        """Gateway shutdown with sandboxes kept: record progress, then let go of the sandbox
        without stopping it; the next gateway takes it over from that record. Bounded: a shim
        that stopped reading must not hold the shutdown up."""
        with trio.move_on_after(HAND_OVER_S):
            await self._record_progress()
        instance = self._instance
        if instance is not None:
            with trio.move_on_after(HAND_OVER_S):
                await instance.detach()

    def _take_over(self, recovered: Recovered) -> None:
        """Rebuild this actor from the last progress record of a gateway that died."""
        record = recovered.record
        progress = record.progress or SandboxProgress(
            event_seq=record.last_event_seq,
            next_channel=self.params.first_channel,
            last_active=record.created_at,
        )
        self.created_at = record.created_at
        self.last_active = progress.last_active
        self._held = False  # the request that created it is gone with the old gateway
        self._next_channel = progress.next_channel + CHANNELS_AFTER_TAKE_OVER
        self.events = EventLog(self.config.replay_buffer_bytes, last_seq=progress.event_seq)
        rows = {row.id: row for row in recovered.execs}
        for row in recovered.execs:
            if row.state == "finished" and row.result is not None:
                self.execs[row.id] = _finished_tracker(row.id, row.started_at, row.result)
        cap = self.config.result_output_cap
        now_epoch, now_mono = time.time(), time.monotonic()
        for state in progress.execs:
            stored = rows.get(state.id)
            if stored is not None and stored.state == "finished":
                continue  # its exit was stored after the progress record; replay skips it
            tracker = ExecTracker(
                exec_id=state.id,
                channel=state.channel,
                argv=[],  # never stored (it can hold secrets); the result does not need it
                timeout_s=state.timeout_s,
                stdout=OutputBuffer(cap),
                stderr=OutputBuffer(cap),
                started_at=stored.started_at if stored is not None else rfc3339(),
                started_mono=now_mono - (now_epoch - state.started_epoch),
                kill_verdict=state.kill_verdict,  # type: ignore[arg-type]
                stdin_closed=state.stdin_closed,
            )
            out, err = recovered.output.get(state.id, (b"", b""))
            tracker.stdout.restore(out, state.stdout_total)
            tracker.stderr.restore(err, state.stderr_total)
            self._recorded_output[tracker.exec_id] = (
                len(tracker.stdout.kept),
                len(tracker.stderr.kept),
            )
            self._remember(tracker)
        watched = {state.id for state in progress.execs}
        for row in recovered.execs:
            if row.state == "running" and row.id not in watched and self.recorder is not None:
                # Started but in no progress record with its channel: nothing can finish it now.
                lost = _finished_tracker(row.id, row.started_at, None).finish(
                    None, verdict="killed"
                )
                self.recorder.exec_finished(self.id, self.params.tenant, row.started_at, lost)
        self._recorded = (record.agent_offset, progress.event_seq, self._next_channel)


def _finished_tracker(exec_id: str, started_at: str, result: ExecResult | None) -> ExecTracker:
    """An exec for history only (a restarted gateway's view of a finished exec)."""
    tracker = ExecTracker(
        exec_id=exec_id,
        channel=0,
        argv=[],
        timeout_s=0.0,
        stdout=OutputBuffer(0),
        stderr=OutputBuffer(0),
        started_at=started_at,
    )
    if result is not None:
        tracker.result = result
        tracker.done.set()
    return tracker
