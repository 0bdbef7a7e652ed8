"""Taking a snapshot of a running sandbox.

The runtime's checkpoint stops the sandbox and writes its image; the snapshot is published in
the catalog, and then the same sandbox is either restored from it (``leave_running``: a new
incarnation of the runtime and the agent channel, same id, same execs) or torn down right after
the answer. Across the checkpoint and restore the agent channel is not live (``_live`` clear),
so sends to the agent wait for the restored one.
"""

from __future__ import annotations

import contextlib

import trio

from sandstorm.actors.sandbox.files import FileAccess
from sandstorm.api.timestamps import rfc3339
from sandstorm.api.types import SnapshotInfo
from sandstorm.errors import (
    RuntimeUnavailable,
    SandboxNotRunning,
    SnapshotUnsupported,
)
from sandstorm.ids import new_id
from sandstorm.runtimes.base import RuntimeStartError
from sandstorm.store.snapshots import SnapshotMeta, SnapshotMount

# After the runtime's checkpoint, how long the old runtime process gets to deliver its last
# frames and exit.
CHECKPOINT_DRAIN_S = 10.0
QUIESCE_TIMEOUT_S = 1.0  # the agent's answer to QUIESCE before the checkpoint


class Snapshotting(FileAccess):
    async def _snapshot(self, leave_running: bool) -> SnapshotMeta:
        """The runtime's checkpoint (which stops the sandbox), publish the snapshot, then either
        restore the same sandbox from it (``leave_running``) or answer and tear it down right
        after."""
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
        # Reads and writes in flight cannot cross the checkpoint; watches live in the agent's
        # memory, which the snapshot keeps, and go on after it.
        self.files.fail_all(
            SandboxNotRunning(f"sandbox {self.id} is being snapshotted"), keep_watches=True
        )
        self._live = trio.Event()
        self._expect_eof = True
        self._incarnation_done = trio.Event()
        checkpointed = False
        try:
            # Quiet: the agent answered after stopping its zygote, and no exec runs, so the old
            # incarnation has nothing more to say. Then a snapshot that ends the sandbox need not
            # wait for its stream's end (nor for the runtime's own teardown): the teardown that
            # follows the answer reads it.
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
                    self.files.reopen()
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
        self.files.reopen()
        self._live.set()
        self.state = "running" if self._by_channel else "idle"
        self._emit_status()
        self._touch()
        # A new shim and stream (offset 0): record progress against it at once, so a crash
        # from here on reattaches to the restored sandbox.
        self._recorded = (-1, -1, -1)
        await self._record_progress()
        return meta

    async def _quiesce(self) -> bool:
        """Before the runtime's checkpoint: the agent stops its python zygote and the zygote's
        standby, two interpreters that would more than double the image and the checkpoint's
        time; it starts them again once idle. Bounded: an agent that does not answer in time
        (or one without QUIESCE, which answers ERROR and then the PONG) is checkpointed as it
        is. Returns whether the agent answered (every frame it sent before is read)."""
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
