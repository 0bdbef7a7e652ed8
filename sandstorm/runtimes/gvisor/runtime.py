"""gVisor (runsc) as an OCI runtime: one bundle per sandbox, the agent as PID 1 on its stdio.

``runsc run`` is kept in the foreground of a per-sandbox shim (``shimmed.py``): its stdin/stdout
are the container's stdio, which is the agent channel, and its exit is the sandbox's exit.
(``create`` + ``start`` would cost a second runsc invocation on the cold path.)
Checkpoint stops the container (``--leave-running`` hangs in Debian's runsc), so "leave running"
is done by the caller as checkpoint then restore, whose stdio become the new agent channel.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Final, get_args

import msgspec
import trio

from sandstorm.api.types import IsolationLevel, RuntimeCapabilities
from sandstorm.config import DEFAULT_GVISOR_PLATFORM, GvisorPlatform
from sandstorm.runtimes.base import (
    HOST_ENV,
    Detection,
    RuntimeStartError,
    SandboxSpec,
    rollback,
    run_control,
)
from sandstorm.runtimes.cgroups import Limits, SandboxCgroups
from sandstorm.runtimes.oci import oci_config
from sandstorm.runtimes.shimmed import ShimInstance, ShimmedRuntime
from sandstorm.shim import DEFAULT_JOURNAL_MAX

PLATFORMS = frozenset(get_args(GvisorPlatform))
# The platform a sandbox was booted on, in its bundle and in each checkpoint image of it: an
# image restores only on the platform it was taken on (systrap's does not on ptrace). Absent
# (sandboxes and snapshots of gateways that passed no --platform): runsc's own default.
PLATFORM_FILE = "platform"
CONTROL_TIMEOUT_S = 15.0
# How long a checkpointed sandbox may take to stop and let runsc delete its container.
CHECKPOINT_EXIT_S = 1.0
STATE_MARK = "_sandbox:"  # in runsc's state file names, between container and sandbox id
HOST_TASKS_PER_PROCESS: Final = 24  # host tasks allowed per in-sandbox process (host_limits)


class RunscError(RuntimeStartError):
    pass


class GvisorRuntime(ShimmedRuntime):
    name = "gvisor"
    isolation_levels: ClassVar[tuple[IsolationLevel, ...]] = ("standard", "strong")
    capabilities = RuntimeCapabilities(snapshot=True, exec=True, streaming=True, network=False)
    files_in_host_memory = True
    # This runsc's sentry sizes itself to the host cgroup's limit: code that allocates past it
    # gets ENOMEM (MemoryError, bad_alloc, a failed mmap) and the sandbox lives on.
    allocations_fail_at_limit = True
    log_name = "runsc.log"

    def __init__(
        self,
        search_paths: list[str],
        data_dir: Path,
        cgroups: SandboxCgroups,
        *,
        journal_max: int = DEFAULT_JOURNAL_MAX,
        platform: GvisorPlatform = DEFAULT_GVISOR_PLATFORM,
    ) -> None:
        super().__init__(
            cgroups, workdirs=data_dir / "sandboxes", shim_root=data_dir, journal_max=journal_max
        )
        self.search_paths = search_paths
        self.platform = platform
        self.data_dir = data_dir
        self.state_root = data_dir / "runsc"
        self.binary: str | None = None
        # Checkpointed, their containers maybe still being deleted by `runsc run` (_await_name).
        self._checkpointed: set[str] = set()

    # ------------------------------------------------------------------ detection

    async def detect(self) -> Detection:
        found = next((p for p in self.search_paths if _is_executable(p)), None)
        if found is None:
            return Detection(False, None, None, "not found at " + ", ".join(self.search_paths))
        found = os.path.abspath(found)
        # A broken binary makes the runtime unavailable, with the reason; never the gateway.
        try:
            with trio.move_on_after(CONTROL_TIMEOUT_S) as scope:
                result = await trio.run_process(
                    [found, "--version"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=HOST_ENV,
                )
        except OSError as exc:
            return Detection(False, found, None, f"{found} cannot be run: {exc}")
        if scope.cancelled_caught:
            reason = f"`{found} --version` did not answer within {CONTROL_TIMEOUT_S:.0f}s"
            return Detection(False, found, None, reason)
        if result.returncode != 0:
            said = result.stderr.decode(errors="replace").strip()[-300:]
            reason = f"`{found} --version` failed (exit status {result.returncode}): {said}"
            return Detection(False, found, None, reason)
        first = result.stdout.decode(errors="replace").splitlines()[:1]
        version = first[0].removeprefix("runsc version ").strip() if first else "unknown"
        if os.geteuid() != 0:
            return Detection(False, found, version, "runsc needs root to create sandboxes")
        self.binary = found
        self.state_root.mkdir(parents=True, exist_ok=True)
        self.workdirs.mkdir(parents=True, exist_ok=True)
        self.shims_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Detection(True, found, version, None)

    # ------------------------------------------------------------------ lifecycle

    def _global_flags(self, log: Path, platform: str | None) -> list[str]:
        assert self.binary is not None, "detect() first"
        return [
            self.binary,
            "--root", str(self.state_root),
            *([f"--platform={platform}"] if platform is not None else []),
            "--network=none",
            "--overlay2=root:memory",
            "--log", str(log),
        ]  # fmt: skip

    def _platform_of(self, sandbox_id: str) -> str | None:
        """The platform ``sandbox_id`` was booted on (PLATFORM_FILE), None for runsc's
        default (and for a bundle whose file is unreadable: teardown must not fail on it)."""
        try:
            return read_platform(self._workdir(sandbox_id))
        except RuntimeStartError:
            return None

    def _write_bundle(self, spec: SandboxSpec, platform: str | None) -> Path:
        bundle = self._workdir(spec.sandbox_id)
        config = oci_config(spec, self.cgroups.runtime_path(spec.sandbox_id))
        with open(bundle / "config.json", "wb") as f:
            f.write(msgspec.json.encode(config))
        write_platform(bundle, platform)
        return bundle

    async def _run(self, spec: SandboxSpec, platform: str | None, *args: str) -> ShimInstance:
        """``runsc <args>`` under the sandbox's shim, booted on ``platform``."""
        log = self._log(spec.sandbox_id)
        return await self._spawn(spec.sandbox_id, [*self._global_flags(log, platform), *args])

    async def _boot(self, spec: SandboxSpec) -> ShimInstance:
        bundle = self._write_bundle(spec, self.platform)
        return await self._run(spec, self.platform, "run", "--bundle", str(bundle), spec.sandbox_id)

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        log = self._log(spec.sandbox_id)
        platform = self._platform_of(spec.sandbox_id)
        await self._control(
            log, spec.sandbox_id, "checkpoint", "--image-path", str(image_dir), spec.sandbox_id
        )
        write_platform(image_dir, platform)
        # The checkpointed sandbox stops, and `runsc run` then deletes the container: not on
        # the snapshot's path, but before a restore or a destroy of the same sandbox
        # (_await_name).
        self._checkpointed.add(spec.sandbox_id)

    async def _await_name(self, sandbox_id: str, log: Path) -> None:
        """After a checkpoint, until `runsc run` has deleted the stopped container, which frees
        its name for a restore: no kill and delete (two runsc processes) on the way.
        One still there after a moment is stuck: see _free_name."""
        if sandbox_id not in self._checkpointed:
            return
        with trio.move_on_after(CHECKPOINT_EXIT_S):
            while self._has_state(sandbox_id):  # noqa: ASYNC110 - a file runsc owns
                await trio.sleep(0.005)
        self._checkpointed.discard(sandbox_id)
        await self._free_name(sandbox_id, log)

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> ShimInstance:
        bundle = self._workdir(spec.sandbox_id)
        fresh = not bundle.exists()
        # The image's own platform, whatever this gateway boots new sandboxes on.
        platform = read_platform(image_dir)
        destroy = functools.partial(self.destroy, spec.sandbox_id)
        async with rollback(destroy) if fresh else contextlib.nullcontext():
            if fresh:
                self._write_bundle(self._prepare(spec), platform)
            else:  # the same sandbox going on after its checkpoint (leave_running)
                await self._await_name(spec.sandbox_id, self._log(spec.sandbox_id))
            return await self._run(
                spec, platform,
                "restore", "--image-path", str(image_dir), "--bundle", str(bundle),
                spec.sandbox_id,
            )  # fmt: skip

    # ------------------------------------------------------------------ teardown

    def _teardown_log(self, sandbox_id: str) -> Path:
        bundle = self._workdir(sandbox_id)
        return bundle / self.log_name if bundle.exists() else self.state_root / self.log_name

    async def _stop_runtime(self, sandbox_id: str) -> list[str]:
        log = self._teardown_log(sandbox_id)
        await self._await_name(sandbox_id, log)
        return self._container_released(sandbox_id, await self._free_name(sandbox_id, log))

    async def _free_runtime(self, sandbox_id: str) -> list[str]:
        # A shim killed in the middle of a boot may leave the container half made (runsc's
        # state, the sandbox in its cgroup).
        log = self._teardown_log(sandbox_id)
        return self._container_released(sandbox_id, await self._free_name(sandbox_id, log))

    @staticmethod
    def _container_released(sandbox_id: str, had: bool) -> list[str]:
        return [f"runsc container {sandbox_id}"] if had else []

    async def _free_name(self, sandbox_id: str, log: Path | None = None) -> bool:
        """Kill and delete the runsc container ``sandbox_id`` if runsc still has it (a stopped,
        checkpointed one included); returns whether it had. Killed first: after a checkpoint that
        caught a process mid-fork (the zygote forking a standby), `delete` alone waits seconds
        for the sandbox."""
        if self.binary is None or not self._has_state(sandbox_id):
            return False
        if log is None:
            log = self._log(sandbox_id)
        await self._control(log, sandbox_id, "kill", "--all", sandbox_id, "KILL", check=False)
        await self._control(log, sandbox_id, "delete", "--force", sandbox_id, check=False)
        return True

    def _state_files(self, sandbox_id: str = "*") -> Iterator[Path]:
        # runsc keeps "<id>_sandbox:<sandbox id>.state" under --root while a container exists;
        # looking at the files costs nothing, asking `runsc list` costs a process.
        return self.state_root.glob(f"{sandbox_id}{STATE_MARK}*.state")

    def _has_state(self, sandbox_id: str) -> bool:
        return any(self._state_files(sandbox_id))

    async def list_containers(self) -> set[str]:
        """The containers runsc holds under its root, from its state files (_state_files).
        Not `runsc list`: it loads every container under its lock, which with many sandboxes
        booting outlasts its time bound."""
        if self.binary is None:
            return set()

        def scan() -> set[str]:
            return {path.name.split(STATE_MARK, 1)[0] for path in self._state_files()}

        return await trio.to_thread.run_sync(scan)

    async def _control(
        self, log: Path, sandbox_id: str | None, *args: str, check: bool = True
    ) -> bytes:
        """Run a short runsc subcommand on ``sandbox_id``'s container, with the platform it
        was booted on (None: on no container, with the configured platform); bounded in time,
        output captured."""
        assert self.binary is not None
        platform = self.platform if sandbox_id is None else self._platform_of(sandbox_id)
        return await run_control(
            [*self._global_flags(log, platform), *args],
            name=f"runsc {args[0]}",
            env=HOST_ENV,
            timeout_s=CONTROL_TIMEOUT_S,
            error=RunscError,
            check=check,
        )

    # ------------------------------------------------------------------ host resources

    @staticmethod
    def host_limits(spec: SandboxSpec) -> Limits:
        """Under the ptrace platform every process in the sandbox costs many host tasks (its
        address space's stub process, one stub thread per sentry thread that has run it, and
        those sentry threads), so the host guard sits far above the in-sandbox process limit,
        which is what a fork bomb must meet first: at the host guard the sentry itself can no
        longer start a thread, and the whole sandbox dies. docs/security.md has the measured
        cost per process."""
        return Limits(
            spec.cpu_limit, spec.memory_limit, spec.pids_limit * HOST_TASKS_PER_PROCESS + 256
        )

    def adjust_limits(self, old: SandboxSpec, new: SandboxSpec) -> None:
        """Set a live sandbox's host limits from ``old`` to ``new`` (a warm pool claim). The
        host cgroup is the only place they live (the OCI spec has none), so this is the same
        limit a sandbox booted with ``new`` gets. Raises OSError; the old limits are restored
        when the new ones could not be set in full."""
        before, after = self.host_limits(old), self.host_limits(new)
        try:
            self.cgroups.update(new.sandbox_id, before, after)
        except OSError:
            with contextlib.suppress(OSError):
                self.cgroups.update(new.sandbox_id, after, before)
            raise

    async def _runtime_held(self) -> set[str]:
        # The sandbox cgroups under the gateway's parent group too.
        return await self.list_containers() | self.cgroups.list_ids()


def write_platform(directory: Path, platform: str | None) -> None:
    """Record ``platform`` in ``directory`` for read_platform; None records nothing (runsc's
    default, as a gateway that passed no --platform)."""
    if platform is not None:
        (directory / PLATFORM_FILE).write_text(platform + "\n")


def read_platform(directory: Path) -> str | None:
    """The platform recorded in ``directory`` (a bundle, a checkpoint image): None when there
    is none (runsc's default). Raises RuntimeStartError for one runsc would not know."""
    try:
        platform = (directory / PLATFORM_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RuntimeStartError(f"cannot read the gVisor platform in {directory}: {exc}") from exc
    if platform not in PLATFORMS:
        raise RuntimeStartError(f"unknown gVisor platform {platform!r} in {directory}")
    return platform


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)
