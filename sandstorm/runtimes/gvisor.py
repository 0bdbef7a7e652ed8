"""gVisor (runsc) as an OCI runtime: one bundle per sandbox, the agent as PID 1 on its stdio.

``runsc run`` is kept in the foreground of a per-sandbox shim (``sandstorm/shim``): its
stdin/stdout are the container's stdio, which is the agent channel, and its exit is the sandbox's
exit. The shim holds them, journals the output and serves them on a Unix socket, so a gateway
that dies (even SIGKILL) leaves the sandbox running and a new gateway reattaches (``surviving``,
``reattach``). (``create`` + ``start`` would cost a second runsc invocation on the cold path.)
Checkpoint stops the container (``--leave-running`` hangs in Debian's runsc), so "leave running"
is done by the caller as checkpoint then restore, whose stdio become the new agent channel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import msgspec
import trio

from sandstorm.agent import AGENT_DIRECTORY, AGENT_MOUNT_POINT, agent_command
from sandstorm.api.types import IsolationLevel, RuntimeCapabilities, RuntimeName
from sandstorm.config import DEFAULT_GVISOR_PLATFORM, GvisorPlatform
from sandstorm.ids import is_id
from sandstorm.runtimes.base import Detection, RuntimeStartError, SandboxSpec, run_control
from sandstorm.runtimes.cgroups import CgroupAccounting, Limits, SandboxCgroups
from sandstorm.runtimes.host_mounts import read_only_on_the_host, unmount_all
from sandstorm.shim import (
    DEFAULT_JOURNAL_MAX,
    ShimInstance,
    ShimPaths,
    attach,
    end_shim,
    live_shims,
    shim_paths,
    shim_process_ids,
    spawn_shim,
)

# The only environment runsc itself sees: nothing of the gateway's, nothing of the request's.
RUNSC_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
AGENT_ENV = [
    "PATH=/usr/local/bin:/usr/bin:/bin",
    "HOME=/workspace",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
]
SANDBOX_UID = 1000
PLATFORMS = frozenset(get_args(GvisorPlatform))
# The platform a sandbox was booted on, in its bundle and in each checkpoint image of it: an
# image restores only on the platform it was taken on (systrap's does not on ptrace). Absent
# (sandboxes and snapshots of gateways that passed no --platform): runsc's own default.
PLATFORM_FILE = "platform"
CONTROL_TIMEOUT_S = 15.0
# After runsc is told to stop, how long its shim may take to record the exit and leave.
SHIM_EXIT_GRACE_S = 3.0
# How long a checkpointed sandbox may take to stop and let runsc delete its container.
CHECKPOINT_EXIT_S = 1.0
STATE_MARK = "_sandbox:"  # in runsc's state file names, between container and sandbox id


class RunscError(RuntimeStartError):
    pass


class GvisorRuntime(CgroupAccounting):
    name: RuntimeName = "gvisor"
    isolation_levels: tuple[IsolationLevel, ...] = ("standard", "strong")
    capabilities = RuntimeCapabilities(snapshot=True, exec=True, streaming=True, network=False)
    # This runsc's sentry sizes itself to the host cgroup's limit: code that allocates past it
    # gets ENOMEM (MemoryError, bad_alloc, a failed mmap) and the sandbox lives on.
    allocations_fail_at_limit = True

    def __init__(
        self,
        search_paths: list[str],
        data_dir: Path,
        cgroups: SandboxCgroups,
        *,
        journal_max: int = DEFAULT_JOURNAL_MAX,
        platform: GvisorPlatform = DEFAULT_GVISOR_PLATFORM,
    ) -> None:
        self.search_paths = search_paths
        self.platform = platform
        self.data_dir = data_dir
        self.state_root = data_dir / "runsc"
        self.sandboxes_dir = data_dir / "sandboxes"
        self.shims_dir = data_dir / "shims"
        self.cgroups = cgroups
        self.journal_max = journal_max
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
                    env=RUNSC_ENV,
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
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.shims_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Detection(True, found, version, None)

    # ------------------------------------------------------------------ lifecycle

    def _bundle_dir(self, sandbox_id: str) -> Path:
        return self.sandboxes_dir / sandbox_id

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
            return read_platform(self._bundle_dir(sandbox_id))
        except RuntimeStartError:
            return None

    def _write_bundle(self, spec: SandboxSpec, platform: str | None) -> Path:
        bundle = self._bundle_dir(spec.sandbox_id)
        # The id is fresh random; an existing directory means a bug or an attack: refuse.
        bundle.mkdir(mode=0o700)
        if any(m.read_only for m in spec.mounts):
            spec = read_only_on_the_host(spec, bundle / "ro")
        config = oci_config(spec, self.cgroups.runtime_path(spec.sandbox_id))
        with open(bundle / "config.json", "wb") as f:
            f.write(msgspec.json.encode(config))
        write_platform(bundle, platform)
        return bundle

    def _shim_paths(self, sandbox_id: str) -> ShimPaths:
        return shim_paths(self.data_dir, sandbox_id)

    @property
    def _ack_every(self) -> int:
        return max(64 * 1024, self.journal_max // 4)

    async def _spawn(
        self, spec: SandboxSpec, platform: str | None, argv_tail: list[str]
    ) -> ShimInstance:
        log = self._bundle_dir(spec.sandbox_id) / "runsc.log"
        paths = self._shim_paths(spec.sandbox_id)
        # A restore after a checkpoint reuses the id: the last incarnation's shim has ended,
        # its journal and exit file go, and the new one starts from offset 0.
        await self._end_shim(paths, grace=0)
        # The shim runs runsc with the environment and limits it gets here (runsc sees only
        # PATH), in a session of its own: a terminal's Ctrl-C or a SIGKILL of the gateway's
        # process group reaches neither.
        process = await spawn_shim(
            paths,
            [*self._global_flags(log, platform), *argv_tail],
            env=RUNSC_ENV,
            journal_max=self.journal_max,
            log_path=log,
        )
        try:
            stream, handshake = await attach(paths, 0, just_started=True)
        except BaseException:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
            raise
        return ShimInstance(
            paths, stream, handshake, log, process=process, ack_every=self._ack_every
        )

    async def surviving(self) -> list[str]:
        """Sandbox ids whose shim is alive under this data directory and whose runtime has
        not exited (a restarted gateway reattaches to these)."""
        return live_shims(self.shims_dir, self._shim_paths)

    async def reattach(self, sandbox_id: str, offset: int) -> ShimInstance:
        """Connect to the live shim of ``sandbox_id`` and resume its agent stream at ``offset``
        (a frame boundary: ``channel.offset`` of the last instance). Output written meanwhile is
        replayed from the shim's journal, then the stream goes on live.

        Raises :class:`RuntimeStartError` with the reason when there is no live shim, its
        journal no longer holds ``offset``, or it does not answer.
        """
        if not is_id(sandbox_id, "sbx"):
            raise RuntimeStartError(f"not a sandbox id: {sandbox_id!r}")
        if offset < 0:
            raise RuntimeStartError(f"offset {offset} is negative")
        paths = self._shim_paths(sandbox_id)
        stream, handshake = await attach(paths, offset)
        log = self._bundle_dir(sandbox_id) / "runsc.log"
        return ShimInstance(paths, stream, handshake, log, ack_every=self._ack_every)

    async def _end_shim(self, paths: ShimPaths, *, grace: float) -> list[str]:
        return await end_shim(paths, grace=grace)

    async def start(self, spec: SandboxSpec) -> ShimInstance:
        try:
            self.cgroups.create(spec.sandbox_id, host_limits(spec))
            bundle = self._write_bundle(spec, self.platform)
            return await self._spawn(
                spec, self.platform, ["run", "--bundle", str(bundle), spec.sandbox_id]
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy(spec.sandbox_id)
            raise

    def snapshot_refusal(self, spec: SandboxSpec) -> str | None:
        return None

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        log = self._bundle_dir(spec.sandbox_id) / "runsc.log"
        platform = self._platform_of(spec.sandbox_id)
        await self._control(
            log, spec.sandbox_id, "checkpoint", "--image-path", str(image_dir), spec.sandbox_id
        )
        write_platform(image_dir, platform)
        # The checkpointed sandbox stops, and `runsc run` then deletes the container (~6 ms,
        # at times 100): not on the snapshot's path, but before a restore or a destroy of the
        # same sandbox (_await_name).
        self._checkpointed.add(spec.sandbox_id)

    async def _await_name(self, sandbox_id: str, log: Path) -> None:
        """After a checkpoint, until `runsc run` has deleted the stopped container, which frees
        its name for a restore: no kill and delete (two runsc processes, ~40 ms) on the way.
        One still there after a moment is stuck: see _free_name."""
        if sandbox_id not in self._checkpointed:
            return
        with trio.move_on_after(CHECKPOINT_EXIT_S):
            while self._has_state(sandbox_id):  # noqa: ASYNC110 - a file runsc owns
                await trio.sleep(0.005)
        self._checkpointed.discard(sandbox_id)
        await self._free_name(sandbox_id, log)

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> ShimInstance:
        bundle = self._bundle_dir(spec.sandbox_id)
        fresh = not bundle.exists()
        # The image's own platform, whatever this gateway boots new sandboxes on.
        platform = read_platform(image_dir)
        try:
            if fresh:
                self.cgroups.create(spec.sandbox_id, host_limits(spec))
                bundle = self._write_bundle(spec, platform)
            else:  # the same sandbox going on after its checkpoint (leave_running)
                await self._await_name(spec.sandbox_id, bundle / "runsc.log")
            return await self._spawn(
                spec,
                platform,
                ["restore", "--image-path", str(image_dir), "--bundle", str(bundle),
                 spec.sandbox_id],
            )  # fmt: skip
        except BaseException:
            if fresh:
                with trio.CancelScope(shield=True):
                    await self.destroy(spec.sandbox_id)
            raise

    async def destroy(self, sandbox_id: str) -> list[str]:
        released: list[str] = []
        bundle = self._bundle_dir(sandbox_id)
        log = bundle / "runsc.log" if bundle.exists() else self.state_root / "runsc.log"
        await self._await_name(sandbox_id, log)
        had_container = await self._free_name(sandbox_id, log)
        # runsc has exited now, so its shim records that and leaves; one that does not is killed
        # together with its `runsc run`. Killed in the middle of a boot, that may leave the
        # container half made (runsc's state, the sandbox in its cgroup): freed after it.
        shim_released = await self._end_shim(self._shim_paths(sandbox_id), grace=SHIM_EXIT_GRACE_S)
        had_container = await self._free_name(sandbox_id, log) or had_container
        if had_container:
            released.append(f"runsc container {sandbox_id}")
        released += shim_released
        released += await self.cgroups.release(sandbox_id, tries=20)
        if bundle.exists():
            # Never delete through a mount: it reaches the host's files (raises if one stays).
            detached = await trio.to_thread.run_sync(unmount_all, bundle)
            released += [f"read-only mount {point}" for point in detached]
            await trio.to_thread.run_sync(shutil.rmtree, bundle)
            released.append(f"bundle directory {bundle}")
        return released

    async def _free_name(self, sandbox_id: str, log: Path | None = None) -> bool:
        """Kill and delete the runsc container ``sandbox_id`` if runsc still has it (a stopped,
        checkpointed one included); returns whether it had. Killed first: a checkpoint that
        caught a process mid-fork (the zygote forking a standby) left a sandbox that `delete`
        alone waited 5 s for (3 in 10 here; none with the kill)."""
        if self.binary is None or not self._has_state(sandbox_id):
            return False
        if log is None:
            log = self._bundle_dir(sandbox_id) / "runsc.log"
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
        Not `runsc list`: it loads every container under its lock, and with 100 sandboxes
        booting on this 2-core host it took more than its 15 s bound."""
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
            env=RUNSC_ENV,
            timeout_s=CONTROL_TIMEOUT_S,
            error=RunscError,
            check=check,
        )

    # ------------------------------------------------------------------ observation

    def host_memory(self, spec: SandboxSpec) -> int:
        return host_limits(spec).memory_bytes

    def adjust_limits(self, old: SandboxSpec, new: SandboxSpec) -> None:
        """Set a live sandbox's host limits from ``old`` to ``new`` (a warm pool claim). The
        host cgroup is the only place they live (the OCI spec has none), so this is the same
        limit a sandbox booted with ``new`` gets. Raises OSError; the old limits are restored
        when the new ones could not be set in full."""
        try:
            self.cgroups.update(new.sandbox_id, host_limits(old), host_limits(new))
        except OSError:
            with contextlib.suppress(OSError):
                self.cgroups.update(new.sandbox_id, host_limits(new), host_limits(old))
            raise

    async def list_orphans(self, live: Callable[[], set[str]]) -> list[str]:
        held: set[str] = set()
        held |= await self.list_containers()
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.sandboxes_dir.iterdir()}
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.shims_dir.iterdir()}
        held |= set(await trio.to_thread.run_sync(shim_process_ids, self.shims_dir))
        held |= self.cgroups.list_ids()
        # Ask who is live only now, after the last await: a sandbox that started booting
        # while runsc listed its containers is in that set by the time we look.
        return sorted(i for i in held - live() if i.startswith("sbx_"))


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


def host_limits(spec: SandboxSpec) -> Limits:
    """Limits of the host cgroup around the whole sandbox. Under the ptrace platform every
    process in the sandbox costs about six host tasks (its stub and their threads; measured
    here: 46 tasks idle, 586 with 100 processes), so the host guard sits well above the
    in-sandbox process limit, which is what a fork bomb meets."""
    return Limits(spec.cpu_limit, spec.memory_limit, spec.pids_limit * 8 + 256)


def oci_config(spec: SandboxSpec, cgroups_path: str) -> dict[str, object]:
    """The OCI runtime spec for one sandbox (gVisor reads it from ``config.json``)."""
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": AGENT_MOUNT_POINT,
            "type": "bind",
            "source": str(AGENT_DIRECTORY),
            "options": ["rbind", "ro", "nosuid", "nodev"],
        },
    ]
    for m in spec.mounts:
        mounts.append(
            {
                "destination": m.destination,
                "type": "bind",
                "source": str(m.source),
                "options": ["rbind", "ro" if m.read_only else "rw", "nosuid", "nodev"],
            }
        )
    no_caps: list[str] = []
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID, "additionalGids": []},
            "args": list(agent_command()),
            "env": AGENT_ENV,
            "cwd": "/workspace",
            "noNewPrivileges": True,
            "capabilities": {
                k: no_caps for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
            },
            # The process limit is enforced inside gVisor (a fork bomb gets EAGAIN there); the
            # host cgroup's pids.max only guards the sentry's own threads.
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096},
                {"type": "RLIMIT_NPROC", "hard": spec.pids_limit, "soft": spec.pids_limit},
            ],
        },
        # Writable, but every write lands in the memory overlay (--overlay2=root:memory); the
        # shared image directory on the host is never written.
        "root": {"path": str(spec.rootfs), "readonly": False},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            # Limits are set on the gateway-owned parent group (see cgroups.py), not here.
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        },
    }


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)
