"""QEMU microVMs (``-M microvm``): the VM tier on hosts without Kata or Firecracker.

One ``qemu-system-x86_64`` process per sandbox, kept in the foreground of a per-sandbox shim
(``shimmed.py``) exactly like ``runsc run``: its stdin/stdout are the agent channel, which the
shim holds and journals, so a VM outlives a gateway that dies and a new one reattaches. The shim
runs in the VM directory: QEMU makes its QMP socket there by a relative path (see qmp.py). The
command line is ``argv.py``'s; the guest and its initramfs are ``guest.py``'s.

KVM is used only when a probe VM really boots under it (``/dev/kvm`` can exist and still not run
guests); otherwise TCG. Checkpoint: QMP ``stop``, then ``migrate`` to a file descriptor passed
over the QMP socket, then ``quit``; restore: the same command line with ``-incoming defer``, then
the snapshot's descriptor over QMP (``getfd`` + ``migrate-incoming``), so the shim passes QEMU
nothing but its stdio. Guest writes live in guest RAM (a tmpfs overlay), so the memory image is
the whole sandbox state.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

import trio

from sandstorm.agent import agent_command
from sandstorm.api.types import MIB, IsolationLevel, RuntimeCapabilities
from sandstorm.images.vm import load_vm_manifest, vm_dir
from sandstorm.runtimes.base import (
    HOST_ENV,
    Detection,
    RuntimeStartError,
    SandboxSpec,
    kill_and_wait,
    rollback,
    tail,
)
from sandstorm.runtimes.cgroups import Limits, SandboxCgroups
from sandstorm.runtimes.detection import first_executable, not_found, read_version
from sandstorm.runtimes.guest import MIN_GUEST_RAM, agent_initrd, guest_ram
from sandstorm.runtimes.qemu.argv import qemu_argv, with_shares
from sandstorm.runtimes.qemu.qmp import Qmp, QmpError
from sandstorm.runtimes.shimmed import ShimInstance, ShimmedRuntime
from sandstorm.shim import DEFAULT_JOURNAL_MAX, ShimPaths, read_pids

#: QEMU's own memory on top of guest RAM: the TCG translation cache (capped in argv.py), device
#: state and its heap. The host cgroup's limit is guest RAM plus this.
QEMU_OVERHEAD = 256 * MIB
HOST_PIDS = 512  # QEMU threads: one per vCPU, the I/O thread and the block worker pool
PROBE_TIMEOUT_S = 8.0
#: What the guest kernel prints (at KERN_ERR, so past ``loglevel=4``) when its OOM killer kills.
GUEST_OOM_MESSAGE = "Out of memory: Killed process"
CONTROL_TIMEOUT_S = 60.0
STATE_FILE = "memory.qemu"
LAUNCH_FILE = "qemu.json"
INITRD_FILE = "initrd.cpio"
_probe_cache: dict[str, str] = {}


class QemuError(RuntimeStartError):
    pass


class QemuInstance(ShimInstance):
    """A QEMU process held by its shim; ``runtime_pid`` is QEMU's, ``log_path`` its qemu.log."""

    def diagnostics(self) -> str:
        """QEMU's own errors (qemu.log, with the shim's), then the tail of the guest's console."""
        parts = [tail(self.log_path), tail(self.log_path.with_name("console.log"))]
        return "\n".join(p for p in parts if p)


class QemuRuntime(ShimmedRuntime):
    name = "qemu"
    isolation_levels: ClassVar[tuple[IsolationLevel, ...]] = ("strong", "maximum")
    capabilities = RuntimeCapabilities(snapshot=True, exec=True, streaming=True, network=False)
    log_name = "qemu.log"
    directory_word = "VM directory"
    instance_class = QemuInstance
    # Guest RAM can take a while to be freed after QEMU is killed.
    cgroup_release_tries = 40

    def __init__(
        self,
        search_paths: list[str],
        data_dir: Path,
        image: str,
        cgroups: SandboxCgroups,
        *,
        journal_max: int = DEFAULT_JOURNAL_MAX,
    ) -> None:
        super().__init__(
            cgroups,
            workdirs=data_dir / "qemu",
            shim_root=data_dir / "qemu-shim",
            journal_max=journal_max,
        )
        self.search_paths = search_paths
        self.data_dir = data_dir
        self.image = image
        self.cache_dir = data_dir / "qemu-cache"
        self.binary: str | None = None
        self.accel = "tcg"

    # ------------------------------------------------------------------ detection

    async def detect(self) -> Detection:
        binary = first_executable(self.search_paths)
        if binary is None:
            return Detection(False, None, None, not_found(self.search_paths) + " (PATH)")
        line = await read_version([binary, "--version"])
        version = (line or "unknown").removeprefix("QEMU emulator version ").strip()
        if os.geteuid() != 0:
            return Detection(False, binary, version, "the qemu runtime needs root (cgroups)")
        if load_vm_manifest(self.data_dir, self.image) is None:
            return Detection(
                False, binary, version, "no VM image: run `sandstorm image build --vm`"
            )
        self.binary = binary
        self.workdirs.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.shims_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.accel = await self._probe_accel()
        details = {"accel": self.accel}
        return Detection(True, binary, f"{version}, accel {self.accel}", None, details)

    async def _probe_accel(self) -> str:
        """``kvm`` if a probe VM boots to user space under KVM, else ``tcg``. Cached per boot
        of the host: the answer cannot change before a reboot."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            key = f"{self.binary}:{boot_id}"
        except OSError:
            key = str(self.binary)
        cache = Path("/run/sandstorm-qemu-accel")
        if key not in _probe_cache:
            with contextlib.suppress(OSError, ValueError):
                _probe_cache.update(json.loads(cache.read_text()))
        if key not in _probe_cache:
            _probe_cache[key] = "kvm" if await self._boot_probe() else "tcg"
            with contextlib.suppress(OSError):
                cache.write_text(json.dumps(_probe_cache))
        return _probe_cache[key]

    async def _boot_probe(self) -> bool:
        assert self.binary is not None
        image = vm_dir(self.data_dir, self.image)
        initrd = self._agent_initrd()
        argv = qemu_argv(
            self.binary, image, self.cache_dir, 1, MIN_GUEST_RAM, 0, initrd,
            accel="kvm", probe=True,
        )  # fmt: skip
        # stdin stays open while it runs: a closed one tells the guest the host went away.
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=HOST_ENV,
            cwd=self.cache_dir,
            start_new_session=True,
        )
        assert process.stdout is not None and process.stdin is not None
        seen = b""
        try:
            with trio.move_on_after(PROBE_TIMEOUT_S):
                while b"sandstorm-probe-ok" not in seen and len(seen) < 4096:
                    chunk = await process.stdout.receive_some(4096)
                    if not chunk:
                        break
                    seen += chunk
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
                await process.stdin.aclose()
                await process.stdout.aclose()
        return b"sandstorm-probe-ok" in seen

    # ------------------------------------------------------------------ command line

    def _agent_initrd(self) -> Path:
        """The image's initramfs plus the agent and its command line (guest.py). QEMU reads
        its initramfs whole at start-up and snapshots carry their own copy, so the initramfs
        of an older agent is no longer needed by anyone."""
        base = vm_dir(self.data_dir, self.image) / "initramfs.cpio"
        return agent_initrd(base, self.cache_dir, agent_command(), prune=True)

    def _argv(self, directory: Path, spec: SandboxSpec, initrd: Path, ram: int) -> list[str]:
        """The command line of ``spec``'s VM with ``ram`` bytes of guest RAM."""
        assert self.binary is not None, "detect() first"
        vcpus = max(1, min(math.ceil(spec.cpu_limit), os.cpu_count() or 1))
        image = vm_dir(self.data_dir, self.image)
        return qemu_argv(
            self.binary, image, directory, vcpus, ram, spec.pids_limit, initrd,
            accel=self.accel, shares=spec.mounts,
        )  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    async def _spawn_vm(
        self, spec: SandboxSpec, initrd: Path, *, incoming: bool = False, ram: int = 0
    ) -> ShimInstance:
        directory = self._workdir(spec.sandbox_id)
        argv = self._argv(directory, spec, initrd, ram or guest_ram(spec))
        if incoming:
            # The snapshot is handed over later through QMP (_incoming): the shim gives QEMU
            # its stdio and nothing else.
            argv += ["-incoming", "defer"]
        # In the VM directory, which QEMU inherits for its relative QMP socket.
        instance = await self._spawn(spec.sandbox_id, argv, cwd=directory)
        async with rollback(functools.partial(kill_and_wait, instance)):
            # Into the sandbox's cgroup as soon as its pid is known (the shim answers right
            # after spawning it); guest RAM is only touched as the guest boots.
            self.cgroups.attach(spec.sandbox_id, instance.runtime_pid)
        return instance

    def _prepare(self, spec: SandboxSpec) -> SandboxSpec:
        for number, mount in enumerate(spec.mounts):
            if not mount.source.is_dir():
                # virtio-9p exports directories; sharing a file's parent would expose more.
                raise QemuError(
                    f"mounts[{number}]: the qemu runtime shares directories only, "
                    f"and {mount.source} is not one"
                )
        return super()._prepare(spec)

    def snapshot_refusal(self, spec: SandboxSpec) -> str | None:
        if spec.mounts:
            # QEMU blocks migration while a 9p export is mounted in the guest: its open files
            # live on the host, outside what a snapshot could carry.
            return "a qemu sandbox with mounts cannot be snapshotted (its shares live on the host)"
        return None

    async def _boot(self, spec: SandboxSpec) -> ShimInstance:
        initrd = await trio.to_thread.run_sync(self._agent_initrd)
        if spec.mounts:
            initrd = await trio.to_thread.run_sync(
                with_shares, initrd, self._workdir(spec.sandbox_id) / INITRD_FILE, spec.mounts
            )
        return await self._spawn_vm(spec, initrd)

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        directory = self._workdir(spec.sandbox_id)
        initrd = _current_initrd(directory)
        await trio.Path(image_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(image_dir / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        try:
            with trio.fail_after(CONTROL_TIMEOUT_S):
                qmp = await Qmp.connect(directory)
                try:
                    await qmp.execute("stop")
                    await qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
                    await qmp.execute("getfd", fd=fd, fdname="snapshot")
                    await qmp.execute("migrate", uri="fd:snapshot")
                    while True:
                        status = (await qmp.execute("query-migrate")).get("status")
                        if status == "completed":
                            break
                        if status in ("failed", "cancelled", None):
                            raise QemuError(f"QEMU migration to the snapshot {status}")
                        await trio.sleep(0.05)
                    await qmp.execute("quit")
                finally:
                    qmp.close()
        except (QmpError, OSError, trio.TooSlowError) as exc:
            raise QemuError(f"qemu checkpoint failed: {exc}") from exc
        finally:
            os.close(fd)
        if initrd is not None:
            await trio.to_thread.run_sync(shutil.copyfile, initrd, image_dir / INITRD_FILE)
        launch = {"accel": self.accel, "ram": guest_ram(spec), "cpu_limit": spec.cpu_limit}
        await trio.Path(image_dir / LAUNCH_FILE).write_text(json.dumps(launch))

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> ShimInstance:
        directory = self._workdir(spec.sandbox_id)
        fresh = not directory.exists()
        destroy = functools.partial(self.destroy, spec.sandbox_id)
        async with rollback(destroy) if fresh else contextlib.nullcontext():
            if fresh:
                spec = self._prepare(spec)
            # The guest's RAM holds the kernel and initramfs it booted: restore with the very
            # same files (the snapshot carries its initramfs), on the same accelerator.
            launch = json.loads(await trio.Path(image_dir / LAUNCH_FILE).read_text())
            if launch.get("accel") != self.accel:
                raise QemuError(
                    f"snapshot taken under {launch.get('accel')}, host runs {self.accel}"
                )
            initrd = directory / INITRD_FILE
            await trio.to_thread.run_sync(shutil.copyfile, image_dir / INITRD_FILE, initrd)
            instance = await self._spawn_vm(spec, initrd, incoming=True, ram=int(launch["ram"]))
            async with rollback(functools.partial(kill_and_wait, instance)):
                await _incoming(directory, image_dir / STATE_FILE)
            return instance

    # ------------------------------------------------------------------ teardown

    async def _stop_runtime(self, sandbox_id: str) -> list[str]:
        pid = _qemu_pid(self._workdir(sandbox_id), self._shim_paths(sandbox_id))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                return [f"qemu process {pid}"]
        return []

    # ------------------------------------------------------------------ observation

    @staticmethod
    def host_limits(spec: SandboxSpec) -> Limits:
        """The host cgroup around the QEMU process: guest RAM plus QEMU's own overhead. Inside
        the guest RLIMIT_NPROC enforces the process limit."""
        return Limits(spec.cpu_limit, guest_ram(spec) + QEMU_OVERHEAD, HOST_PIDS)

    def out_of_memory(self, sandbox_id: str) -> bool:
        """QEMU hit its host cgroup's limit, or the guest kernel ran out of memory and its OOM
        killer took the agent (RAM full of files written to the memory-backed root, which no
        kill frees): the guest said so on its console."""
        if self.cgroups.out_of_memory(sandbox_id):
            return True
        console = self._workdir(sandbox_id) / "console.log"
        return GUEST_OOM_MESSAGE in tail(console, 64 * 1024)


async def _incoming(directory: Path, state: Path) -> None:
    """Feed the snapshot to a QEMU started with ``-incoming defer`` (a descriptor passed over
    QMP), wait for the migration to finish, then run the VM: it arrives paused, as the
    checkpoint left it (``stop`` before ``migrate``)."""
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    status: dict[str, object] = {}
    try:
        with trio.fail_after(CONTROL_TIMEOUT_S):
            while True:
                try:
                    qmp = await Qmp.connect(directory)
                    break
                except OSError:  # QEMU has not created its QMP socket yet
                    await trio.sleep(0.01)
            try:
                await qmp.execute("getfd", fd=fd, fdname="snapshot")
                await qmp.execute("migrate-incoming", uri="fd:snapshot")
                while True:
                    status = await qmp.execute("query-status")
                    if status.get("running"):
                        return
                    if status.get("status") not in ("inmigrate", "prelaunch"):
                        break
                    await trio.sleep(0.02)
                if (await qmp.execute("query-migrate")).get("status") != "completed":
                    raise QemuError(f"restoring the snapshot failed (VM {status.get('status')})")
                await qmp.execute("cont")
            finally:
                qmp.close()
    except (QmpError, trio.TooSlowError) as exc:
        raise QemuError(f"restoring the snapshot failed: {exc!r}") from exc
    finally:
        os.close(fd)


def _current_initrd(directory: Path) -> Path | None:
    """The initramfs this VM booted, read back from its pid's command line."""
    pid = _qemu_pid(directory)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(args):
        if flag == b"-initrd":
            return Path(os.fsdecode(value))
    return None


def _qemu_pid(directory: Path, paths: ShimPaths | None = None) -> int | None:
    """The pid in the VM's pidfile (else the one its shim recorded), if that process is still
    the QEMU of this directory."""
    candidates: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        candidates.append(int((directory / "qemu.pid").read_text().strip()))
    if paths is not None and (pids := read_pids(paths)) is not None:
        candidates.append(pids[1])
    for pid in candidates:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"qemu-system" in cmdline and os.fsencode(directory) in cmdline:
            return pid
    return None
