"""Runtimes whose sandboxes a shim holds (gVisor, Kata, QEMU): the life cycle they share.

The runtime's foreground command (``runsc run``, ``ctr run``, ``qemu-system-x86_64``) runs under
a per-sandbox shim (``sandstorm/shim``) whose stdin/stdout are the agent channel. The shim
journals the output and serves it on a Unix socket, so a gateway that dies (even SIGKILL) leaves
the sandbox running and a new gateway reattaches (``surviving``, ``reattach``).

This base owns the shim and the sandbox's directory: spawning and attaching (a shim that cannot
be attached to is killed), ``surviving``, ``reattach``, ``list_orphans``, and the order of
``destroy`` (stop the runtime, end the shim, free what the runtime left, the cgroup, the
directory), which is idempotent and passes over whatever is already gone. A driver supplies its
command line (``_boot``), its log's name and how to stop its runtime (``_stop_runtime``,
``_free_runtime``).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import trio

from sandstorm.ids import is_id
from sandstorm.runtimes.base import (
    HOST_ENV,
    InvalidSandboxId,
    RuntimeStartError,
    SandboxRuntime,
    SandboxSpec,
    kill_and_wait,
    rollback,
    tail,
)
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.host_mounts import read_only_on_the_host, unmount_all
from sandstorm.shim import (
    Handshake,
    ShimAttachError,
    ShimChannel,
    ShimPaths,
    attach,
    end_shim,
    is_shim_process,
    live_shims,
    pidfd_of_child,
    read_exit_status,
    shim_paths,
    shim_process_ids,
    spawn_shim,
)

#: After the runtime is told to stop, how long its shim may take to record the exit and leave.
SHIM_EXIT_GRACE_S = 3.0


class ShimInstance:
    """A sandbox held by a shim: the ``RuntimeInstance`` of the shim-held runtimes.

    ``process`` is the shim when this gateway started it (it is reaped here); after a restart
    the shim is someone else's child and only its pidfd is watched.
    """

    def __init__(
        self,
        paths: ShimPaths,
        stream: trio.SocketStream,
        handshake: Handshake,
        log_path: Path,
        *,
        process: trio.Process | None = None,
        ack_every: int,
    ) -> None:
        self.paths = paths
        self.log_path = log_path
        self.process = process
        self.handshake = handshake
        self.shim_pid = handshake.shim_pid
        self.runtime_pid = handshake.runtime_pid
        self._channel = ShimChannel(stream, offset=handshake.start_offset, ack_every=ack_every)
        self._status: int | None = None
        self._wait_lock = trio.Lock()
        self._runtime_pidfd = pidfd_of_child(handshake.runtime_pid, handshake.shim_pid)
        self._shim_pidfd: int | None = None
        if process is None:
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(handshake.shim_pid)
                if is_shim_process(handshake.shim_pid, paths):
                    self._shim_pidfd = fd
                else:
                    os.close(fd)

    @property
    def channel(self) -> ShimChannel:
        return self._channel

    @property
    def journaled(self) -> ShimChannel:
        return self._channel

    @property
    def exited(self) -> bool:
        return self._status is not None

    async def wait(self) -> int:
        """Wait until the shim is gone; the runtime's exit status, as the shim recorded it
        (``-SIGKILL`` when the shim died without recording one)."""
        async with self._wait_lock:
            if self._status is not None:
                return self._status
            if self.process is not None:
                shim_status = await self.process.wait()
            else:
                if self._shim_pidfd is not None:
                    await trio.lowlevel.wait_readable(self._shim_pidfd)
                    # Our child after all (the gateway that started it is this process).
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(self.shim_pid, os.WNOHANG)  # noqa: ASYNC222 - it has exited
                shim_status = -signal.SIGKILL
            status = read_exit_status(self.paths)
            self._status = status if status is not None else min(shim_status, -1)
            self._close_pidfds()
            # The shim is gone, so is the other end: nothing more can come or go on it.
            self._channel.close_now()
            return self._status

    def kill(self) -> None:
        """SIGKILL the runtime, then the shim (the last resort of a teardown)."""
        if self._status is not None:
            return
        for fd in (self._runtime_pidfd, self._shim_pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def detach(self) -> None:
        """Let go of the sandbox without stopping it (a gateway that shuts down and keeps its
        sandboxes). The shim stays; a later attach resumes from the channel's offset."""
        await self._channel.detach()
        self._close_pidfds()

    def _close_pidfds(self) -> None:
        for fd in (self._runtime_pidfd, self._shim_pidfd):
            if fd is not None:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
        self._runtime_pidfd = self._shim_pidfd = None

    def diagnostics(self) -> str:
        return tail(self.log_path)


class ShimmedRuntime(SandboxRuntime):
    """The shared part of a shim-held runtime. Each sandbox has a directory of its own under
    ``workdirs`` (its bundle, or its VM's files) and a shim under ``shim_root``; a runtime's
    shims live apart from every other runtime's, so none takes another's sandboxes for its own."""

    #: The runtime's log (and its shim's), in the sandbox's directory.
    log_name: ClassVar[str]
    #: How ``destroy`` names the sandbox's directory in what it released.
    directory_word: ClassVar[str] = "bundle directory"
    instance_class: ClassVar[type[ShimInstance]] = ShimInstance
    #: Whether read-only mounts are made read-only on the host too before the runtime sees
    #: them (``host_mounts``): for a runtime that must not be the only guard.
    guard_read_only_mounts: ClassVar[bool] = True
    #: How many times (50 ms apart) a teardown tries to remove the cgroup of a dying sandbox.
    cgroup_release_tries: ClassVar[int] = 20

    def __init__(
        self, cgroups: SandboxCgroups, *, workdirs: Path, shim_root: Path, journal_max: int
    ) -> None:
        self.cgroups = cgroups
        self.workdirs = workdirs
        self.shim_root = shim_root
        self.shims_dir = shim_root / "shims"
        self.journal_max = journal_max

    def _workdir(self, sandbox_id: str) -> Path:
        return self.workdirs / sandbox_id

    def _log(self, sandbox_id: str) -> Path:
        return self._workdir(sandbox_id) / self.log_name

    def _shim_paths(self, sandbox_id: str) -> ShimPaths:
        return shim_paths(self.shim_root, sandbox_id)

    @property
    def _ack_every(self) -> int:
        return max(64 * 1024, self.journal_max // 4)

    # ------------------------------------------------------------------ start

    async def start(self, spec: SandboxSpec) -> ShimInstance:
        async with rollback(functools.partial(self.destroy, spec.sandbox_id)):
            return await self._boot(self._prepare(spec))

    def _prepare(self, spec: SandboxSpec) -> SandboxSpec:
        """The sandbox's host cgroup and directory; returns ``spec``, its read-only mounts made
        read-only on the host where this runtime guards them."""
        self.cgroups.create(spec.sandbox_id, self.host_limits(spec))
        directory = self._workdir(spec.sandbox_id)
        # The id is fresh random; an existing directory means a bug or an attack: refuse.
        directory.mkdir(mode=0o700)
        if self.guard_read_only_mounts and any(m.read_only for m in spec.mounts):
            spec = read_only_on_the_host(spec, directory / "ro")
        return spec

    @abc.abstractmethod
    async def _boot(self, spec: SandboxSpec) -> ShimInstance:
        """Write what the runtime reads, then :meth:`_spawn` it (the cgroup and the directory
        exist; a failure is rolled back by :meth:`destroy`)."""

    async def _spawn(
        self, sandbox_id: str, argv: list[str], *, cwd: Path | None = None
    ) -> ShimInstance:
        """Start the shim that runs ``argv`` and attach to it."""
        paths = self._shim_paths(sandbox_id)
        log = self._log(sandbox_id)
        # A restore after a checkpoint reuses the id: the last incarnation's shim has ended,
        # its journal and exit file go, and the new one starts from offset 0.
        await end_shim(paths, grace=0)
        # The runtime gets only HOST_ENV; the shim runs in a session of its own, so a
        # terminal's Ctrl-C or a SIGKILL of the gateway's process group reaches neither.
        process = await spawn_shim(
            paths, argv, env=HOST_ENV, journal_max=self.journal_max, log_path=log, cwd=cwd
        )
        async with rollback(functools.partial(kill_and_wait, process)):
            stream, handshake = await _attach(paths, 0, just_started=True)
        return self.instance_class(
            paths, stream, handshake, log, process=process, ack_every=self._ack_every
        )

    # ------------------------------------------------------------------ after a restart

    async def surviving(self) -> list[str]:
        """Sandbox ids whose shim is alive and whose runtime has not exited (a restarted
        gateway reattaches to these)."""
        return live_shims(self.shims_dir, self._shim_paths)

    async def reattach(self, sandbox_id: str, offset: int) -> ShimInstance:
        """Connect to the live shim of ``sandbox_id`` and resume its agent stream at ``offset``
        (a frame boundary: ``channel.offset`` of the last instance). Output written meanwhile is
        replayed from the shim's journal, then the stream goes on live.

        Raises :class:`RuntimeStartError` with the reason when there is no live shim, its
        journal no longer holds ``offset``, or it does not answer.
        """
        if not is_id(sandbox_id, "sbx"):
            raise InvalidSandboxId(f"not a sandbox id: {sandbox_id!r}")
        if offset < 0:
            raise RuntimeStartError(f"offset {offset} is negative")
        paths = self._shim_paths(sandbox_id)
        stream, handshake = await _attach(paths, offset)
        log = self._log(sandbox_id)
        return self.instance_class(paths, stream, handshake, log, ack_every=self._ack_every)

    async def list_orphans(self, live: Callable[[], set[str]]) -> list[str]:
        held = await self._runtime_held()
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.workdirs.iterdir()}
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.shims_dir.iterdir()}
        held |= set(await trio.to_thread.run_sync(shim_process_ids, self.shims_dir))
        # Ask who is live only now, after the last await: a sandbox that started booting
        # while the runtime listed its own is in that set by the time we look.
        return sorted(i for i in held - live() if is_id(i, "sbx"))

    async def _runtime_held(self) -> set[str]:
        """Sandbox ids the runtime itself still holds something for (its containers)."""
        return set()

    # ------------------------------------------------------------------ teardown

    async def destroy(self, sandbox_id: str) -> list[str]:
        released = await self._stop_runtime(sandbox_id)
        # The runtime has exited now, so its shim records that and leaves; one that does not
        # is killed together with its runtime process.
        released += await end_shim(self._shim_paths(sandbox_id), grace=SHIM_EXIT_GRACE_S)
        released += [r for r in await self._free_runtime(sandbox_id) if r not in released]
        released += await self.cgroups.release(sandbox_id, tries=self.cgroup_release_tries)
        directory = self._workdir(sandbox_id)
        if directory.exists():
            # Never delete through a mount: it reaches the host's files (raises if one stays).
            detached = await trio.to_thread.run_sync(unmount_all, directory)
            released += [f"read-only mount {point}" for point in detached]
            if await trio.to_thread.run_sync(_remove_tree, directory):
                released.append(f"{self.directory_word} {directory}")
        return released

    @abc.abstractmethod
    async def _stop_runtime(self, sandbox_id: str) -> list[str]:
        """Stop the sandbox's runtime if it still runs (its shim then leaves on its own);
        what was released."""

    async def _free_runtime(self, sandbox_id: str) -> list[str]:
        """After the shim is gone: free what the runtime may have left (a boot killed half-way);
        what was released."""
        return []


_ExcInfo = tuple[type[BaseException], BaseException, TracebackType]


def _remove_tree(directory: Path) -> bool:
    """Remove ``directory`` and everything in it; False if it was gone already. What vanishes
    meanwhile (a second teardown of the same sandbox) is released, not an error."""

    def missing_is_released(_function: object, _path: str, info: _ExcInfo) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    try:
        os.lstat(directory)
    except FileNotFoundError:
        return False
    shutil.rmtree(directory, onerror=missing_is_released)
    return True


async def _attach(
    paths: ShimPaths, offset: int, *, just_started: bool = False
) -> tuple[trio.SocketStream, Handshake]:
    try:
        return await attach(paths, offset, just_started=just_started)
    except ShimAttachError as exc:
        raise RuntimeStartError(str(exc)) from None
