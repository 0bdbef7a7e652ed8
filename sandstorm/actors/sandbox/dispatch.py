"""Agent frames into execs and the event log, and an exec's life cycle: start (files first),
output, exit, timeout, kill.

Every frame comes from code the sandbox's user controls: each is validated, and nonsense fails
this sandbox only (``AgentProtocolError``).
"""

from __future__ import annotations

import contextlib
import signal
import time

import trio

from sandstorm.actors.execs import ExecTracker, OutputBuffer
from sandstorm.actors.sandbox.core import AGENT_SEND_TIMEOUT_S, log
from sandstorm.actors.sandbox.params import ExecPlan
from sandstorm.actors.sandbox.recovery import RecoveryRecords
from sandstorm.agent import (
    WRITE_FILE_CHUNK,
    AgentProtocolError,
    FrameKind,
    decode_error,
    decode_exit,
    decode_file_written,
    decode_started,
)
from sandstorm.agent.files import FileError
from sandstorm.api.types import ExecStartedEvent
from sandstorm.errors import InvalidRequest, QuotaExceeded, SandboxNotRunning
from sandstorm.ids import new_id
from sandstorm.runtimes.base import RuntimeInstance

FILE_KINDS = frozenset(
    {FrameKind.FS_REPLY, FrameKind.FS_DATA, FrameKind.FS_END, FrameKind.FS_EVENT}
)
# What an agent that knows no file frames answers to the first of them.
OLD_AGENT_REFUSAL = f"unknown frame kind {int(FrameKind.FS)}"
# After a kill, how long the agent gets to report the exit before the gateway gives up on it.
KILL_GRACE_S = 1.0
# How long the agent gets to answer a PING when it failed to report a killed process.
PROBE_TIMEOUT_S = 3.0
# Agent messages logged per sandbox; the rest are counted, so a sandbox cannot flood the log.
MAX_LOGGED_AGENT_ERRORS = 5


class AgentDispatch(RecoveryRecords):
    # ------------------------------------------------------------------ agent frames

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
                self._progress_due(channel.offset)
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
        if not oom and self.runtime.process_limit_hit(self.id):
            # The runtime itself could not get the host processes it needed.
            reason += (
                f"; its host processes had reached their limit (pids_limit "
                f"{self.params.spec.pids_limit})"
            )
        if not oom and (diag := instance.diagnostics()):
            reason += f"; runtime log: {diag[-300:]}"
        self.metrics.agent_failed("oom" if oom else failure_class)
        await self._post_failure(reason, "oom" if oom else "killed")

    def _dispatch(self, kind: int, channel: int, payload: bytes) -> None:
        """Apply one frame from the (untrusted) agent. Raises AgentProtocolError on nonsense."""
        if kind in (FrameKind.STDOUT, FrameKind.STDERR):
            found = self._by_channel.get(channel)
            if found is None or not found.running:
                return  # output of an exec from before a restore, or after its result
            self._output(found, kind, payload)
        elif kind == FrameKind.STARTED:
            tracker = self._by_channel.get(channel)
            if tracker is not None:
                tracker.pid = decode_started(payload).pid
        elif kind == FrameKind.EXIT:
            info = decode_exit(payload)
            tracker = self._by_channel.get(channel)
            if tracker is not None and tracker.running:
                self._finish(tracker, info)
        elif kind == FrameKind.ERROR:
            err = decode_error(payload)
            tracker = self._by_channel.get(channel)
            if tracker is not None and tracker.running:
                # Why an exec could not start, told to its reader on its own stderr.
                self._output(tracker, FrameKind.STDERR, f"sandstorm: {err.message}\n".encode())
            elif channel == 0 and err.message == OLD_AGENT_REFUSAL:
                # An agent from before file requests (a sandbox taken over from an older
                # gateway): they fail at once, not after a timeout.
                self.files.fail_all(
                    FileError(
                        f"sandbox {self.id} runs an agent without file requests; "
                        "a new sandbox has them"
                    )
                )
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
        elif kind in FILE_KINDS:
            self.files.dispatch(kind, channel, payload)
        else:
            raise AgentProtocolError(f"unexpected frame kind {kind} from the agent")

    def _output(self, tracker: ExecTracker, kind: int, chunk: bytes) -> None:
        (tracker.stdout if kind == FrameKind.STDOUT else tracker.stderr).add(chunk)
        self.events.append(lambda seq, ts: tracker.output_event(kind, chunk, seq, ts))
        total = tracker.stdout.total + tracker.stderr.total
        if total > self.config.exec_output_limit and tracker.kill_verdict is None:
            tracker.kill_verdict = "output_limit"
            self._kill_soon(tracker)

    def _kill_soon(self, tracker: ExecTracker) -> None:
        if self._nursery is not None and self._instance is not None:
            self._nursery.start_soon(self._kill_exec, tracker)

    async def _kill_exec(self, tracker: ExecTracker) -> None:
        """SIGKILL the exec's process group; if the agent never reports, finish it ourselves."""
        # Across a snapshot the channel is being replaced: the kill goes to the restored agent.
        with trio.move_on_after(self.config.boot_timeout_s):
            await self._live.wait()
        with contextlib.suppress(SandboxNotRunning):
            await self._to_agent(lambda ch: ch.send_signal(tracker.channel, signal.SIGKILL))
        with trio.move_on_after(KILL_GRACE_S):
            await tracker.done.wait()
        if tracker.running:
            self._finish(tracker, None)
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

    # ------------------------------------------------------------------ the exec life cycle

    async def _start_exec(self, plan: ExecPlan) -> ExecTracker:
        if self.state not in ("idle", "running") or self._instance is None:
            raise SandboxNotRunning(f"sandbox {self.id} is {self.state}", state=self.state)
        if len(self._by_channel) >= self.config.max_execs_per_sandbox:
            self.metrics.refused("quota_exceeded", "exec")
            raise QuotaExceeded(
                f"sandbox already runs {len(self._by_channel)} execs", retry_after=1
            )
        for path, content in plan.files.items():
            await self._write_file(path, content)
        num = self._take_channel()
        cap = self.config.result_output_cap
        tracker = ExecTracker(
            exec_id=new_id("exe"),
            channel=num,
            argv=plan.argv,
            timeout_s=plan.timeout_ms / 1000,
            stdout=OutputBuffer(cap),
            stderr=OutputBuffer(cap),
        )
        self._remember(tracker)
        self.events.append(
            lambda seq, ts: ExecStartedEvent(
                seq=seq, ts=ts, exec_id=tracker.exec_id, argv=tracker.argv
            )
        )
        if self.state == "idle":
            self.state = "running"
            self._emit_status()
        try:
            # Durable before the agent hears of it: a gateway that dies from here on finds the
            # exec's channel on restart and maps the journaled output back to it. A sandbox
            # that records no progress (no shim holds it) writes the exec's own row.
            await self._record_progress()
            if self.recorder is not None and not self._progress_covers(tracker):
                await self.recorder.exec_started(
                    self.id, self.params.tenant, tracker.exec_id, tracker.started_at
                )
            self.runtime.exec_starting(self.id, alone=len(self._by_channel) == 1)
            # keep_alive 0: the sandbox ends with this run, the agent need not prepare for more.
            last = self.params.keep_alive_s == 0
            await self._to_agent(
                lambda ch: ch.send_exec(
                    num, plan.argv, plan.env, plan.cwd, last=last, background=plan.background
                )
            )
            try:
                if plan.stdin:
                    stdin = plan.stdin
                    await self._to_agent(lambda ch: ch.send_stdin(num, stdin))
                if plan.close_stdin:
                    tracker.stdin_closed = True
                    await self._to_agent(lambda ch: ch.send_stdin_close(num))
            except SandboxNotRunning:
                # The exec has started and the sandbox died under it (its program took the
                # memory): its verdict comes with the sandbox's failure, as for any exec.
                pass
        except BaseException:
            # Never leave an exec that looks running with nobody watching it.
            if tracker.running:
                tracker.kill_verdict = tracker.kill_verdict or "killed"
                self._finish(tracker, None)
            raise
        self._touch()
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_exec, tracker)
        return tracker

    async def _write_file(self, path: str, content: bytes) -> None:
        """Write one file through the agent, in chunks that each fit a frame."""
        chunks = [
            content[i : i + WRITE_FILE_CHUNK] for i in range(0, len(content), WRITE_FILE_CHUNK)
        ] or [b""]
        for index, chunk in enumerate(chunks):
            num = self._take_channel()
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

    async def _watch_exec(self, tracker: ExecTracker) -> None:
        # From the exec's start, which for a sandbox taken over after a restart was earlier.
        remaining = tracker.started_mono + tracker.timeout_s - time.monotonic()
        with trio.move_on_after(max(0.0, remaining)):
            await tracker.done.wait()
            return
        if tracker.running:
            if tracker.kill_verdict is None:
                tracker.kill_verdict = "timeout"
            await self._kill_exec(tracker)
