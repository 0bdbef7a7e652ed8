"""The ``SandboxRuntime`` protocol every runtime implements, and the values it passes around.

A runtime does only the platform work: detect itself, start a sandbox whose PID 1 is the agent and
hand back a byte channel to it, checkpoint, restore, destroy, and report usage. Processes, output,
per-exec limits and streaming belong to the agent protocol, shared by every runtime.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from sandstorm.agent import AgentChannel
from sandstorm.protocol import IsolationLevel, RuntimeCapabilities, RuntimeName


class RuntimeStartError(Exception):
    """The runtime could not build or control a sandbox (its own command failed)."""


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


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    memory_bytes: int
    cpu_time_ms: float


class RuntimeInstance(Protocol):
    """One running sandbox: its agent channel and the host process that holds it."""

    @property
    def channel(self) -> AgentChannel: ...

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

    def diagnostics(self) -> str:
        """A short tail of the runtime's own log, for failure reasons."""
        ...


class SandboxRuntime(Protocol):
    name: RuntimeName
    isolation_levels: tuple[IsolationLevel, ...]
    capabilities: RuntimeCapabilities

    async def detect(self) -> Detection:
        """Find the binary and check the host can run it; never raises."""
        ...

    async def start(self, spec: SandboxSpec) -> RuntimeInstance:
        """Boot a sandbox whose PID 1 is the agent. On failure nothing is left behind."""
        ...

    def snapshot_refusal(self, spec: SandboxSpec) -> str | None:
        """Why this sandbox cannot be snapshotted although the runtime can snapshot (422
        ``snapshot_unsupported``), or None."""
        ...

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        """Write the sandbox's full state into ``image_dir``; the sandbox stops afterwards."""
        ...

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> RuntimeInstance:
        """Start ``spec.sandbox_id`` from a checkpoint written by :meth:`checkpoint`."""
        ...

    async def destroy(self, sandbox_id: str) -> list[str]:
        """Free everything the sandbox holds; idempotent, works without a live process.

        Returns a description of each thing that was actually released.
        """
        ...

    def usage(self, sandbox_id: str) -> ResourceUsage: ...

    def host_memory(self, spec: SandboxSpec) -> int:
        """Host memory the sandbox may take: its host cgroup's limit, which is ``memory_limit``
        plus whatever the runtime itself needs on top (a VMM's own memory). Admission control
        reserves this much, so VMs cannot overcommit the gateway's memory budget."""
        ...

    def out_of_memory(self, sandbox_id: str) -> bool:
        """Whether the sandbox hit its memory limit (call before destroy)."""
        ...

    def exec_starting(self, sandbox_id: str, alone: bool) -> None:
        """An exec is about to start (``alone``: no other exec runs in the sandbox)."""
        ...

    def exec_ran_out_of_memory(self, sandbox_id: str) -> bool:
        """Whether an exec that just failed did so because the sandbox was at its memory
        limit, for a runtime where that fails allocations instead of OOM-killing."""
        ...

    async def list_orphans(self, live: Callable[[], set[str]]) -> list[str]:
        """Sandbox ids this runtime still holds resources for that are not in ``live()``
        (called after the runtime has looked, so nothing booting meanwhile is missed)."""
        ...

    async def surviving(self) -> list[str]:
        """Sandbox ids still running from an earlier gateway (held by a live shim, or the
        runtime's equivalent), which :meth:`reattach` can resume; ``[]`` if it has none."""
        ...

    async def reattach(self, sandbox_id: str, offset: int) -> RuntimeInstance:
        """Resume a surviving sandbox: a new instance whose channel replays the agent stream
        from ``offset`` (``channel.offset`` of the last instance), then goes on live.
        Raises :class:`RuntimeStartError` with the reason when it cannot."""
        ...


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
