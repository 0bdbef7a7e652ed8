"""The runtime base: what every runtime declares, the interface the actors drive, and the values
and helpers the drivers share.

A runtime does only the platform work: detect itself, start a sandbox whose PID 1 is the agent and
hand back a byte channel to it, checkpoint, restore, destroy, and report usage. Processes, output,
per-exec limits and streaming belong to the agent protocol, shared by every runtime.

Each runtime class declares its ``name``, ``isolation_levels`` and ``capabilities`` once, as
class attributes; the registry hands them to the selection rules (``sandstorm.api.selection``)
and to ``GET /v1/runtimes``.
"""

from __future__ import annotations

import abc
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final, Protocol

import trio

from sandstorm.agent import AgentChannel
from sandstorm.api.types import IsolationLevel, RuntimeCapabilities, RuntimeName
from sandstorm.errors import SnapshotUnsupported
from sandstorm.runtimes.cgroups import Limits, ResourceUsage, SandboxCgroups

#: The only environment a runtime's own processes see (runsc, ctr, QEMU, the jailer): nothing
#: of the gateway's, nothing of the request's.
HOST_ENV: Final = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: The agent's environment in every sandbox (it passes it on to what it runs).
AGENT_ENV: Final = (
    "PATH=/usr/local/bin:/usr/bin:/bin",
    "HOME=/workspace",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
)


class RuntimeStartError(Exception):
    """The runtime could not build or control a sandbox (its own command failed)."""


class InvalidSandboxId(RuntimeStartError):
    """A runtime was given a name that is not a sandbox id; it touches no path for it."""


@dataclass(frozen=True, slots=True)
class MountSpec:
    source: Path  # already resolved and checked against the allow-list
    destination: str
    read_only: bool


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a runtime needs to build one sandbox."""

    sandbox_id: str
    rootfs: Path
    cpu_limit: float
    memory_limit: int
    pids_limit: int
    mounts: tuple[MountSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Detection:
    available: bool
    binary: str | None
    version: str | None
    reason: str | None
    details: dict[str, str] = field(default_factory=dict)


class JournaledChannel(Protocol):
    """An agent channel whose stream a shim journals until the gateway acknowledges it, so a
    restarted gateway can resume it from a recorded offset."""

    #: Acknowledge every so many bytes on its own; off: only what :meth:`send_ack` says.
    auto_ack: bool

    @property
    def offset(self) -> int: ...

    async def send_ack(self, offset: int) -> None:
        """Everything before ``offset`` is durable on the gateway's side: the shim may drop it."""
        ...


class RuntimeInstance(Protocol):
    """One running sandbox: its agent channel and the host process that holds it."""

    @property
    def channel(self) -> AgentChannel: ...

    @property
    def journaled(self) -> JournaledChannel | None:
        """The channel when a shim journals it (the sandbox can outlive this gateway), else
        None."""
        ...

    async def wait(self) -> int:
        """Wait for the runtime process to exit and return its status."""
        ...

    @property
    def exited(self) -> bool:
        """Whether the runtime's host process has exited (and been reaped)."""
        ...

    def kill(self) -> None:
        """SIGKILL the runtime's host process (last resort of a teardown)."""
        ...

    async def detach(self) -> None:
        """Let go of the sandbox without stopping it (a gateway that shuts down and keeps its
        sandboxes for the next one)."""
        ...

    def diagnostics(self) -> str:
        """A short tail of the runtime's own log, for failure reasons."""
        ...


class SandboxRuntime(abc.ABC):
    """A runtime driver. Its sandboxes each live in a gateway-owned cgroup (``cgroups``), which
    holds their limits and answers usage and OOM questions."""

    name: ClassVar[RuntimeName]
    isolation_levels: ClassVar[tuple[IsolationLevel, ...]]
    capabilities: ClassVar[RuntimeCapabilities]
    #: Whether reaching the host cgroup's memory limit shows up as failed allocations inside
    #: the sandbox (gVisor's sentry sizes itself to the limit and answers ENOMEM) rather than
    #: as the kernel's OOM kill. Not for VMs: their host cgroup holds guest RAM that is always
    #: at its peak; their agent reports the guest kernel's OOM kills instead.
    allocations_fail_at_limit: ClassVar[bool] = False
    #: Whether the sandbox's writable filesystem is kept in its host cgroup's memory (gVisor's
    #: memory-backed overlay): filling it ends the whole sandbox for want of memory instead of
    #: failing a write with ENOSPC, so the gateway keeps an upload's room itself (see
    #: ``actors/sandbox/files.py``). A VM's guest filesystem has a size and answers ENOSPC.
    files_in_host_memory: ClassVar[bool] = False

    cgroups: SandboxCgroups

    @abc.abstractmethod
    async def detect(self) -> Detection:
        """Find the binary and check the host can run it; never raises."""

    @abc.abstractmethod
    async def start(self, spec: SandboxSpec) -> RuntimeInstance:
        """Boot a sandbox whose PID 1 is the agent. On failure nothing is left behind."""

    def snapshot_refusal(self, spec: SandboxSpec) -> str | None:
        """Why this sandbox cannot be snapshotted although the runtime can snapshot (422
        ``snapshot_unsupported``), or None."""
        return None

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        """Write the sandbox's full state into ``image_dir``; the sandbox stops afterwards.
        Raises :class:`SnapshotUnsupported` where the runtime offers no snapshots."""
        raise self._no_snapshots()

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> RuntimeInstance:
        """Start ``spec.sandbox_id`` from a checkpoint written by :meth:`checkpoint`."""
        raise self._no_snapshots()

    def _no_snapshots(self) -> SnapshotUnsupported:
        return SnapshotUnsupported(
            f"the {self.name} runtime does not offer snapshots", runtime=self.name
        )

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> list[str]:
        """Free everything the sandbox holds; idempotent, works without a live process.

        Returns a description of each thing that was actually released.
        """

    @abc.abstractmethod
    async def list_orphans(self, live: Callable[[], set[str]]) -> list[str]:
        """Sandbox ids this runtime still holds resources for that are not in ``live()``
        (called after the runtime has looked, so nothing booting meanwhile is missed)."""

    @abc.abstractmethod
    async def surviving(self) -> list[str]:
        """Sandbox ids still running from an earlier gateway (held by a live shim, or the
        runtime's equivalent), which :meth:`reattach` can resume; ``[]`` if it has none."""

    @abc.abstractmethod
    async def reattach(self, sandbox_id: str, offset: int) -> RuntimeInstance:
        """Resume a surviving sandbox: a new instance whose channel replays the agent stream
        from ``offset`` (``channel.offset`` of the last instance), then goes on live.
        Raises :class:`RuntimeStartError` with the reason when it cannot."""

    # ------------------------------------------------------------------ host resources

    @abc.abstractmethod
    def host_limits(self, spec: SandboxSpec) -> Limits:
        """The limits of the host cgroup around the whole sandbox."""

    def host_memory(self, spec: SandboxSpec) -> int:
        """Host memory the sandbox may take: its host cgroup's limit, which is ``memory_limit``
        plus whatever the runtime itself needs on top (a VMM's own memory). Admission control
        reserves this much, so VMs cannot overcommit the gateway's memory budget."""
        return self.host_limits(spec).memory_bytes

    def usage(self, sandbox_id: str) -> ResourceUsage:
        return ResourceUsage(
            self.cgroups.memory_bytes(sandbox_id), self.cgroups.cpu_time_ms(sandbox_id)
        )

    def out_of_memory(self, sandbox_id: str) -> bool:
        """Whether the sandbox hit its memory limit (call before destroy)."""
        return self.cgroups.out_of_memory(sandbox_id)

    def process_limit_hit(self, sandbox_id: str) -> bool:
        """Whether the sandbox's host processes reached their limit (call before destroy)."""
        return self.cgroups.process_limit_hit(sandbox_id)

    def exec_starting(self, sandbox_id: str, alone: bool) -> None:
        """An exec is about to start (``alone``: no other exec runs in the sandbox)."""
        if self.allocations_fail_at_limit and alone:
            self.cgroups.reset_memory_peak(sandbox_id)

    def exec_ran_out_of_memory(self, sandbox_id: str) -> bool:
        """Whether an exec that just failed did so because the sandbox was at its memory
        limit, for a runtime where that fails allocations instead of OOM-killing."""
        return self.allocations_fail_at_limit and self.cgroups.memory_peaked(sandbox_id)


# ------------------------------------------------------------------------ shared helpers


@contextlib.asynccontextmanager
async def rollback(undo: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """Run the block; when it raises (a cancellation too), run ``undo`` shielded from
    cancellation, then let the exception go on. What a failed start uses to leave nothing."""
    try:
        yield
    except BaseException:
        with trio.CancelScope(shield=True):
            await undo()
        raise


class _Process(Protocol):
    def kill(self) -> None: ...

    async def wait(self) -> int: ...


async def kill_and_wait(process: _Process) -> None:
    """SIGKILL ``process`` (a child, or a runtime instance) and wait until it is gone."""
    process.kill()
    await process.wait()


def tail(path: Path, size: int = 2048) -> str:
    """The last ``size`` bytes of a log file, as text; empty when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


async def run_control(
    argv: list[str],
    *,
    name: str,
    env: Mapping[str, str],
    timeout_s: float,
    error: type[RuntimeStartError],
    check: bool,
    failed: str = "",
    tail: int = 500,
) -> bytes:
    """Run a short control command of a runtime (``runsc kill``, ``ctr task ls``; ``name`` in
    messages), output captured and bounded in time. Raises ``error`` when it outlives
    ``timeout_s`` or, with ``check``, exits non-zero (``failed`` + the end of its stderr).
    Returns its stdout."""
    with trio.move_on_after(timeout_s) as scope:
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    if scope.cancelled_caught:
        raise error(f"{name} timed out after {timeout_s:.0f}s")
    if check and result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()[-tail:]
        raise error(f"{failed}{name} failed ({result.returncode}): {message}")
    return bytes(result.stdout)
