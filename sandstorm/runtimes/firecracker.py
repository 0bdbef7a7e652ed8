"""Firecracker microVMs, each started under Firecracker's ``jailer``: the VM tier's fastest runtime
on hosts that have both binaries and a KVM that really runs guests.

One jail per sandbox (docs/jailer.md): ``<data_dir>/firecracker/jail/<exec name>/<jail id>/root``
is the chroot Firecracker runs in, as ``firecracker_uid:firecracker_gid``, in a cgroup leaf the
jailer makes inside the gateway's own group for the sandbox (``--parent-cgroup``; the gateway's
group holds the limits and the OOM evidence, as for gVisor), with the seccomp filter Firecracker
ships (its default: no ``--no-seccomp``, no ``--seccomp-filter``). The kernel, initramfs and root
image are hard-linked into the chroot; Firecracker is then configured over its API socket
(``firecracker_api.py``) and started. No network device at all.

The agent channel is vsock: the host connects to the device's Unix socket in the jail and sends
``CONNECT <port>``; in the guest a small bridge (``images/vm_vsock_bridge.c``, compiled here on
first use and carried in the per-agent initramfs part) runs the agent on a socketpair and relays
it to the newest connection, so that a restored VM, whose connection Firecracker resets, is
simply connected to again. The guest init learns it has no virtio-serial port from
``sandstorm.channel=vsock`` on the kernel command line.

Checkpoint: ``PATCH /vm`` Paused, ``PUT /snapshot/create`` (Full) inside the jail, then the VM
is stopped and the two files move into the snapshot directory. Restore: a new jail, the files
linked into it, ``PUT /snapshot/load`` with ``resume_vm``, and a new vsock connection.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import trio

from sandstorm.agent import AGENT_MOUNT_POINT, AgentChannel, agent_command
from sandstorm.ids import is_id
from sandstorm.images.vm import CpioWriter, add_agent, load_vm_manifest, vm_dir
from sandstorm.protocol import MIB, IsolationLevel, RuntimeCapabilities, RuntimeName
from sandstorm.runtimes import firecracker_api as fapi
from sandstorm.runtimes.base import Detection, RuntimeStartError, SandboxSpec
from sandstorm.runtimes.cgroups import CPU_PERIOD_US, CgroupAccounting, Limits, SandboxCgroups
from sandstorm.runtimes.detection import first_executable, not_found, read_version
from sandstorm.runtimes.gvisor import AGENT_ENV
from sandstorm.runtimes.kvm_probe import kvm_runs_guests

FC_ENV: Final = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: The guest port the bridge listens on; above 1023 because it runs without capabilities.
VSOCK_PORT: Final = 10000
MIN_GUEST_RAM: Final = 128 * MIB
#: Firecracker's own memory besides guest RAM (its docs give under 5 MiB; the rest is slack
#: for the page tables and the vsock/virtio buffers).
FC_OVERHEAD: Final = 64 * MIB
HOST_PIDS: Final = 64  # Firecracker's threads: API, VMM, one per vCPU
MAX_VCPUS: Final = 32  # the API's own bound (MachineConfiguration.vcpu_count)
KERNEL_ARGS: Final = (
    "console=ttyS0 reboot=k panic=1 pci=off quiet loglevel=4 "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)
BOOT_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 5.0
LAUNCH_FILE: Final = "firecracker.json"
BRIDGE_SOURCE: Final = Path(__file__).resolve().parent.parent / "images" / "vm_vsock_bridge.c"
BRIDGE_NAME: Final = "vsock-bridge"


class FirecrackerError(RuntimeStartError):
    pass


class SnapshotLaunch(msgspec.Struct, frozen=True):
    """What a snapshot needs to be loaded again, next to its two files."""

    format: int
    mem_mib: int
    vcpus: int
    vsock_port: int
    root_image: str  # identity of the root image the guest had mounted (see _image_identity)


@dataclass(frozen=True, slots=True)
class Jail:
    """The jailer's directories for one sandbox (docs/jailer.md, "Jailer Operation")."""

    jail_id: str
    directory: Path  # <chroot_base>/<exec file name>/<id>: ours, outside the chroot

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def log(self) -> Path:
        return self.directory / "firecracker.log"

    @property
    def pidfile(self) -> Path:
        return self.directory / "firecracker.pid"


def jail_id(sandbox_id: str) -> str:
    """The jailer's ``--id`` allows only alphanumerics and hyphens (at most 64)."""
    return sandbox_id.replace("_", "-", 1)


def sandbox_id_of(jail: str) -> str:
    return jail.replace("-", "_", 1)


def guest_ram(spec: SandboxSpec) -> int:
    return max(MIN_GUEST_RAM, spec.memory_limit) // MIB * MIB


def guest_vcpus(spec: SandboxSpec) -> int:
    return max(1, min(math.ceil(spec.cpu_limit), os.cpu_count() or 1, MAX_VCPUS))


def host_limits(spec: SandboxSpec) -> Limits:
    """The host cgroup around Firecracker: guest RAM plus its own overhead. Inside the guest
    the kernel enforces the memory limit (it has no more RAM) and RLIMIT_NPROC the processes."""
    return Limits(spec.cpu_limit, guest_ram(spec) + FC_OVERHEAD, HOST_PIDS)


def boot_args(spec: SandboxSpec) -> str:
    ram = guest_ram(spec)
    return (
        f"{KERNEL_ARGS} sandstorm.channel=vsock sandstorm.overlay={ram // 2} "
        f"sandstorm.nproc={spec.pids_limit}"
    )


def cgroup_args(limits: Limits, v2: bool) -> list[str]:
    """``--cgroup <file>=<value>`` for the jailer's leaf, from the limits (docs/jailer.md)."""
    quota = max(1000, int(limits.cpu * CPU_PERIOD_US))
    if v2:
        values = [
            f"memory.max={limits.memory_bytes}",
            f"cpu.max={quota} {CPU_PERIOD_US}",
            f"pids.max={limits.pids}",
        ]
    else:
        values = [
            f"memory.limit_in_bytes={limits.memory_bytes}",
            f"cpu.cfs_period_us={CPU_PERIOD_US}",
            f"cpu.cfs_quota_us={quota}",
            f"pids.max={limits.pids}",
        ]
    return [arg for value in values for arg in ("--cgroup", value)]


def jailer_argv(
    jailer: str,
    firecracker: str,
    jail: str,
    *,
    uid: int,
    gid: int,
    chroot_base: Path,
    parent_cgroup: str,
    limits: Limits,
    cgroup_v2: bool,
) -> list[str]:
    """The jailer's command line (docs/jailer.md, "Jailer Usage"). No ``--daemonize``: the
    jailer execs Firecracker in place, so the process the gateway spawned is Firecracker, its
    exit is the VM's, and it is reaped like any child. No ``--netns``: the VM has no network
    device. After ``--``, Firecracker's own flags: the API socket inside the chroot."""
    return [
        jailer,
        "--id", jail,
        "--exec-file", firecracker,
        "--uid", str(uid),
        "--gid", str(gid),
        "--chroot-base-dir", str(chroot_base),
        "--cgroup-version", "2" if cgroup_v2 else "1",
        "--parent-cgroup", parent_cgroup,
        *cgroup_args(limits, cgroup_v2),
        "--",
        "--api-sock", f"/{fapi.API_SOCKET}",
    ]  # fmt: skip


class FirecrackerInstance:
    """A jailed Firecracker process and the agent's vsock connection."""

    def __init__(self, process: trio.Process, stream: trio.SocketStream, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self._channel = AgentChannel(stream, stream)

    @property
    def channel(self) -> AgentChannel:
        return self._channel

    async def wait(self) -> int:
        return await self.process.wait()

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    def diagnostics(self) -> str:
        return _tail(self.log_path)


class FirecrackerRuntime(CgroupAccounting):
    name: RuntimeName = "firecracker"
    isolation_levels: tuple[IsolationLevel, ...] = ("strong", "maximum")
    capabilities = RuntimeCapabilities(snapshot=True, exec=True, streaming=True, network=False)

    def __init__(
        self,
        search_paths: list[str],
        jailer_paths: list[str],
        data_dir: Path,
        image: str,
        cgroups: SandboxCgroups,
        *,
        uid: int = 65534,
        gid: int = 65534,
    ) -> None:
        self.search_paths = search_paths
        self.jailer_paths = jailer_paths
        self.data_dir = data_dir
        self.image = image
        self.cgroups = cgroups
        self.uid = uid
        self.gid = gid
        self.chroot_base = data_dir / "firecracker" / "jail"
        self.cache_dir = data_dir / "firecracker" / "cache"
        self.binary: str | None = None
        self.jailer: str | None = None

    # ------------------------------------------------------------------ detection

    async def detect(self) -> Detection:
        binary = first_executable(self.search_paths)
        if binary is None:
            return Detection(False, None, None, not_found(self.search_paths))
        version = (await read_version([binary, "--version"]) or "unknown").strip()
        version = version.removeprefix("Firecracker ").strip()
        reason = await self._unavailable_reason(binary)
        if reason is not None:
            return Detection(False, binary, version, reason)
        self.binary = binary
        return Detection(True, binary, version, None, {"jailer": str(self.jailer)})

    async def _unavailable_reason(self, binary: str) -> str | None:
        if "firecracker" not in os.path.basename(binary):
            # The jailer refuses any other exec file (docs/jailer.md).
            return f"{binary}: the jailer only runs a file whose name contains 'firecracker'"
        jailer = first_executable(self.jailer_paths)
        if jailer is None:
            return "jailer " + not_found(self.jailer_paths)
        if os.geteuid() != 0:
            return "the jailer needs root (chroot, cgroups, mknod)"
        if not os.path.exists("/dev/kvm"):
            return "/dev/kvm does not exist"
        if (kvm := await kvm_runs_guests()) is not None:
            return kvm
        if load_vm_manifest(self.data_dir, self.image) is None:
            return "no VM image: run `sandstorm image build --vm`"
        try:
            await self._bridge()
        except FirecrackerError as exc:
            return str(exc)
        self.jailer = jailer
        self.chroot_base.mkdir(mode=0o711, parents=True, exist_ok=True)
        return None

    # ------------------------------------------------------------------ guest files

    async def _bridge(self) -> Path:
        """The guest's vsock bridge, compiled once per source (static: the guest has no libc
        of this host's)."""
        source = BRIDGE_SOURCE.read_bytes()
        path = self.cache_dir / f"{BRIDGE_NAME}-{hashlib.sha256(source).hexdigest()[:16]}"
        if path.exists():
            return path
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        argv = ["gcc", "-static", "-Os", "-s", "-o", str(tmp), str(BRIDGE_SOURCE)]
        try:
            with trio.fail_after(120):
                result = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False, env=FC_ENV
                )
        except (OSError, trio.TooSlowError) as exc:
            raise FirecrackerError(f"cannot compile the guest vsock bridge: {exc!r}") from exc
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()[-500:]
            raise FirecrackerError(f"compiling the guest vsock bridge failed: {err}")
        tmp.rename(path)
        return path

    async def _initrd(self) -> Path:
        """The image's initramfs plus the agent, the bridge and the launch command, cached by
        content so that every sandbox boots the same file."""
        bridge = await self._bridge()
        base = vm_dir(self.data_dir, self.image) / "initramfs.cpio"

        def build() -> Path:
            extra = CpioWriter()
            add_agent(extra)
            extra.add_file(f"agent/{BRIDGE_NAME}", bridge.read_bytes(), 0o755)
            command = [f"{AGENT_MOUNT_POINT}/{BRIDGE_NAME}", str(VSOCK_PORT), *agent_command()]
            launch = "\n".join(command) + "\n\n" + "\n".join(AGENT_ENV) + "\n"
            extra.add_file("launch", launch.encode(), 0o644)
            tail = extra.finish()
            stat = base.stat()
            key = tail + f"{stat.st_ino}:{stat.st_mtime_ns}".encode()
            path = self.cache_dir / f"initrd-{hashlib.sha256(key).hexdigest()[:16]}.cpio"
            if not path.exists():
                tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
                with open(base, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.write(tail)
                tmp.rename(path)
            return path

        return await trio.to_thread.run_sync(build)

    def _image_identity(self) -> str:
        """Which root image a guest mounted: a snapshot holds that filesystem's page cache,
        so it must be loaded over the very same image."""
        stat = (vm_dir(self.data_dir, self.image) / "root.ext4").stat()
        return f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"

    # ------------------------------------------------------------------ jails

    def _exec_name(self) -> str:
        return os.path.basename(self.binary or "firecracker")

    def _jail(self, sandbox_id: str) -> Jail:
        jid = jail_id(sandbox_id)
        return Jail(jid, self.chroot_base / self._exec_name() / jid)

    async def _prepare_jail(self, jail: Jail, initrd: Path | None) -> None:
        """The chroot with what Firecracker opens, made before the jailer runs (it leaves an
        existing chroot as it is, then chowns it to the jail's uid)."""

        def prepare() -> None:
            # The id is fresh random; an existing jail means a bug or an attack: refuse.
            jail.directory.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
            jail.directory.mkdir(mode=0o711)
            jail.root.mkdir(mode=0o700)
            image = vm_dir(self.data_dir, self.image)
            _link_or_copy(image / "root.ext4", jail.root / fapi.ROOTFS)
            if initrd is not None:
                _link_or_copy(image / "vmlinux", jail.root / fapi.KERNEL)
                _link_or_copy(initrd, jail.root / fapi.INITRD)
            snapshots = jail.root / fapi.SNAPSHOT_DIR
            snapshots.mkdir(mode=0o700)
            os.chown(snapshots, self.uid, self.gid)

        await trio.to_thread.run_sync(prepare)

    async def _launch(self, spec: SandboxSpec, jail: Jail) -> trio.Process:
        assert self.binary is not None and self.jailer is not None, "detect() first"
        argv = jailer_argv(
            self.jailer,
            self.binary,
            jail.jail_id,
            uid=self.uid,
            gid=self.gid,
            chroot_base=self.chroot_base,
            parent_cgroup=f"{self.cgroups.parent}/{spec.sandbox_id}",
            limits=host_limits(spec),
            cgroup_v2=self.cgroups.v2,
        )
        log = open(jail.log, "ab")  # noqa: SIM115, ASYNC230 - local file handed to the child
        try:
            # Its own session: a terminal's Ctrl-C for the gateway never reaches the VM.
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=FC_ENV,
                start_new_session=True,
            )
        finally:
            log.close()
        # Synchronous (no checkpoint): a cancellation here must not leave a running VM with no
        # pidfile, which destroy and the reaper find it by.
        with open(jail.pidfile, "w") as f:  # noqa: ASYNC230 - a few bytes to a local file
            f.write(str(process.pid))
        try:
            with trio.fail_after(BOOT_TIMEOUT_S):
                await fapi.wait_for_socket(
                    jail.root, fapi.API_SOCKET, lambda: process.returncode is not None
                )
        except BaseException as exc:
            await _stop(process)
            if isinstance(exc, (RuntimeStartError, trio.TooSlowError)):
                raise FirecrackerError(f"{exc}; log: {_tail(jail.log)}") from exc
            raise
        return process

    async def _connect(self, process: trio.Process, jail: Jail, port: int) -> FirecrackerInstance:
        try:
            with trio.fail_after(BOOT_TIMEOUT_S):
                stream = await fapi.vsock_connect_retrying(
                    jail.root, port, lambda: process.returncode is not None
                )
        except (OSError, trio.TooSlowError) as exc:
            raise FirecrackerError(
                f"no agent on vsock port {port}: {exc!r}; log: {_tail(jail.log)}"
            ) from exc
        return FirecrackerInstance(process, stream, jail.log)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, spec: SandboxSpec) -> FirecrackerInstance:
        if spec.mounts:
            # Firecracker has no shared file system device (no virtio-9p, no virtiofs): refuse
            # rather than boot a sandbox without the directories it asked for.
            raise FirecrackerError("the firecracker runtime cannot mount host directories")
        try:
            self.cgroups.create(spec.sandbox_id, host_limits(spec))
            jail = self._jail(spec.sandbox_id)
            await self._prepare_jail(jail, await self._initrd())
            process = await self._launch(spec, jail)
            try:
                async with fapi.FirecrackerApi(jail.root) as api:
                    await fapi.configure_and_start(
                        api,
                        boot_args=boot_args(spec),
                        vcpus=guest_vcpus(spec),
                        mem_mib=guest_ram(spec) // MIB,
                    )
                return await self._connect(process, jail, VSOCK_PORT)
            except BaseException:
                await _stop(process)
                raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy(spec.sandbox_id)
            raise

    def snapshot_refusal(self, spec: SandboxSpec) -> str | None:
        return None

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        jail = self._jail(spec.sandbox_id)
        async with fapi.FirecrackerApi(jail.root) as api:
            await fapi.pause_and_snapshot(api)
        # The contract: the sandbox stops after a checkpoint (its channel then ends).
        await _kill_pidfile(jail)
        launch = SnapshotLaunch(
            format=1,
            mem_mib=guest_ram(spec) // MIB,
            vcpus=guest_vcpus(spec),
            vsock_port=VSOCK_PORT,
            root_image=self._image_identity(),
        )

        def publish() -> None:
            image_dir.mkdir(parents=True, exist_ok=True)
            for name in (fapi.SNAPSHOT_STATE, fapi.SNAPSHOT_MEMORY):
                target = image_dir / name
                _move(jail.root / fapi.SNAPSHOT_DIR / name, target)
                # Readable by the jail's group only: a later jail loads it, nobody else.
                os.chown(target, 0, self.gid)
                os.chmod(target, 0o640)
            (image_dir / LAUNCH_FILE).write_bytes(msgspec.json.encode(launch))

        await trio.to_thread.run_sync(publish)

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> FirecrackerInstance:
        fresh = spec.sandbox_id not in self.cgroups.list_ids()
        try:
            launch = msgspec.json.decode(
                await trio.Path(image_dir / LAUNCH_FILE).read_bytes(), type=SnapshotLaunch
            )
            if launch.root_image != self._image_identity():
                raise FirecrackerError("the VM image changed since this snapshot was taken")
            if fresh:
                self.cgroups.create(spec.sandbox_id, host_limits(spec))
            # The jail of the checkpointed VM (same id) is done with: a fresh one replaces it.
            jail = self._jail(spec.sandbox_id)
            await self._remove_jail(jail)
            await self._prepare_jail(jail, None)

            def link_snapshot() -> None:
                for name in (fapi.SNAPSHOT_STATE, fapi.SNAPSHOT_MEMORY):
                    _link_or_copy(image_dir / name, jail.root / fapi.SNAPSHOT_DIR / name)

            await trio.to_thread.run_sync(link_snapshot)
            process = await self._launch(spec, jail)
            try:
                async with fapi.FirecrackerApi(jail.root) as api:
                    await fapi.load_and_resume(api)
                return await self._connect(process, jail, launch.vsock_port)
            except BaseException:
                await _stop(process)
                raise
        except BaseException:
            with trio.CancelScope(shield=True):
                if fresh:
                    await self.destroy(spec.sandbox_id)
                else:
                    await self._remove_jail(self._jail(spec.sandbox_id))
            raise

    async def _remove_jail(self, jail: Jail) -> list[str]:
        released: list[str] = []
        if (pid := await _kill_pidfile(jail)) is not None:
            released.append(f"firecracker process {pid}")
        if jail.directory.exists():
            await trio.to_thread.run_sync(shutil.rmtree, jail.directory)
            released.append(f"jail {jail.directory}")
        return released

    async def destroy(self, sandbox_id: str) -> list[str]:
        released = await self._remove_jail(self._jail(sandbox_id))
        released += await self.cgroups.release(sandbox_id)
        return released

    async def surviving(self) -> list[str]:
        # Nothing journals the agent's stream of a Firecracker VM (the gateway holds the vsock
        # connection itself, no shim does), so a restarted gateway has no offset to resume
        # from: a VM left behind is an orphan, which list_orphans reports and the reaper frees.
        return []

    async def reattach(self, sandbox_id: str, offset: int) -> FirecrackerInstance:
        raise FirecrackerError(f"firecracker sandbox {sandbox_id} did not survive the restart")

    # ------------------------------------------------------------------ observation

    def host_memory(self, spec: SandboxSpec) -> int:
        return host_limits(spec).memory_bytes

    async def list_orphans(self, live: Callable[[], set[str]]) -> list[str]:
        held: set[str] = set()
        with contextlib.suppress(OSError):
            for exec_dir in self.chroot_base.iterdir():
                held |= {sandbox_id_of(p.name) for p in exec_dir.iterdir()}
        return sorted(i for i in held - live() if is_id(i, "sbx"))


async def _stop(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()


async def _kill_pidfile(jail: Jail) -> int | None:
    """SIGKILL the Firecracker of ``jail`` if it still runs (checked by its command line,
    which names the jail id), and wait until it is gone."""
    try:
        pid = int((await trio.Path(jail.pidfile).read_text()).strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # noqa: ASYNC230 - procfs, never blocks
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    if jail.jail_id.encode() not in cmdline:
        return None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return pid
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        # A pidfd turns readable when its process has ended (reaped or not).
        with trio.move_on_after(STOP_TIMEOUT_S):
            await trio.lowlevel.wait_readable(fd)
    except ProcessLookupError:
        pass
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
    return pid


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no copy of a large image) where the filesystems allow, else a copy."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, target)


def _move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)
        source.unlink()


def _tail(path: Path, size: int = 2048) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
