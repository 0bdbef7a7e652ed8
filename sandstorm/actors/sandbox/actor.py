"""The sandbox actor: owns ONE runtime instance, the agent connection and the event log.

Tasks in its nursery: the agent reader (frames → execs and the event log), one watchdog per
running exec (timeout), the lifetime timer (keep_alive / max_lifetime), the progress recorder
(crash recovery) and the mailbox loop. Every state change goes through the mailbox, one
operation at a time, so exec, snapshot and destroy never interleave; reads (status, results)
look at the state directly. The class is built in layers (see ``core``); this one boots the
sandbox, serves the mailbox and answers the callers.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import outcome
import trio

from sandstorm.actors.execs import ExecTracker
from sandstorm.actors.recorder import Recorder
from sandstorm.actors.sandbox.core import T, log
from sandstorm.actors.sandbox.params import ExecPlan, SandboxParams
from sandstorm.actors.sandbox.recovery import Recovered
from sandstorm.actors.sandbox.snapshot import Snapshotting
from sandstorm.agent import AgentProtocolError
from sandstorm.errors import (
    ExecNotRunning,
    GatewayError,
    NotFound,
    RuntimeUnavailable,
    SandboxNotRunning,
)
from sandstorm.logs import bind_sandbox
from sandstorm.runtimes.base import RuntimeInstance, RuntimeStartError
from sandstorm.store.snapshots import SnapshotMeta

SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
SIGNALS = {name: int(getattr(signal, name)) for name in SIGNAL_NAMES}


class SandboxActor(Snapshotting):
    # ------------------------------------------------------------------ public (any task)

    async def exec(self, plan: ExecPlan) -> ExecTracker:
        """Start an exec; returns once it is recorded and the agent was asked to run it (not
        when it ends)."""
        return await self._call(lambda: self._start_exec(plan))

    async def start_first_exec(self, plan: ExecPlan) -> ExecTracker:
        """The creating request's exec in a sandbox that booted before the request (a claimed
        warm pool sandbox), as one operation: the exec starts, or the sandbox is destroyed and
        the error raised. The request's hold on the sandbox ends either way."""
        try:
            tracker = await self.exec(plan)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy()
            raise
        finally:
            self.release_hold()
        self.first_exec = tracker
        return tracker

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
            channel.auto_ack = False  # acks follow progress records from now on (as from boot)
        self._touch()

    def release_hold(self) -> None:
        self._held = False
        self._touch()

    def _running_exec(self, exec_id: str) -> ExecTracker:
        tracker = self.execs.get(exec_id)
        if tracker is None:
            raise NotFound(f"exec {exec_id!r} not found in {self.id}", exec_id=exec_id)
        if not tracker.running or self._instance is None:
            raise ExecNotRunning(f"exec {exec_id} has finished", exec_id=exec_id)
        return tracker

    async def send_stdin(self, exec_id: str, data: bytes, close: bool) -> None:
        """Feed an interactive exec's stdin (and close it when ``close``)."""
        tracker = self._running_exec(exec_id)
        if tracker.stdin_closed:
            raise ExecNotRunning(f"the stdin of exec {exec_id} is closed", exec_id=exec_id)
        if data:
            await self._to_agent(lambda ch: ch.send_stdin(tracker.channel, data))
        if close:
            tracker.stdin_closed = True
            await self._to_agent(lambda ch: ch.send_stdin_close(tracker.channel))

    async def send_signal(self, exec_id: str, name: str) -> None:
        tracker = self._running_exec(exec_id)
        if name == "SIGKILL" and tracker.kill_verdict is None:
            tracker.kill_verdict = "killed"
        await self._to_agent(lambda ch: ch.send_signal(tracker.channel, SIGNALS[name]))

    # ------------------------------------------------------------------ the actor

    async def run(
        self,
        restore_image: Path | None = None,
        *,
        first_exec: ExecPlan | None = None,
        recovered: Recovered | None = None,
        count_boot: bool = False,
        task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Boot, run ``first_exec`` (the creating request's), report ready through
        ``task_status``, then serve until torn down. ``count_boot``: the boot counts in the
        gateway's create metrics (a request's sandbox, not a pool's nor one taken over).

        A boot failure raises to the starter with everything already released; so does a
        refused first exec, once the sandbox is torn down again. After start-up nothing raises
        out of here: failures end in state ``failed`` with a reason.
        """
        bind_sandbox(self.id)  # its log lines are about this sandbox, not the creating request
        started = trio.current_time()
        source = "image" if restore_image is None else "snapshot"
        with (
            self.metrics.creating(self.params.runtime_name, source)
            if count_boot
            else contextlib.nullcontext()
        ):
            instance = await self._boot(restore_image, recovered)
        self.booted = True
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
        reported = False
        refused: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_agent, instance)
                nursery.start_soon(self._lifetime_timer)
                nursery.start_soon(self._record_progress_forever)
                for tracker in self._by_channel.values():
                    nursery.start_soon(self._watch_exec, tracker)
                if first_exec is not None:
                    refused = await self._begin(first_exec)
                if refused is None:
                    task_status.started(self)
                    reported = True
                await self._serve_mailbox()
                nursery.cancel_scope.cancel()
        except Exception:
            # A bug in this actor must fail this sandbox only, never the gateway.
            log.exception("sandbox %s crashed", self.id)
            self.metrics.agent_failed("internal")
            crashed = True
        finally:
            self._refuse_pending()
            # Cancelled (gateway shutdown, or the creating request before the actor reported
            # ready) or crashed: the sandbox still goes down fully, unless the gateway hands it
            # over to its successor (detach).
            if self.alive and self._detached and not crashed:
                with trio.CancelScope(shield=True):
                    await self._hand_over()
            elif self.alive:
                with trio.CancelScope(shield=True):
                    if crashed:
                        await self._teardown("failed", "internal error in the sandbox actor")
                    else:
                        note = "gateway shutting down" if reported else None
                        await self._teardown("destroyed", None, note=note)
            self.finished.set()
        if refused is not None:
            raise refused

    async def _boot(
        self, restore_image: Path | None, recovered: Recovered | None
    ) -> RuntimeInstance:
        """Start (or restore, or reattach to) the runtime instance and wait for its agent. On
        failure everything is released, the actor has ended, and the error is raised
        (RuntimeUnavailable for what the runtime or the agent did)."""
        try:
            with trio.fail_after(self.config.boot_timeout_s):
                if recovered is not None:
                    # A sandbox of a gateway that died: its shim kept it running and journaled
                    # the agent's output since our last progress record, which the reader replays.
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
        return instance

    async def _begin(self, plan: ExecPlan) -> BaseException | None:
        """Run the creating request's exec as the actor's first operation, before it reports
        ready: the request gets its sandbox and its exec in one step. The request's hold on
        the sandbox ends here. A refused exec is returned, for the starter to get once the
        sandbox is torn down: the teardown is queued like a request's destroy, behind any
        teardown already asked for (a dead agent's)."""
        result = await self._run_op(lambda: self._start_exec(plan))
        self.release_hold()
        if isinstance(result, outcome.Error):
            assert self._nursery is not None
            self._nursery.start_soon(self.destroy)
            return result.error
        self.first_exec = result.unwrap()
        return None

    async def _serve_mailbox(self) -> None:
        async for op, reply in self._mailbox:
            self._inflight = reply
            result = await self._run_op(op)
            with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                reply.send_nowait(result)
            self._inflight = None
            if not self.alive:
                return

    async def _run_op(self, op: Callable[[], Awaitable[T]]) -> outcome.Outcome[T]:
        """Run one operation, which a teardown request interrupts (SandboxNotRunning)."""
        result: outcome.Outcome[T]
        with trio.CancelScope() as scope:
            self._op_scope = scope
            try:
                result = outcome.Value(await op())
            except Exception as exc:
                result = outcome.Error(exc)
        self._op_scope = None
        if scope.cancelled_caught:
            # Interrupted by a teardown request (DELETE, expiry, a dead agent).
            result = outcome.Error(
                SandboxNotRunning(f"sandbox {self.id} is being torn down", state=self.state)
            )
        return result

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

    async def _lifetime_timer(self) -> None:
        """Destroy the sandbox after keep_alive idle seconds, or at max_lifetime, busy or not."""
        while self.alive:
            # Read every time: a claimed pool sandbox's life starts again at its claim.
            lifetime_end = self.created_at + self.config.max_lifetime_s
            activity = self._activity = trio.Event()
            busy = self._held or bool(self._by_channel) or self._file_requests > 0
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
