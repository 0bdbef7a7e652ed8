"""The sandbox actor's state, and what every part of the actor builds on.

The actor is one object whose class is built in layers, one module each, every layer using only
the ones below it: this core (the state, reads, the mailbox's entry, sending to the agent,
finishing an exec, teardown), ``recovery`` (progress records for crash recovery, take-over),
``dispatch`` (agent frames into execs and the event log, the exec life cycle), ``snapshot``, and
``actor`` (boot, the mailbox loop, the lifetime timer and the public operations). The layers
are parts of one object, not collaborators: no part holds state of its own, and the actor's state
changes only through its own methods.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

from sandstorm.actors.events import EventLog
from sandstorm.actors.execs import ExecTracker
from sandstorm.actors.recorder import Recorder
from sandstorm.actors.sandbox.params import SandboxParams
from sandstorm.agent import AgentChannel, ExitInfo
from sandstorm.agent.files import AgentFiles, Watch
from sandstorm.api.timestamps import rfc3339, rfc3339_from_epoch
from sandstorm.api.types import (
    ExitEvent,
    Failure,
    Limits,
    SandboxState,
    SandboxStatus,
    StatusEvent,
    Usage,
    Verdict,
)
from sandstorm.config import Config
from sandstorm.errors import AtCapacity, GatewayError, InsufficientStorage, SandboxNotRunning
from sandstorm.metrics import Metrics
from sandstorm.runtimes.base import RuntimeInstance, SandboxRuntime
from sandstorm.store.snapshots import SnapshotCatalog

log = logging.getLogger(__package__)  # one logger for every part of the actor
T = TypeVar("T")

MAILBOX_SIZE = 64
MAX_EXEC_HISTORY = 100
STOP_GRACE_S = 0.5
# How long a send to the agent may take; an agent that stops reading its channel fails its
# sandbox (code in the sandbox runs as the agent's user and can stop it).
AGENT_SEND_TIMEOUT_S = 10.0
# Memory an upload leaves free in a sandbox whose files live in its memory: what may be on its
# way to the agent and not yet written (the shim holds up to 16 MiB, the pipe 256 KiB), and a
# margin.
UPLOAD_HEADROOM = 32 * 1024 * 1024
# How long a reading of a sandbox's memory use serves the room check of uploads.
ROOM_READING_S = 0.25
# How far past its last progress record a gateway that takes a sandbox over numbers its
# channels: beyond any the crashed gateway could have used (the journal it replays may still
# hold their frames).
CHANNELS_AFTER_TAKE_OVER = 1 << 20


class ActorCore:
    def __init__(
        self,
        params: SandboxParams,
        runtime: SandboxRuntime,
        config: Config,
        catalog: SnapshotCatalog,
        on_startup: Callable[[float], None] | None = None,
        *,
        metrics: Metrics | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.params = params
        # Carries state changes and finished execs to the store (None: not recorded).
        self.recorder = recorder
        self.metrics = metrics or Metrics(process=False)
        # Set by detach(): the actor ends without tearing the sandbox down (on_shutdown "keep").
        self._detached = False
        self.id = params.sandbox_id
        self.runtime = runtime
        self.config = config
        self.catalog = catalog
        self._on_startup = on_startup
        self.state: SandboxState = "creating"
        self.failure: Failure | None = None
        self.created_at = time.time()
        self.last_active = time.time()
        self.events = EventLog(config.replay_buffer_bytes)
        self.execs: OrderedDict[str, ExecTracker] = OrderedDict()
        self._by_channel: dict[int, ExecTracker] = {}
        self._next_channel = params.first_channel
        self._instance: RuntimeInstance | None = None
        self._nursery: trio.Nursery | None = None
        self._mailbox_send, self._mailbox = trio.open_memory_channel[
            tuple[Callable[[], Awaitable[Any]], trio.MemorySendChannel[outcome.Outcome[Any]]]
        ](MAILBOX_SIZE)
        self._activity = trio.Event()
        self._expect_eof = False
        self._incarnation_done = trio.Event()
        self._file_waiters: dict[int, trio.MemorySendChannel[tuple[bool, str | None]]] = {}
        self.finished = trio.Event()
        # Whether the runtime instance came up and its agent answered.
        self.booted = False
        # The exec of the request that created the sandbox (None: made without one).
        self.first_exec: ExecTracker | None = None
        self.ended_at: float | None = None  # trio clock, when the teardown finished
        # The creating request holds the sandbox until its first exec is in, so that keep_alive
        # (0 included) only ever counts idle time after real work.
        self._held = True
        self.open_streams = 0
        # The mailbox operation in progress: its cancel scope and its reply channel.
        self._op_scope: trio.CancelScope | None = None
        self._op_is_teardown = False
        self._inflight: trio.MemorySendChannel[outcome.Outcome[Any]] | None = None
        # Set while the agent channel is live (cleared across a snapshot's checkpoint/restore).
        self._live = trio.Event()
        self._failure_logged = 0
        # PONG payload -> who waits for it (a probe, a quiesce before a snapshot).
        self._pongs: dict[bytes, trio.Event] = {}
        # Crash recovery (runtimes whose instance is held by a shim): what the last progress
        # record holds, as (agent-stream offset, event seq, next channel).
        self._progress_lock = trio.Lock()
        self._progress_wanted = trio.Event()
        self._recorded: tuple[int, int, int] = (-1, -1, -1)
        # Bytes of each running exec's kept stdout and stderr already in the store.
        self._recorded_output: dict[str, tuple[int, int]] = {}
        # File requests to the agent, on channels of their own (see ``files``); the number in
        # progress holds the sandbox busy; the stream clients' watches by id (None: starting).
        self.files = AgentFiles(self._to_agent, self._take_channel, write_guard=self._check_room)
        self._file_requests = 0
        # The room check's last reading: (monotonic time, bytes in use, bytes sent since).
        self._room_reading: tuple[float, int, int] = (-1e9, 0, 0)
        self._watches: dict[str, Watch | None] = {}

    # ------------------------------------------------------------------ reads (any task)

    @property
    def alive(self) -> bool:
        return self.state in ("running", "idle", "snapshotting", "creating")

    def expires_at(self) -> float | None:
        if not self.alive:
            return None
        return min(
            self.last_active + self.params.keep_alive_s,
            self.created_at + self.config.max_lifetime_s,
        )

    def status(self) -> SandboxStatus:
        usage = self.runtime.usage(self.id) if self.alive else None
        expires = self.expires_at()
        return SandboxStatus(
            id=self.id,
            state=self.state,
            runtime=self.params.runtime_name,
            isolation_level=self.params.isolation_level,
            created_at=rfc3339_from_epoch(self.created_at),
            last_active_at=rfc3339_from_epoch(self.last_active),
            expires_at=rfc3339_from_epoch(expires) if expires is not None else None,
            limits=Limits(
                cpu_limit=self.params.spec.cpu_limit,
                memory_limit=self.params.spec.memory_limit,
                timeout=self.params.timeout_ms,
            ),
            usage=Usage(
                memory_bytes=usage.memory_bytes if usage else 0,
                cpu_time_ms=round(usage.cpu_time_ms, 3) if usage else 0.0,
            ),
            execs=[e.summary() for e in self.execs.values()],
            restored_from=self.params.restored_from,
            failure=self.failure,
            last_event_seq=self.events.last_seq,
        )

    def retained_bytes(self) -> int:
        """Memory this actor still holds once ended: replay buffer and exec results."""
        return int(self.events.statistics()["bytes"]) + sum(
            e.retained_bytes() for e in self.execs.values()
        )

    # ------------------------------------------------------------------ the mailbox's entry

    async def _call(self, op: Callable[[], Awaitable[T]], *, wait_for_room: bool = False) -> T:
        """Run ``op`` in the actor, after what is already queued. A full mailbox refuses new
        work (503), except for teardown, which waits its turn (``wait_for_room``)."""
        reply_send, reply_recv = trio.open_memory_channel[outcome.Outcome[T]](1)
        try:
            if wait_for_room:
                await self._mailbox_send.send((op, reply_send))
            else:
                self._mailbox_send.send_nowait((op, reply_send))
        except trio.WouldBlock:
            raise AtCapacity(f"sandbox {self.id} has too many pending requests") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SandboxNotRunning(
                f"sandbox {self.id} is {self.state}", state=self.state
            ) from None
        result = await reply_recv.receive()
        return result.unwrap()

    async def _request_teardown(
        self, final: SandboxState, reason: str | None, *, note: str | None = None
    ) -> list[str]:
        """Queue a teardown ahead of nothing: whatever operation is running is interrupted
        (a hostile sandbox can make an operation hang), then the teardown runs."""
        if self._op_scope is not None and not self._op_is_teardown:
            self._op_scope.cancel()
        return await self._call(self._teardown_op(final, reason, note), wait_for_room=True)

    def _teardown_op(
        self, final: SandboxState, reason: str | None, note: str | None
    ) -> Callable[[], Awaitable[list[str]]]:
        """A teardown as a mailbox operation: no teardown request interrupts it."""

        async def teardown() -> list[str]:
            self._op_is_teardown = True
            try:
                return await self._teardown(final, reason, note=note)
            finally:
                self._op_is_teardown = False

        return teardown

    # ------------------------------------------------------------------ the agent

    async def _to_agent(self, send: Callable[[AgentChannel], Awaitable[None]]) -> None:
        """Send to the agent with a deadline. A dead channel is SandboxNotRunning; an agent that
        stops reading fails the sandbox."""
        instance = self._instance
        if instance is None or not self.alive:
            raise SandboxNotRunning(f"sandbox {self.id} is {self.state}", state=self.state)
        with trio.move_on_after(AGENT_SEND_TIMEOUT_S) as scope:
            try:
                await send(instance.channel)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise SandboxNotRunning(f"sandbox {self.id} lost its agent") from None
        if scope.cancelled_caught:
            self._fail_soon(f"the agent took nothing for {AGENT_SEND_TIMEOUT_S:.0f}s")
            raise SandboxNotRunning(f"sandbox {self.id} stopped responding")

    def _check_room(self, nbytes: int) -> None:
        """Before ``nbytes`` more of a file are sent into the sandbox: refuse them when its
        filesystem lives in its memory (``files_in_host_memory``) and they could take the
        memory it has left. A full filesystem there would end the sandbox; refused, the write
        fails with 507 and the sandbox goes on. A reading of the memory in use serves until
        what was sent since could bring it near the limit, or for :data:`ROOM_READING_S` (the
        sandbox's own code uses memory too); reading the cgroup costs more than a small
        file's write."""
        if not self.runtime.files_in_host_memory:
            return
        limit = self.params.spec.memory_limit
        now = time.monotonic()
        read_at, used, sent = self._room_reading
        sent += nbytes
        if now - read_at > ROOM_READING_S or used + sent + UPLOAD_HEADROOM > limit:
            read_at, used, sent = now, self.runtime.usage(self.id).memory_bytes, nbytes
        self._room_reading = (read_at, used, sent)
        if used + sent + UPLOAD_HEADROOM > limit:
            raise InsufficientStorage(
                f"sandbox {self.id} has no room left: its files live in its memory, which is"
                f" {used} of {limit} bytes (memory_limit) in use",
                memory_limit=limit,
            )

    def _take_channel(self) -> int:
        """A channel number the agent has never seen (execs and file requests share them).

        File requests record no progress of their own, so a gateway that takes the sandbox
        over after a crash starts :data:`CHANNELS_AFTER_TAKE_OVER` past the last record; one is
        asked for well before that many are used."""
        number = self._next_channel
        self._next_channel += 1
        if number - self._recorded[2] >= CHANNELS_AFTER_TAKE_OVER // 2:
            self._progress_wanted.set()
        return number

    def _fail_soon(self, reason: str) -> None:
        if self._nursery is not None:
            self.metrics.agent_failed("unresponsive")
            self._nursery.start_soon(self._post_failure, reason, "killed")

    async def _post_failure(self, reason: str, verdict: str) -> None:
        for tracker in list(self._by_channel.values()):
            if tracker.running:
                tracker.kill_verdict = (
                    "oom" if verdict == "oom" else (tracker.kill_verdict or "killed")
                )
        with contextlib.suppress(GatewayError):
            await self._request_teardown("failed", reason)

    # ------------------------------------------------------------------ execs and state

    def _remember(self, tracker: ExecTracker) -> None:
        self.execs[tracker.exec_id] = tracker
        self._by_channel[tracker.channel] = tracker
        while len(self.execs) > MAX_EXEC_HISTORY:
            oldest = next(iter(self.execs.values()))
            if oldest.running:
                break
            self.execs.popitem(last=False)

    def _finish(self, tracker: ExecTracker, info: ExitInfo | None) -> None:
        if tracker.running:
            verdict: Verdict | None = None
            failed = info is not None and (info.signal is not None or info.exit_code != 0)
            if (
                failed
                and tracker.kill_verdict is None
                and self.runtime.exec_ran_out_of_memory(self.id)
            ):
                verdict = "oom"  # the sandbox reached memory_limit: allocations failed
            self.metrics.exec_finished(
                self.params.runtime_name, tracker.finish(info, verdict=verdict)
            )
        result = tracker.finish(info)
        self._by_channel.pop(tracker.channel, None)
        if self.recorder is not None:
            self.recorder.exec_finished(self.id, self.params.tenant, tracker.started_at, result)
        self.events.append(
            lambda seq, ts: ExitEvent(seq=seq, ts=ts, exec_id=tracker.exec_id, result=result)
        )
        self._touch()
        if self.state == "running" and not self._by_channel:
            self.state = "idle"
            self._emit_status()

    def _touch(self) -> None:
        self.last_active = time.time()
        self._activity.set()

    def _emit_status(self) -> None:
        state = self.state
        self.events.append(lambda seq, ts: StatusEvent(seq=seq, ts=ts, state=state))
        self._record_state(None)

    def _record_state(self, reason: str | None) -> None:
        if self.recorder is not None:
            self.recorder.sandbox_state(self.id, self.state, reason, self.events.last_seq)

    # ------------------------------------------------------------------ teardown

    async def _teardown(
        self, final: SandboxState, reason: str | None, *, note: str | None = None
    ) -> list[str]:
        """Stop everything and free every resource. Shielded: it always runs to the end."""
        if self.state in ("destroyed", "failed"):
            return []
        released: list[str] = []
        self.files.fail_all(SandboxNotRunning(f"sandbox {self.id} has ended", state=final))
        self._watches.clear()
        with trio.CancelScope(shield=True):
            self.state = "stopping"
            self._emit_status()
            instance = self._instance
            if instance is not None:
                # Ask first: the agent kills its process groups and exits on EOF.
                with trio.move_on_after(STOP_GRACE_S):
                    await instance.channel.aclose()
                    await instance.wait()
            oom = final == "failed" and self.runtime.out_of_memory(self.id)
            for tracker in list(self._by_channel.values()):
                if tracker.running and tracker.kill_verdict is None:
                    tracker.kill_verdict = "oom" if oom else "killed"
                self._finish(tracker, None)
            released += await self._release_runtime()
            await self._reap_instance()
            self.state = final
            if reason is not None:
                self.failure = Failure(reason=reason, at=rfc3339())
            self.events.append(
                lambda seq, ts: StatusEvent(seq=seq, ts=ts, state=final, reason=reason or note)
            )
            self.events.close()
            self._record_state(reason)
            self.ended_at = trio.current_time()
        return released

    async def _reap_instance(self) -> None:
        """Make sure the runtime's host process is gone and reaped (shielded by callers)."""
        instance = self._instance
        if instance is None:
            return
        with trio.move_on_after(5):
            await instance.wait()
        if not instance.exited:
            instance.kill()
            await instance.wait()

    async def _release_runtime(self) -> list[str]:
        try:
            return await self.runtime.destroy(self.id)
        except Exception:
            log.exception("sandbox %s: teardown failed; the reaper will retry", self.id)
            return []
