"""QEMU microVMs (``-M microvm``): the VM tier on hosts without Kata or Firecracker.

One ``qemu-system-x86_64`` process per sandbox, kept in the foreground of a per-sandbox shim
(``sandstorm/shim``) exactly like ``runsc run``: its stdin/stdout are the agent channel
(``-chardev stdio`` wired to a virtio-serial port the guest init hands to the agent), which the
shim holds and journals, so a VM outlives a gateway that dies and a new one reattaches
(``surviving``, ``reattach``). The shim runs in the VM directory: QEMU makes its QMP socket there
by a relative path (see qmp.py).
The guest (kernel, initramfs, ext4 root) is built by ``sandstorm image build --vm``
(``sandstorm/images/vm.py``); the agent and its command line travel in a small cpio appended to
the initramfs, so the agent is the gateway's own, read-only at ``/.sandstorm`` as in gVisor.

No network device at all. KVM is used only when a probe VM really boots under it (``/dev/kvm``
can exist and still not run guests); otherwise TCG. Checkpoint: QMP ``stop``, then ``migrate``
to a file descriptor passed over the QMP socket, then ``quit``; restore: the same command line
with ``-incoming defer``, then the snapshot's descriptor over QMP (``getfd`` +
``migrate-incoming``), so the shim passes QEMU nothing but its stdio. Guest writes live in
guest RAM (a tmpfs overlay), so the memory image is the whole sandbox state.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import trio

from sandstorm.agent import agent_command
from sandstorm.api.types import MIB, IsolationLevel, RuntimeCapabilities, RuntimeName
from sandstorm.ids import is_id
from sandstorm.images.vm import CpioWriter, add_agent, load_vm_manifest, vm_dir
from sandstorm.runtimes.base import Detection, MountSpec, RuntimeStartError, SandboxSpec
from sandstorm.runtimes.cgroups import CgroupAccounting, Limits, SandboxCgroups
from sandstorm.runtimes.detection import first_executable, not_found, read_version
from sandstorm.runtimes.gvisor import AGENT_ENV, SHIM_EXIT_GRACE_S
from sandstorm.runtimes.host_mounts import read_only_on_the_host, unmount_all
from sandstorm.runtimes.qmp import Qmp, QmpError
from sandstorm.shim import (
    DEFAULT_JOURNAL_MAX,
    ShimInstance,
    ShimPaths,
    attach,
    live_shims,
    read_pids,
    shim_paths,
    shim_process_ids,
    spawn_shim,
)
from sandstorm.shim.client import end_shim

QEMU_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: The user QEMU drops to after opening its files (``-runas``); it owns nothing on the host.
QEMU_USER = "nobody"
PORT_NAME = "org.sandstorm.agent"  # the guest init looks for this name (vm_init.c)
#: Below this the Debian kernel and the guest's own page cache leave a program too little.
MIN_GUEST_RAM = 128 * MIB
#: QEMU's own memory on top of guest RAM: the TCG translation cache (capped below), device
#: state and its heap. The host cgroup's limit is guest RAM plus this.
QEMU_OVERHEAD = 256 * MIB
TCG_TB_MIB = 64
HOST_PIDS = 512  # QEMU threads: one per vCPU, the I/O thread and the block worker pool
KERNEL_ARGS = (
    "console=ttyS0 quiet loglevel=4 panic=-1 reboot=t pci=off edd=off mitigations=off "
    "i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable no_timer_check cryptomgr.notests"
)
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
        parts = [_tail(self.log_path), _tail(self.log_path.with_name("console.log"))]
        return "\n".join(p for p in parts if p)


class QemuRuntime(CgroupAccounting):
    name: RuntimeName = "qemu"
    isolation_levels: tuple[IsolationLevel, ...] = ("strong", "maximum")
    capabilities = RuntimeCapabilities(snapshot=True, exec=True, streaming=True, network=False)

    def __init__(
        self,
        search_paths: list[str],
        data_dir: Path,
        image: str,
        cgroups: SandboxCgroups,
        *,
        journal_max: int = DEFAULT_JOURNAL_MAX,
    ) -> None:
        self.search_paths = search_paths
        self.data_dir = data_dir
        self.image = image
        self.state_root = data_dir / "qemu"
        self.cache_dir = data_dir / "qemu-cache"
        # Apart from gVisor's shims, so that neither driver takes the other's sandboxes.
        self.shim_root = data_dir / "qemu-shim"
        self.shims_dir = self.shim_root / "shims"
        self.cgroups = cgroups
        self.journal_max = journal_max
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
        self.state_root.mkdir(parents=True, exist_ok=True)
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
        argv = self._argv(
            self.cache_dir, 1, MIN_GUEST_RAM, 0, self._agent_initrd(), accel="kvm", probe=True
        )
        # stdin stays open while it runs: a closed one tells the guest the host went away.
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=QEMU_ENV,
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

    def _vm_dir(self, sandbox_id: str) -> Path:
        return self.state_root / sandbox_id

    def _shim_paths(self, sandbox_id: str) -> ShimPaths:
        return shim_paths(self.shim_root, sandbox_id)

    @property
    def _ack_every(self) -> int:
        return max(64 * 1024, self.journal_max // 4)

    def _agent_initrd(self) -> Path:
        """The image's initramfs plus a cpio with the agent and its command line, cached by
        content so that every sandbox of this gateway boots the same file."""
        base = vm_dir(self.data_dir, self.image) / "initramfs.cpio"
        extra = CpioWriter()
        add_agent(extra)
        launch = "\n".join(agent_command()) + "\n\n" + "\n".join(AGENT_ENV) + "\n"
        extra.add_file("launch", launch.encode(), 0o644)
        tail = extra.finish()
        stat = base.stat()
        digest = hashlib.sha256(tail + f"{stat.st_ino}:{stat.st_mtime_ns}".encode()).hexdigest()
        path = self.cache_dir / f"initrd-{digest[:16]}.cpio"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
            with open(base, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.write(tail)
            tmp.rename(path)
            # QEMU reads its initramfs whole at start-up and snapshots carry their own copy,
            # so the initramfs of an older agent is no longer needed by anyone.
            for old in self.cache_dir.glob("initrd-*.cpio"):
                if old != path:
                    with contextlib.suppress(OSError):
                        old.unlink()
        return path

    def _argv(
        self,
        directory: Path,
        vcpus: int,
        ram: int,
        nproc: int,
        initrd: Path,
        *,
        accel: str,
        probe: bool = False,
        shares: tuple[MountSpec, ...] = (),
    ) -> list[str]:
        assert self.binary is not None, "detect() first"
        image = vm_dir(self.data_dir, self.image)
        ram_mib = ram // MIB
        append = f"{KERNEL_ARGS} sandstorm.overlay={ram // 2} sandstorm.nproc={nproc}"
        if probe:
            append += " sandstorm.probe=1"
        if accel == "tcg" and (khz := host_tsc_khz()):
            # Under TCG the guest reads the host's TSC. Calibrating it against the emulated PIT
            # fails on a busy host (the kernel then marks the TSC unstable and boots without a
            # usable clock); the host knows the frequency, so say it.
            append += f" tsc_early_khz={khz}"
        accel_args = (
            ["-accel", "kvm", "-cpu", "host"]
            if accel == "kvm"
            else ["-accel", f"tcg,tb-size={TCG_TB_MIB}", "-cpu", "max"]
        )
        return [
            self.binary,
            "-M", "microvm",
            *accel_args,
            "-smp", str(vcpus),
            "-m", f"{ram_mib}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # The uncompressed kernel boots through PVH: no decompression (about 4 s under TCG).
            "-kernel", str(image / "vmlinux"),
            "-initrd", str(initrd),
            "-append", append,
            "-serial", f"file:{directory / 'console.log'}",
            "-drive", f"id=root,file={image / 'root.ext4'},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", "stdio,id=agent,signal=off",
            "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
            # Relative: the VM directory may be too deep for sun_path (see qmp.py).
            "-qmp", "unix:qmp.sock,server=on,wait=off",
            "-pidfile", str(directory / "qemu.pid"),
            # No network device, no USB, no default devices: nothing but the above.
            "-nic", "none",
            *_share_args(shares),
            # QEMU's own seccomp filter: no exec, no obsolete syscalls, no resource control.
            # (Snapshots go to a descriptor passed over QMP, so nothing needs to spawn.) It
            # drops root for QEMU_USER once its files are open; that drop is itself a set*id
            # call, so elevateprivileges stays allowed (as nobody there is nothing to elevate).
            "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
            "-runas", QEMU_USER,
        ]  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    async def _spawn(
        self, spec: SandboxSpec, initrd: Path, *, incoming: bool = False, ram: int = 0
    ) -> QemuInstance:
        sandbox_id = spec.sandbox_id
        directory = self._vm_dir(sandbox_id)
        vcpus = max(1, min(math.ceil(spec.cpu_limit), os.cpu_count() or 1))
        argv = self._argv(
            directory,
            vcpus,
            ram or guest_ram(spec),
            spec.pids_limit,
            initrd,
            accel=self.accel,
            shares=spec.mounts,
        )
        if incoming:
            # The snapshot is handed over later through QMP (_incoming): the shim gives QEMU
            # its stdio and nothing else.
            argv += ["-incoming", "defer"]
        log = directory / "qemu.log"
        paths = self._shim_paths(sandbox_id)
        # A restore after a checkpoint reuses the id: the last incarnation's shim has ended.
        await end_shim(paths, grace=0)
        # QEMU sees only PATH; the shim is in a session of its own (see GvisorRuntime._spawn)
        # and in the VM directory, which QEMU inherits for its relative QMP socket.
        process = await spawn_shim(
            paths, argv, env=QEMU_ENV, journal_max=self.journal_max, log_path=log, cwd=directory
        )
        try:
            stream, handshake = await attach(paths, 0, just_started=True)
        except BaseException:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
            raise
        instance = QemuInstance(
            paths, stream, handshake, log, process=process, ack_every=self._ack_every
        )
        try:
            # Into the sandbox's cgroup as soon as its pid is known (the shim answers right
            # after spawning it); guest RAM is only touched as the guest boots.
            self.cgroups.attach(sandbox_id, handshake.runtime_pid)
        except BaseException:
            with trio.CancelScope(shield=True):
                instance.kill()
                await instance.wait()
            raise
        return instance

    def _prepare(self, spec: SandboxSpec) -> SandboxSpec:
        """The sandbox's cgroups and VM directory; returns ``spec`` with its read-only mounts
        made read-only on the host too (see ``host_mounts``)."""
        for number, mount in enumerate(spec.mounts):
            if not mount.source.is_dir():
                # virtio-9p exports directories; sharing a file's parent would expose more.
                raise QemuError(
                    f"mounts[{number}]: the qemu runtime shares directories only, "
                    f"and {mount.source} is not one"
                )
        self.cgroups.create(spec.sandbox_id, host_limits(spec))
        # The id is fresh random; an existing directory means a bug or an attack: refuse.
        directory = self._vm_dir(spec.sandbox_id)
        directory.mkdir(mode=0o700)
        if any(m.read_only for m in spec.mounts):
            spec = read_only_on_the_host(spec, directory / "ro")
        return spec

    def snapshot_refusal(self, spec: SandboxSpec) -> str | None:
        if spec.mounts:
            # QEMU blocks migration while a 9p export is mounted in the guest: its open files
            # live on the host, outside what a snapshot could carry.
            return "a qemu sandbox with mounts cannot be snapshotted (its shares live on the host)"
        return None

    async def start(self, spec: SandboxSpec) -> QemuInstance:
        try:
            spec = self._prepare(spec)
            initrd = await trio.to_thread.run_sync(self._agent_initrd)
            if spec.mounts:
                initrd = await trio.to_thread.run_sync(
                    _with_shares, initrd, self._vm_dir(spec.sandbox_id) / INITRD_FILE, spec.mounts
                )
            return await self._spawn(spec, initrd)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy(spec.sandbox_id)
            raise

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        directory = self._vm_dir(spec.sandbox_id)
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

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> QemuInstance:
        directory = self._vm_dir(spec.sandbox_id)
        fresh = not directory.exists()
        try:
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
            instance = await self._spawn(spec, initrd, incoming=True, ram=int(launch["ram"]))
            try:
                await _incoming(directory, image_dir / STATE_FILE)
            except BaseException:
                with trio.CancelScope(shield=True):
                    instance.kill()
                    await instance.wait()
                raise
            return instance
        except BaseException:
            if fresh:
                with trio.CancelScope(shield=True):
                    await self.destroy(spec.sandbox_id)
            raise

    async def destroy(self, sandbox_id: str) -> list[str]:
        released: list[str] = []
        directory = self._vm_dir(sandbox_id)
        paths = self._shim_paths(sandbox_id)
        pid = _qemu_pid(directory, paths)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                released.append(f"qemu process {pid}")
        # QEMU is gone, so its shim records that and leaves; one that does not is killed.
        released += await end_shim(paths, grace=SHIM_EXIT_GRACE_S)
        released += await self.cgroups.release(sandbox_id)
        if directory.exists():
            # Never delete through a mount: it reaches the host's files (raises if one stays).
            detached = await trio.to_thread.run_sync(unmount_all, directory)
            released += [f"read-only mount {point}" for point in detached]
            await trio.to_thread.run_sync(shutil.rmtree, directory)
            released.append(f"VM directory {directory}")
        return released

    async def surviving(self) -> list[str]:
        """Sandbox ids whose shim is alive and whose QEMU has not exited (a restarted gateway
        reattaches to these)."""
        return live_shims(self.shims_dir, self._shim_paths)

    async def reattach(self, sandbox_id: str, offset: int) -> QemuInstance:
        """Connect to the live shim of ``sandbox_id`` and resume the agent stream at ``offset``
        (see GvisorRuntime.reattach)."""
        if not is_id(sandbox_id, "sbx"):
            raise QemuError(f"not a sandbox id: {sandbox_id!r}")
        if offset < 0:
            raise QemuError(f"offset {offset} is negative")
        paths = self._shim_paths(sandbox_id)
        stream, handshake = await attach(paths, offset)
        log = self._vm_dir(sandbox_id) / "qemu.log"
        return QemuInstance(paths, stream, handshake, log, ack_every=self._ack_every)

    # ------------------------------------------------------------------ observation

    def host_memory(self, spec: SandboxSpec) -> int:
        return host_limits(spec).memory_bytes

    def out_of_memory(self, sandbox_id: str) -> bool:
        """QEMU hit its host cgroup's limit, or the guest kernel ran out of memory and its OOM
        killer took the agent (RAM full of files written to the memory-backed root, which no
        kill frees): the guest said so on its console."""
        if self.cgroups.out_of_memory(sandbox_id):
            return True
        console = self._vm_dir(sandbox_id) / "console.log"
        return GUEST_OOM_MESSAGE in _tail(console, 64 * 1024)

    async def list_orphans(self, live: Callable[[], set[str]]) -> list[str]:
        held: set[str] = set()
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.state_root.iterdir()}
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.shims_dir.iterdir()}
        held |= set(await trio.to_thread.run_sync(shim_process_ids, self.shims_dir))
        # Who is live is asked only now, after the last await (see GvisorRuntime).
        return sorted(i for i in held - live() if is_id(i, "sbx"))


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


def guest_ram(spec: SandboxSpec) -> int:
    """Guest RAM: the memory limit (at least MIN_GUEST_RAM), whole MiB."""
    return max(MIN_GUEST_RAM, spec.memory_limit) // MIB * MIB


def host_limits(spec: SandboxSpec) -> Limits:
    """The host cgroup around the QEMU process: guest RAM plus QEMU's own overhead. Inside the
    guest the kernel enforces the memory limit (it has no more RAM) and RLIMIT_NPROC the
    process limit."""
    return Limits(spec.cpu_limit, guest_ram(spec) + QEMU_OVERHEAD, HOST_PIDS)


def host_tsc_khz() -> int | None:
    """The host CPU's (constant) TSC frequency in kHz, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return round(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _share_args(shares: tuple[MountSpec, ...]) -> list[str]:
    """A virtio-9p export per mount, tagged ``share<N>`` (the guest init mounts them from the
    /mounts list that ``_with_shares`` writes). ``security_model=none``: files are created as
    QEMU's user (``QEMU_USER``) and guest ownership changes are not stored on the host."""
    args: list[str] = []
    for number, share in enumerate(shares):
        tag = f"share{number}"
        # QEMU's option syntax: a comma inside a value is written twice.
        path = os.fspath(share.source).replace(",", ",,")
        fsdev = f"local,id={tag},path={path},security_model=none"
        if share.read_only:
            fsdev += ",readonly=on"
        args += ["-fsdev", fsdev, "-device", f"virtio-9p-device,fsdev={tag},mount_tag={tag}"]
    return args


def _with_shares(base: Path, target: Path, shares: tuple[MountSpec, ...]) -> Path:
    """``base`` plus a cpio holding /mounts (one "<tag> <ro|rw> <destination>" line per share),
    written to ``target``: this sandbox's own initramfs."""
    listing = "".join(
        f"share{n} {'ro' if m.read_only else 'rw'} {m.destination}\n" for n, m in enumerate(shares)
    )
    extra = CpioWriter()
    extra.add_file("mounts", listing.encode(), 0o644)
    with open(base, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.write(extra.finish())
    return target


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


def _tail(path: Path, size: int = 2048) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


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
