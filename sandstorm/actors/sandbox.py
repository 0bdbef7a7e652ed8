"""The sandbox actor: owns ONE runtime instance, the agent connection and the event log.

Tasks in its nursery: the agent reader (frames → exec records and the event log), one watchdog per
running exec (timeout), the lifetime timer (keep_alive / max_lifetime) and the mailbox loop. Every
state change goes through the mailbox, one operation at a time, so exec, snapshot and destroy never
interleave; reads (status, results) look at the state directly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from sandstorm.actors.events import EventLog
from sandstorm.actors.execs import ExecRecord, OutputBuffer
from sandstorm.actors.recorder import Recorder
from sandstorm.agent import (
    WRITE_FILE_CHUNK,
    AgentChannel,
    AgentProtocolError,
    ExitInfo,
    FrameKind,
    decode_error,
    decode_exit,
    decode_file_written,
    decode_started,
)
from sandstorm.api.timestamps import rfc3339, rfc3339_from_epoch
from sandstorm.api.types import (
    ExecResult,
    ExecStartedEvent,
    ExitEvent,
    Failure,
    IsolationLevel,
    Limits,
    RuntimeName,
    SandboxState,
    SandboxStatus,
    SelectionReason,
    StatusEvent,
    Usage,
    Verdict,
)
from sandstorm.config import Config
from sandstorm.errors import (
    AtCapacity,
    ExecNotRunning,
    GatewayError,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RuntimeUnavailable,
    SandboxNotRunning,
    SnapshotUnsupported,
)
from sandstorm.ids import new_id
from sandstorm.logs import bind_sandbox
from sandstorm.metrics import Metrics
from sandstorm.runtimes.base import (
    JournaledChannel,
    RuntimeInstance,
    RuntimeStartError,
    SandboxRuntime,
    SandboxSpec,
)
from sandstorm.store import (
    ExecRecordRow,
    ProgressExec,
    RunningExecState,
    SandboxProgress,
    SandboxRecord,
    Store,
)
from sandstorm.store.snapshots import SnapshotCatalog, SnapshotMeta, SnapshotMount

log = logging.getLogger(__name__)
T = TypeVar("T")

MAILBOX_SIZE = 64
MAX_EXEC_HISTORY = 100
# After a kill, how long the agent gets to report the exit before the gateway gives up on it.
KILL_GRACE_S = 1.0
STOP_GRACE_S = 0.5
# How long a send to the agent may take; an agent that stops reading its channel fails its
# sandbox (code in the sandbox runs as the agent's user and can stop it).
AGENT_SEND_TIMEOUT_S = 10.0
# How long the agent gets to answer a PING when it failed to report a killed process.
PROBE_TIMEOUT_S = 3.0
# After a checkpoint, how long the old runtime process gets to deliver its last frames and exit.
CHECKPOINT_DRAIN_S = 10.0
QUIESCE_TIMEOUT_S = 1.0  # the agent's answer to QUIESCE before a checkpoint
# Crash recovery: how often a busy sandbox checkpoints its state (and lets its shim drop the
# journal before it), and after how many unacknowledged bytes it does so at once.
PROGRESS_INTERVAL_S = 1.0
PROGRESS_BYTES = 8 * 1024 * 1024
# How long a shutdown that keeps its sandboxes gives each one to checkpoint and let go.
HAND_OVER_S = 5.0
# Agent messages logged per sandbox; the rest are counted, so a sandbox cannot flood the log.
MAX_LOGGED_AGENT_ERRORS = 5
SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
SIGNALS = {name: int(getattr(signal, name)) for name in SIGNAL_NAMES}


@dataclass(frozen=True, slots=True)
class SandboxParams:
    sandbox_id: str
    runtime_name: RuntimeName
    isolation_level: IsolationLevel
    selection: SelectionReason
    spec: SandboxSpec
    image: str
    timeout_ms: int
    keep_alive_s: int
    restored_from: str | None = None
    first_channel: int = 1
    tenant: str = "default"


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a restarted gateway knows of a sandbox it takes over: its record (with the last
    checkpoint), its stored execs, and the output its running execs had at the checkpoint."""

    record: SandboxRecord
    execs: list[ExecRecordRow]
    output: dict[str, tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class ExecPlan:
    """An exec fully decided by the caller: argv, env, files to write first, stdin."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    timeout_ms: int
    files: dict[str, bytes]
    stdin: bytes | None
    close_stdin: bool


class SandboxActor:
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
        self.execs: OrderedDict[str, ExecRecord] = OrderedDict()
        self._by_channel: dict[int, ExecRecord] = {}
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
        # PONG payload -> who waits for it (a probe, a quiesce before a checkpoint).
        self._pongs: dict[bytes, trio.Event] = {}
        # Crash recovery (runtimes whose instance is held by a shim): what was last saved.
        self._progress_lock = trio.Lock()
        self._progress_wanted = trio.Event()
        self._saved: tuple[int, int, int] = (-1, -1, -1)
        # Bytes of each running exec's kept stdout and stderr already in the store.
        self._saved_output: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ public (any task)

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

    async def exec(self, plan: ExecPlan) -> ExecRecord:
        """Start an exec; returns once the agent was asked to run it (not when it ends)."""
        return await self._call(lambda: self._start_exec(plan))

    async def snapshot(self, leave_running: bool) -> SnapshotMeta:
        return await self._call(lambda: self._snapshot(leave_running))

    async def destroy(self) -> list[str]:
        """Tear down (idempotent); returns once it is over, with what this call released."""
        if self.alive:
            with contextlib.suppress(SandboxNotRunning):
                return await self._request_teardown("destroyed", None)
        await self.finished.wait()
        return []

    def detach(self) -> None:
        """When this actor is cancelled (gateway shutdown), leave the sandbox running and its
        state as it is, for the next gateway to reattach, instead of tearing it down."""
        self._detached = True

    def adopt(self, params: SandboxParams, recorder: Recorder | None) -> None:
        """A warm pool sandbox claimed by a request: from now on it is that tenant's sandbox,
        with these parameters (same id and runtime instance), recorded and crash-recoverable
        like any other. Its age and idle time start now. Synchronous: nothing can see it half
        adopted."""
        assert params.sandbox_id == self.id
        self.params = params
        self.recorder = recorder
        self.created_at = self.last_active = time.time()
        channel = self._durable_channel()
        if channel is not None:
            channel.auto_ack = False  # acks follow checkpoints from now on (as from boot)
        self._touch()

    def exec_recorded(self, rec: ExecRecord) -> bool:
        """Whether a checkpoint taken since ``rec`` was started already wrote its record
        (the checkpoint before an exec reaches the agent upserts every running exec), so the
        caller need not write it again."""
        return rec.channel < self._saved[2]

    def retained_bytes(self) -> int:
        """Memory this record still holds: replay buffer and exec results."""
        return int(self.events.statistics()["bytes"]) + sum(
            e.retained_bytes() for e in self.execs.values()
        )

    def release_hold(self) -> None:
        self._held = False
        self._touch()

    def _running_exec(self, exec_id: str) -> ExecRecord:
        rec = self.execs.get(exec_id)
        if rec is None:
            raise NotFound(f"exec {exec_id!r} not found in {self.id}", exec_id=exec_id)
        if not rec.running or self._instance is None:
            raise ExecNotRunning(f"exec {exec_id} has finished", exec_id=exec_id)
        return rec

    async def send_stdin(self, exec_id: str, data: bytes, close: bool) -> None:
        """Feed an interactive exec's stdin (and close it when ``close``)."""
        rec = self._running_exec(exec_id)
        if rec.stdin_closed:
            raise ExecNotRunning(f"the stdin of exec {exec_id} is closed", exec_id=exec_id)
        if data:
            await self._to_agent(lambda ch: ch.send_stdin(rec.channel, data))
        if close:
            rec.stdin_closed = True
            await self._to_agent(lambda ch: ch.send_stdin_close(rec.channel))

    async def send_signal(self, exec_id: str, name: str) -> None:
        rec = self._running_exec(exec_id)
        if name == "SIGKILL" and rec.kill_verdict is None:
            rec.kill_verdict = "killed"
        await self._to_agent(lambda ch: ch.send_signal(rec.channel, SIGNALS[name]))

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

    def _fail_soon(self, reason: str) -> None:
        if self._nursery is not None:
            self.metrics.agent_failed("unresponsive")
            self._nursery.start_soon(self._post_failure, reason, "killed")

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

    # ------------------------------------------------------------------ the actor

    async def run(
        self,
        restore_image: Path | None = None,
        *,
        recovered: Recovered | None = None,
        task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Boot, report ready through ``task_status``, then serve until torn down.

        A boot failure raises to the starter with everything already released. After start-up
        nothing raises out of here: failures end in state ``failed`` with a reason.
        """
        bind_sandbox(self.id)  # its log lines are about this sandbox, not the creating request
        started = trio.current_time()
        try:
            with trio.fail_after(self.config.boot_timeout_s):
                if recovered is not None:
                    # A sandbox of a gateway that died: its shim kept it running and journaled
                    # the agent's output since our last checkpoint, which the reader replays.
                    instance = await self.runtime.reattach(self.id, recovered.record.agent_offset)
                    self._instance = instance
                    self._take_over(recovered)
                elif restore_image is None:
                    instance = await self.runtime.start(self.params.spec)
                    self._instance = instance
                else:
                    instance = await self.runtime.restore(self.params.spec, restore_image)
                    self._instance = instance
                if recovered is None:
                    await self._await_ready(instance, restored=restore_image is not None)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self._release_runtime()
                await self._reap_instance()
                self.state = "failed"
                self._record_state(f"failed to boot: {exc!r}"[:1000])
                self.finished.set()
            if not isinstance(exc, trio.Cancelled):
                self.metrics.agent_failed("boot")
            if isinstance(exc, trio.TooSlowError):
                raise RuntimeUnavailable(
                    f"sandbox did not boot within {self.config.boot_timeout_s:.0f}s",
                    runtime=self.params.runtime_name,
                ) from None
            if isinstance(exc, (OSError, AgentProtocolError, RuntimeStartError)):
                raise RuntimeUnavailable(
                    f"sandbox failed to boot: {exc}", runtime=self.params.runtime_name
                ) from exc
            raise
        if self._on_startup is not None and recovered is None:
            self._on_startup((trio.current_time() - started) * 1000)
        self._live.set()
        if recovered is None:
            self.state = "idle"
            self._emit_status()
        else:
            # No event: the replayed frames must get the seq numbers they had before the crash.
            self.state = "running" if self._by_channel else "idle"
        crashed = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_agent, instance)
                nursery.start_soon(self._lifetime_timer)
                nursery.start_soon(self._checkpoint_forever)
                for rec in self._by_channel.values():
                    nursery.start_soon(self._watch_exec, rec)
                task_status.started(self)
                await self._serve_mailbox()
                nursery.cancel_scope.cancel()
        except Exception:
            # A bug in this actor must fail this sandbox only, never the gateway.
            log.exception("sandbox %s crashed", self.id)
            self.metrics.agent_failed("internal")
            crashed = True
        finally:
            self._refuse_pending()
            # Cancelled (gateway shutdown) or crashed: the sandbox still goes down fully,
            # unless the gateway hands it over to its successor (detach).
            if self.alive and self._detached and not crashed:
                with trio.CancelScope(shield=True):
                    await self._hand_over()
            elif self.alive:
                with trio.CancelScope(shield=True):
                    if crashed:
                        await self._teardown("failed", "internal error in the sandbox actor")
                    else:
                        await self._teardown("destroyed", None, note="gateway shutting down")
            self.finished.set()

    async def _await_ready(self, instance: RuntimeInstance, *, restored: bool) -> None:
        if restored:
            # A restored agent is already past its HELLO; a ping proves the new channel works.
            await instance.channel.send_ping(b"ready")
            while True:
                frame = await instance.channel.receive_frame()
                if frame is None:
                    raise AgentProtocolError("agent channel closed during restore")
                if frame.kind == FrameKind.PONG:
                    return
                self._dispatch(frame.kind, frame.channel, frame.payload)
        await instance.channel.wait_hello()

    async def _serve_mailbox(self) -> None:
        async for op, reply in self._mailbox:
            self._inflight = reply
            with trio.CancelScope() as scope:
                self._op_scope = scope
                try:
                    result: outcome.Outcome[Any] = outcome.Value(await op())
                except Exception as exc:
                    result = outcome.Error(exc)
            self._op_scope = None
            if scope.cancelled_caught:
                # Interrupted by a teardown request (DELETE, expiry, a dead agent).
                result = outcome.Error(
                    SandboxNotRunning(f"sandbox {self.id} is being torn down", state=self.state)
                )
            with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                reply.send_nowait(result)
            self._inflight = None
            if not self.alive:
                return

    def _refuse_pending(self) -> None:
        """Answer the in-flight and every queued request: the actor is gone."""
        self._mailbox_send.close()
        gone = outcome.Error(SandboxNotRunning(f"sandbox {self.id} is {self.state}"))
        if self._inflight is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                self._inflight.send_nowait(gone)
        while True:
            try:
                _op, late = self._mailbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                late.send_nowait(gone)

    async def _request_teardown(
        self, final: SandboxState, reason: str | None, *, note: str | None = None
    ) -> list[str]:
        """Queue a teardown ahead of nothing: whatever operation is running is interrupted
        (a hostile sandbox can make an operation hang), then the teardown runs."""
        if self._op_scope is not None and not self._op_is_teardown:
            self._op_scope.cancel()

        async def teardown() -> list[str]:
            self._op_is_teardown = True
            try:
                return await self._teardown(final, reason, note=note)
            finally:
                self._op_is_teardown = False

        return await self._call(teardown, wait_for_room=True)

    # ------------------------------------------------------------------ agent frames

    async def _read_agent(self, instance: RuntimeInstance) -> None:
        channel = instance.channel
        reason: str | None = None
        failure_class = "exited"
        try:
            stall = self.config.stream_stall_timeout_s
            while True:
                frame = await channel.receive_frame()
                if frame is None:
                    break
                self._dispatch(frame.kind, frame.channel, frame.payload)
                if channel.offset - self._saved[0] >= PROGRESS_BYTES:
                    self._progress_wanted.set()
                # Flow control: a stream client that reads slower than the program writes
                # pauses the program (its pipe fills) instead of losing output.
                await self.events.wait_for_readers(stall)
        except AgentProtocolError as exc:
            reason = f"agent protocol violation: {exc}"
            failure_class = "protocol"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self._expect_eof:
            self._incarnation_done.set()
            return
        if not self.alive:
            return
        # The sandbox died under us: find out why, then fail it through the mailbox.
        with trio.move_on_after(2):
            status = await instance.wait()
            if reason is None:
                reason = f"sandbox exited unexpectedly (runtime status {status})"
        oom = self.runtime.out_of_memory(self.id)
        if oom:
            reason = (
                f"out of memory: the sandbox exceeded memory_limit {self.params.spec.memory_limit}"
            )
        elif reason is None:
            reason = "sandbox stopped responding"
        if not oom and (diag := instance.diagnostics()):
            reason += f"; runtime log: {diag[-300:]}"
        self.metrics.agent_failed("oom" if oom else failure_class)
        await self._post_failure(reason, "oom" if oom else "killed")

    async def _post_failure(self, reason: str, verdict: str) -> None:
        for rec in list(self._by_channel.values()):
            if rec.running:
                rec.kill_verdict = "oom" if verdict == "oom" else (rec.kill_verdict or "killed")
        with contextlib.suppress(GatewayError):
            await self._request_teardown("failed", reason)

    def _dispatch(self, kind: int, channel: int, payload: bytes) -> None:
        """Apply one frame from the (untrusted) agent. Raises AgentProtocolError on nonsense."""
        if kind in (FrameKind.STDOUT, FrameKind.STDERR):
            found = self._by_channel.get(channel)
            if found is None or not found.running:
                return  # output of an exec from before a restore, or after its result
            self._output(found, kind, payload)
        elif kind == FrameKind.STARTED:
            rec = self._by_channel.get(channel)
            if rec is not None:
                rec.pid = decode_started(payload).pid
        elif kind == FrameKind.EXIT:
            info = decode_exit(payload)
            rec = self._by_channel.get(channel)
            if rec is not None and rec.running:
                self._finish(rec, info)
        elif kind == FrameKind.ERROR:
            err = decode_error(payload)
            rec = self._by_channel.get(channel)
            if rec is not None and rec.running:
                # Why an exec could not start, told to its reader on its own stderr.
                self._output(rec, FrameKind.STDERR, f"sandstorm: {err.message}\n".encode())
            elif self._failure_logged < MAX_LOGGED_AGENT_ERRORS:
                self._failure_logged += 1
                log.info("sandbox %s agent says: %r", self.id, err.message[:200])
        elif kind == FrameKind.FILE_WRITTEN:
            written = decode_file_written(payload)
            waiter = self._file_waiters.pop(channel, None)
            if waiter is not None:
                waiter.send_nowait((written.ok, written.error))
        elif kind == FrameKind.PONG:
            if (pong := self._pongs.pop(payload, None)) is not None:
                pong.set()
        else:
            raise AgentProtocolError(f"unexpected frame kind {kind} from the agent")

    def _output(self, rec: ExecRecord, kind: int, chunk: bytes) -> None:
        (rec.stdout if kind == FrameKind.STDOUT else rec.stderr).add(chunk)
        self.events.append(lambda seq, ts: rec.output_event(kind, chunk, seq, ts))
        total = rec.stdout.total + rec.stderr.total
        if total > self.config.exec_output_limit and rec.kill_verdict is None:
            rec.kill_verdict = "output_limit"
            self._kill_soon(rec)

    def _finish(self, rec: ExecRecord, info: ExitInfo | None) -> None:
        if rec.running:
            verdict: Verdict | None = None
            failed = info is not None and (info.signal is not None or info.exit_code != 0)
            if failed and rec.kill_verdict is None and self.runtime.exec_ran_out_of_memory(self.id):
                verdict = "oom"  # the sandbox reached memory_limit: allocations failed
            self.metrics.exec_finished(self.params.runtime_name, rec.finish(info, verdict=verdict))
        result = rec.finish(info)
        self._by_channel.pop(rec.channel, None)
        if self.recorder is not None:
            self.recorder.exec_finished(self.id, self.params.tenant, rec.started_at, result)
        self.events.append(
            lambda seq, ts: ExitEvent(seq=seq, ts=ts, exec_id=rec.exec_id, result=result)
        )
        self._touch()
        if self.state == "running" and not self._by_channel:
            self.state = "idle"
            self._emit_status()

    def _kill_soon(self, rec: ExecRecord) -> None:
        if self._nursery is not None and self._instance is not None:
            self._nursery.start_soon(self._kill_exec, rec)

    async def _kill_exec(self, rec: ExecRecord) -> None:
        """SIGKILL the exec's process group; if the agent never reports, finish it ourselves."""
        # Across a snapshot the channel is being replaced: the kill goes to the restored agent.
        with trio.move_on_after(self.config.boot_timeout_s):
            await self._live.wait()
        with contextlib.suppress(SandboxNotRunning):
            await self._to_agent(lambda ch: ch.send_signal(rec.channel, signal.SIGKILL))
        with trio.move_on_after(KILL_GRACE_S):
            await rec.done.wait()
        if rec.running:
            self._finish(rec, None)
            # The agent did not report a SIGKILLed process: is it still there at all?
            await self._probe_agent()

    async def _probe_agent(self) -> None:
        """PING the agent; one that does not answer (stopped by code in the sandbox, say) can
        serve nothing more, so its sandbox is failed."""
        pong = self._pongs.setdefault(b"probe", trio.Event())
        with contextlib.suppress(SandboxNotRunning):
            await self._to_agent(lambda ch: ch.send_ping(b"probe"))
        with trio.move_on_after(PROBE_TIMEOUT_S):
            await pong.wait()
            return
        if self.alive:
            self.metrics.agent_failed("unresponsive")
            await self._post_failure(
                f"the agent did not answer for {PROBE_TIMEOUT_S:.0f}s (stopped or hung)", "killed"
            )

    # ------------------------------------------------------------------ operations (mailbox)

    async def _start_exec(self, plan: ExecPlan) -> ExecRecord:
        if self.state not in ("idle", "running") or self._instance is None:
            raise SandboxNotRunning(f"sandbox {self.id} is {self.state}", state=self.state)
        if len(self._by_channel) >= self.config.max_execs_per_sandbox:
            self.metrics.refused("quota_exceeded", "exec")
            raise QuotaExceeded(
                f"sandbox already runs {len(self._by_channel)} execs", retry_after=1
            )
        for path, content in plan.files.items():
            await self._write_file(path, content)
        num = self._next_channel
        self._next_channel += 1
        cap = self.config.result_output_cap
        rec = ExecRecord(
            exec_id=new_id("exe"),
            channel=num,
            argv=plan.argv,
            timeout_s=plan.timeout_ms / 1000,
            stdout=OutputBuffer(cap),
            stderr=OutputBuffer(cap),
        )
        self._remember(rec)
        self.events.append(
            lambda seq, ts: ExecStartedEvent(seq=seq, ts=ts, exec_id=rec.exec_id, argv=rec.argv)
        )
        if self.state == "idle":
            self.state = "running"
            self._emit_status()
        try:
            # Durable before the agent hears of it: a gateway that dies from here on finds the
            # exec's channel on restart and maps the journaled output back to it.
            await self._checkpoint()
            self.runtime.exec_starting(self.id, alone=len(self._by_channel) == 1)
            # keep_alive 0: the sandbox ends with this run, the agent need not prepare for more.
            last = self.params.keep_alive_s == 0
            await self._to_agent(
                lambda ch: ch.send_exec(num, plan.argv, plan.env, plan.cwd, last=last)
            )
            if plan.stdin:
                stdin = plan.stdin
                await self._to_agent(lambda ch: ch.send_stdin(num, stdin))
            if plan.close_stdin:
                rec.stdin_closed = True
                await self._to_agent(lambda ch: ch.send_stdin_close(num))
        except BaseException:
            # Never leave a record that looks like a running exec nobody watches.
            if rec.running:
                rec.kill_verdict = rec.kill_verdict or "killed"
                self._finish(rec, None)
            raise
        self._touch()
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_exec, rec)
        return rec

    def _remember(self, rec: ExecRecord) -> None:
        self.execs[rec.exec_id] = rec
        self._by_channel[rec.channel] = rec
        while len(self.execs) > MAX_EXEC_HISTORY:
            oldest = next(iter(self.execs.values()))
            if oldest.running:
                break
            self.execs.popitem(last=False)

    async def _write_file(self, path: str, content: bytes) -> None:
        """Write one file through the agent, in chunks that each fit a frame."""
        chunks = [
            content[i : i + WRITE_FILE_CHUNK] for i in range(0, len(content), WRITE_FILE_CHUNK)
        ] or [b""]
        for index, chunk in enumerate(chunks):
            num = self._next_channel
            self._next_channel += 1
            send, recv = trio.open_memory_channel[tuple[bool, str | None]](1)
            self._file_waiters[num] = send
            append = index > 0
            try:
                await self._to_agent(
                    lambda ch: ch.send_write_file(num, path, chunk, 0o644, append=append)  # noqa: B023
                )
                with trio.fail_after(AGENT_SEND_TIMEOUT_S):
                    ok, error = await recv.receive()
            except trio.TooSlowError:
                raise SandboxNotRunning(f"sandbox {self.id} did not write {path}") from None
            finally:
                self._file_waiters.pop(num, None)
            if not ok:
                raise InvalidRequest(f"cannot write {path}: {error}", field=f"files.{path}")

    async def _watch_exec(self, rec: ExecRecord) -> None:
        # From the exec's start, which for a sandbox taken over after a restart was earlier.
        remaining = rec.started_mono + rec.timeout_s - time.monotonic()
        with trio.move_on_after(max(0.0, remaining)):
            await rec.done.wait()
            return
        if rec.running:
            if rec.kill_verdict is None:
                rec.kill_verdict = "timeout"
            await self._kill_exec(rec)

    async def _lifetime_timer(self) -> None:
        """Destroy the sandbox after keep_alive idle seconds, or at max_lifetime, busy or not."""
        while self.alive:
            # Read every time: a claimed pool sandbox's life starts again at its claim.
            lifetime_end = self.created_at + self.config.max_lifetime_s
            activity = self._activity = trio.Event()
            busy = self._held or bool(self._by_channel)
            idle_end = self.last_active + self.params.keep_alive_s
            deadline = lifetime_end if busy else min(lifetime_end, idle_end)
            with trio.move_on_after(max(0.0, deadline - time.time())):
                await activity.wait()
                continue
            reason = "max_lifetime reached" if time.time() >= lifetime_end else "keep_alive expired"
            log.info("sandbox %s: %s", self.id, reason)
            with contextlib.suppress(GatewayError):
                await self._request_teardown("destroyed", None, note=reason)
            return

    def _touch(self) -> None:
        self.last_active = time.time()
        self._activity.set()

    async def _snapshot(self, leave_running: bool) -> SnapshotMeta:
        """Checkpoint (which stops the sandbox), publish the snapshot, then either restore the
        same sandbox from it (``leave_running``) or answer and tear it down right after."""
        if not self.runtime.capabilities.snapshot:
            raise SnapshotUnsupported(
                f"runtime {self.params.runtime_name} cannot snapshot",
                runtime=self.params.runtime_name,
            )
        if (refusal := self.runtime.snapshot_refusal(self.params.spec)) is not None:
            raise SnapshotUnsupported(refusal, runtime=self.params.runtime_name)
        if self.state not in ("idle", "running") or self._instance is None:
            raise SandboxNotRunning(f"sandbox {self.id} is {self.state}", state=self.state)
        old = self._instance
        previous = self.state
        self.state = "snapshotting"
        self._emit_status()
        snapshot_id = new_id("snp")
        staging = self.catalog.staging_dir(snapshot_id)
        self._live = trio.Event()
        self._expect_eof = True
        self._incarnation_done = trio.Event()
        checkpointed = False
        try:
            # Quiet: the agent answered after stopping its zygote, and no exec runs, so the old
            # incarnation has nothing more to say. Then a snapshot that ends the sandbox need not
            # wait for its stream's end (nor runsc's own teardown, ~6 ms, at times 100): the
            # teardown that follows the answer reads it.
            quiet = await self._quiesce() and not any(r.running for r in self.execs.values())
            await self.runtime.checkpoint(self.params.spec, staging)
            checkpointed = True
            if leave_running or not quiet:
                with trio.fail_after(CHECKPOINT_DRAIN_S):
                    await self._incarnation_done.wait()  # every frame written before it is read
                    await old.wait()
            meta = await self.catalog.commit(
                staging, self._snapshot_meta(snapshot_id), self.params.tenant
            )
        except BaseException as exc:
            self._expect_eof = False
            with trio.CancelScope(shield=True):
                await self.catalog.discard(staging)
                if checkpointed or self._incarnation_done.is_set() or old.exited:
                    # The checkpoint stopped the sandbox and then failed: it cannot go on.
                    await self._teardown("failed", f"snapshot failed: {exc!r}")
                else:
                    self.state = previous
                    self._emit_status()
                    self._live.set()
            if isinstance(exc, (RuntimeStartError, OSError, trio.TooSlowError)):
                raise RuntimeUnavailable(f"snapshot failed: {exc}") from exc
            raise
        if not leave_running:
            # The snapshot is written and published: answer now, and free the sandbox (the
            # runtime's kill and delete, cgroups, directories) as the mailbox's next job. Until
            # then it stays "snapshotting", which refuses every other request, and the old
            # incarnation's end of stream is expected.
            assert self._nursery is not None
            self._nursery.start_soon(self._destroy_after_snapshot, snapshot_id)
            return meta
        self._expect_eof = False
        try:
            with trio.fail_after(self.config.boot_timeout_s):
                instance = await self.runtime.restore(
                    self.params.spec, self.catalog.path(snapshot_id)
                )
                self._instance = instance
                await self._await_ready(instance, restored=True)
        except Exception as exc:
            # The snapshot itself is fine and published; only this sandbox could not go on.
            with trio.CancelScope(shield=True):
                await self._teardown("failed", f"could not continue after the snapshot: {exc!r}")
            return meta
        assert self._nursery is not None
        self._nursery.start_soon(self._read_agent, instance)
        self._live.set()
        self.state = "running" if self._by_channel else "idle"
        self._emit_status()
        self._touch()
        # A new shim and stream (offset 0): checkpoint against it at once, so a crash from
        # here on reattaches to the restored sandbox.
        self._saved = (-1, -1, -1)
        await self._checkpoint()
        return meta

    async def _quiesce(self) -> bool:
        """Before a checkpoint: the agent stops its python zygote and the zygote's standby, two
        interpreters that would more than double the image and the checkpoint's time (3.8 MB
        and ~310 ms against 1.4 MB and ~130 ms here); it starts them again once idle. Bounded:
        an agent that does not answer in time (or an older one, which answers ERROR and then
        the PONG) is checkpointed as it is. Returns whether the agent answered (every frame it
        sent before is read)."""
        pong = self._pongs.setdefault(b"quiesce", trio.Event())
        try:
            await self._to_agent(lambda ch: ch.send_quiesce())
            await self._to_agent(lambda ch: ch.send_ping(b"quiesce"))
            with trio.move_on_after(QUIESCE_TIMEOUT_S):
                await pong.wait()
            return pong.is_set()
        finally:
            self._pongs.pop(b"quiesce", None)

    async def _destroy_after_snapshot(self, snapshot_id: str) -> None:
        with contextlib.suppress(SandboxNotRunning):
            await self._request_teardown("destroyed", None, note=f"snapshot {snapshot_id} taken")

    def _snapshot_meta(self, snapshot_id: str) -> SnapshotMeta:
        from sandstorm.api.types import SnapshotInfo

        spec = self.params.spec
        return SnapshotMeta(
            info=SnapshotInfo(
                snapshot_id=snapshot_id,
                sandbox_id=self.id,
                runtime=self.params.runtime_name,
                size_bytes=0,
                sha256="",
                created_at=rfc3339(),
            ),
            isolation_level=self.params.isolation_level,
            image=self.params.image,
            cpu_limit=spec.cpu_limit,
            memory_limit=spec.memory_limit,
            timeout=self.params.timeout_ms,
            pids_limit=spec.pids_limit,
            mounts=[
                SnapshotMount(
                    source=str(m.source), destination=m.destination, read_only=m.read_only
                )
                for m in spec.mounts
            ],
            next_channel=self._next_channel,
        )

    async def _teardown(
        self, final: SandboxState, reason: str | None, *, note: str | None = None
    ) -> list[str]:
        """Stop everything and free every resource. Shielded: it always runs to the end."""
        if self.state in ("destroyed", "failed"):
            return []
        released: list[str] = []
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
            for rec in list(self._by_channel.values()):
                if rec.running and rec.kill_verdict is None:
                    rec.kill_verdict = "oom" if oom else "killed"
                self._finish(rec, None)
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

    def _emit_status(self) -> None:
        state = self.state
        self.events.append(lambda seq, ts: StatusEvent(seq=seq, ts=ts, state=state))
        self._record_state(None)

    def _record_state(self, reason: str | None) -> None:
        if self.recorder is not None:
            self.recorder.sandbox_state(self.id, self.state, reason, self.events.last_seq)

    # ------------------------------------------------------------------ crash recovery

    def _durable_channel(self) -> JournaledChannel | None:
        """The channel to checkpoint against: only a shim keeps the sandbox (and a journal of
        its output) across a gateway crash, and only a recorded sandbox can be taken over.
        Its acks then follow checkpoints (never ``auto_ack``), so the shim keeps every byte
        written after the last checkpoint."""
        instance = self._instance
        if self.recorder is None or instance is None or not self._live.is_set():
            return None
        channel = instance.journaled
        if channel is None:
            return None
        channel.auto_ack = False
        return channel

    async def _checkpoint(self) -> None:
        """Save what a restarted gateway needs to go on from here — the actor's state, the
        output running execs wrote since the last checkpoint (raw bytes), the event seq and
        the agent-stream offset — then let the shim drop the journal before that offset.

        The state is read in one go with no checkpoint in between, so it matches the offset
        exactly; frames after the offset are replayed on top of it after a crash."""
        channel = self._durable_channel()
        recorder = self.recorder
        if channel is None or recorder is None:
            return
        async with self._progress_lock:
            offset, seq = channel.offset, self.events.last_seq
            key = (offset, seq, self._next_channel)
            if key == self._saved:
                return
            running = [rec for rec in self._by_channel.values() if rec.running]
            now_epoch, now_mono = time.time(), time.monotonic()
            progress = SandboxProgress(
                event_seq=seq,
                next_channel=self._next_channel,
                last_active=self.last_active,
                execs=[
                    RunningExecState(
                        id=rec.exec_id,
                        channel=rec.channel,
                        timeout_s=rec.timeout_s,
                        started_epoch=now_epoch - (now_mono - rec.started_mono),
                        stdout_total=rec.stdout.total,
                        stderr_total=rec.stderr.total,
                        kill_verdict=rec.kill_verdict,
                        stdin_closed=rec.stdin_closed,
                    )
                    for rec in running
                ],
            )
            # Only what was kept since the last checkpoint (kept output only grows, to the cap).
            output: list[tuple[str, int, bytes]] = []
            saved_output: dict[str, tuple[int, int]] = {}
            for rec in running:
                out, err = self._saved_output.get(rec.exec_id, (0, 0))
                output.append((rec.exec_id, 1, bytes(rec.stdout.kept[out:])))
                output.append((rec.exec_id, 2, bytes(rec.stderr.kept[err:])))
                saved_output[rec.exec_id] = (len(rec.stdout.kept), len(rec.stderr.kept))
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
            self._saved_output = saved_output
            self._saved = key
            if not recorder.healthy:
                return  # a record before this checkpoint is not written: keep the journal
            with (
                trio.move_on_after(AGENT_SEND_TIMEOUT_S),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await channel.send_ack(offset)

    async def _checkpoint_forever(self) -> None:
        while self.alive:
            with trio.move_on_after(PROGRESS_INTERVAL_S):
                await self._progress_wanted.wait()
            self._progress_wanted = trio.Event()
            await self._checkpoint()

    async def _hand_over(self) -> None:
        """Gateway shutdown with sandboxes kept: checkpoint, then let go of the sandbox without
        stopping it; the next gateway takes it over from the checkpoint. Bounded: a shim that
        stopped reading must not hold the shutdown up."""
        with trio.move_on_after(HAND_OVER_S):
            await self._checkpoint()
        instance = self._instance
        if instance is not None:
            with trio.move_on_after(HAND_OVER_S):
                await instance.detach()

    def _take_over(self, recovered: Recovered) -> None:
        """Rebuild this actor from the last checkpoint of a gateway that died."""
        record = recovered.record
        progress = record.progress or SandboxProgress(
            event_seq=record.last_event_seq,
            next_channel=self.params.first_channel,
            last_active=record.created_at,
        )
        self.created_at = record.created_at
        self.last_active = progress.last_active
        self._held = False  # the request that created it is gone with the old gateway
        self._next_channel = progress.next_channel
        self.events = EventLog(self.config.replay_buffer_bytes, last_seq=progress.event_seq)
        rows = {row.id: row for row in recovered.execs}
        for row in recovered.execs:
            if row.state == "finished" and row.result is not None:
                self.execs[row.id] = _finished_record(row.id, row.started_at, row.result)
        cap = self.config.result_output_cap
        now_epoch, now_mono = time.time(), time.monotonic()
        for state in progress.execs:
            stored = rows.get(state.id)
            if stored is not None and stored.state == "finished":
                continue  # its exit was recorded after the checkpoint; replayed frames skip it
            rec = ExecRecord(
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
            rec.stdout.restore(out, state.stdout_total)
            rec.stderr.restore(err, state.stderr_total)
            self._saved_output[rec.exec_id] = (len(rec.stdout.kept), len(rec.stderr.kept))
            self._remember(rec)
        watched = {state.id for state in progress.execs}
        for row in recovered.execs:
            if row.state == "running" and row.id not in watched and self.recorder is not None:
                # Started but never checkpointed with its channel: nothing can finish it now.
                lost = _finished_record(row.id, row.started_at, None).finish(None, verdict="killed")
                self.recorder.exec_finished(self.id, self.params.tenant, row.started_at, lost)
        self._saved = (record.agent_offset, progress.event_seq, self._next_channel)


def _finished_record(exec_id: str, started_at: str, result: ExecResult | None) -> ExecRecord:
    """An exec record for history only (a restarted gateway's view of a finished exec)."""
    rec = ExecRecord(
        exec_id=exec_id,
        channel=0,
        argv=[],
        timeout_s=0.0,
        stdout=OutputBuffer(0),
        stderr=OutputBuffer(0),
        started_at=started_at,
    )
    if result is not None:
        rec.result = result
        rec.done.set()
    return rec
