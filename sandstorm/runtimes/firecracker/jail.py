"""The jailer's side of a Firecracker sandbox (docs/jailer.md): its directories, its command line
with the cgroup limits it applies, the guest's size and kernel command line, and moving files into
and out of a jail."""

from __future__ import annotations

import errno
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sandstorm.runtimes.base import SandboxSpec
from sandstorm.runtimes.cgroups import CPU_PERIOD_US, Limits
from sandstorm.runtimes.firecracker import api as fapi
from sandstorm.runtimes.guest import guest_ram

MAX_VCPUS: Final = 32  # the API's own bound (MachineConfiguration.vcpu_count)
KERNEL_ARGS: Final = (
    "console=ttyS0 reboot=k panic=1 pci=off quiet loglevel=4 "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
)


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


def guest_vcpus(spec: SandboxSpec) -> int:
    return max(1, min(math.ceil(spec.cpu_limit), os.cpu_count() or 1, MAX_VCPUS))


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


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no copy of a large image) where the filesystems allow, else a copy."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, target)


def move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)
        source.unlink()
