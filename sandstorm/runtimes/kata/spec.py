"""The pure pieces of the Kata driver: the OCI spec, Kata's sizing annotations, the ``ctr``
command lines, the host limits, and the per-sandbox writable root (an overlay on a tmpfs).

Kata reads hypervisor annotations only when its ``configuration.toml`` lists them in
``enable_annotations`` (``["default_vcpus", "default_memory"]``); see docs/runtimes/kata.md.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
from pathlib import Path

from sandstorm.api.types import MIB
from sandstorm.runtimes.base import RuntimeStartError, SandboxSpec
from sandstorm.runtimes.cgroups import Limits
from sandstorm.runtimes.oci import oci_config

KATA_RUNTIME_TYPE = "io.containerd.kata.v2"
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
NAMESPACE = "sandstorm"
# Every container carries this label with the gateway's tag: two gateways on one containerd
# (one namespace) each list, and reap, only their own.
GATEWAY_LABEL = "io.sandstorm.supervisor.gateway"
VCPUS_ANNOTATION = "io.katacontainers.config.hypervisor.default_vcpus"
MEMORY_ANNOTATION = "io.katacontainers.config.hypervisor.default_memory"
# The guest's own share of its RAM: the kernel, kata-agent, and the page cache its virtio-fs
# root needs (Kata's images idle at 60-90 MiB). It is added to the sandbox's memory_limit so
# that the sandbox's processes get all of theirs.
GUEST_OVERHEAD_MIB = 128
# What the VM costs on the host beyond its RAM: the hypervisor, virtiofsd and the shim.
KATA_HOST_OVERHEAD = 256 * MIB
KATA_HOST_PIDS = 1024

_MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]  # fmt: skip
_READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def is_vm(runtime_type: str) -> bool:
    """Whether the runtime type boots a VM (Kata) rather than sharing the host kernel (runc,
    which the tests use to drive everything but the VM)."""
    return runtime_type.startswith("io.containerd.kata.")


def shim_binary(runtime_type: str) -> str:
    """containerd's name for the shim of a runtime type: ``io.containerd.kata.v2`` →
    ``containerd-shim-kata-v2`` (it looks for that on its PATH)."""
    parts = runtime_type.split(".")
    if len(parts) < 3 or not all(parts[-2:]):
        raise ValueError(f"not a containerd runtime type: {runtime_type!r}")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def kata_annotations(spec: SandboxSpec) -> dict[str, str]:
    """Kata's VM size for ``spec``: whole vCPUs (the host cgroup's quota keeps a fractional
    limit exact) and the memory limit plus the guest's own overhead, in MiB."""
    vcpus = max(1, math.ceil(spec.cpu_limit))
    memory_mib = math.ceil(spec.memory_limit / MIB) + GUEST_OVERHEAD_MIB
    return {VCPUS_ANNOTATION: str(vcpus), MEMORY_ANNOTATION: str(memory_mib)}


def host_limits(spec: SandboxSpec, runtime_type: str) -> Limits:
    """The gateway-owned cgroup around the sandbox. With runc it holds the sandbox's own
    processes, so the limits are the sandbox's; with Kata it holds the VM (hypervisor and
    helpers), which needs room above the guest's RAM, and the pids limit applies in the guest."""
    if is_vm(runtime_type):
        guest = int(kata_annotations(spec)[MEMORY_ANNOTATION]) * MIB
        return Limits(spec.cpu_limit, guest + KATA_HOST_OVERHEAD, KATA_HOST_PIDS)
    # The agent itself is one of the processes.
    return Limits(spec.cpu_limit, spec.memory_limit, spec.pids_limit + 1)


def oci_spec(
    spec: SandboxSpec, rootfs: Path, cgroups_path: str, runtime_type: str
) -> dict[str, object]:
    """The spec ``ctr run --config`` reads: the common one (same agent, user, mounts,
    namespaces) with what a runtime on a real kernel needs on top, and Kata's annotations."""
    config = oci_config(spec, cgroups_path)
    process = config["process"]
    assert isinstance(process, dict)
    # RLIMIT_NPROC and RLIMIT_SIGPENDING count for every process of uid 1000 on the kernel,
    # other sandboxes' too: the process limit is the cgroup's pids limit instead (in the guest,
    # for Kata), and the kernel's own pending-signal limit stays (it never drops a SIGCHLD).
    per_user = ("RLIMIT_NPROC", "RLIMIT_SIGPENDING")
    process["rlimits"] = [r for r in process["rlimits"] if r["type"] not in per_user]
    config["root"] = {"path": str(rootfs), "readonly": False}
    mounts = config["mounts"]
    assert isinstance(mounts, list)
    mounts[0]["options"] = ["nosuid", "noexec", "nodev"]  # /proc
    mounts[1:1] = [
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip
    linux = config["linux"]
    assert isinstance(linux, dict)
    linux["resources"] = {
        # Only the default devices (runc adds null, zero, random, tty…): nothing of the host's.
        "devices": [{"allow": False, "access": "rwm"}],
        "pids": {"limit": spec.pids_limit + 1},
    }
    linux["maskedPaths"] = list(_MASKED)
    linux["readonlyPaths"] = list(_READ_ONLY)
    if is_vm(runtime_type):
        config["annotations"] = kata_annotations(spec)
    return config


def ctr_run_argv(
    ctr: list[str],
    *,
    sandbox_id: str,
    spec_path: Path,
    runtime_type: str,
    fifo_dir: Path,
    gateway_tag: str,
    runc_root: Path,
) -> list[str]:
    """``ctr run`` in the foreground: its stdin/stdout are the container's (the agent channel)
    and it exits with the container's status, removing the container (``--rm``)."""
    argv = [
        *ctr, "run", "--rm",
        "--config", str(spec_path),
        "--runtime", runtime_type,
        "--fifo-dir", str(fifo_dir),
        "--label", f"{GATEWAY_LABEL}={gateway_tag}",
    ]  # fmt: skip
    if runtime_type == RUNC_RUNTIME_TYPE:
        # runc's state under the data directory, not the host's /run/containerd/runc.
        argv += ["--runc-root", str(runc_root)]
    return [*argv, sandbox_id]


# ------------------------------------------------------------------------ writable root

_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode()):
        code = ctypes.get_errno()
        raise OSError(code, f"mount {fstype} on {target}: {os.strerror(code)}")


def mount_rootfs(image_rootfs: Path, bundle: Path, size: int) -> Path:
    """The sandbox's root: the image read-only under an overlay whose upper layer is a tmpfs of
    ``size`` bytes (what runsc's ``--overlay2=root:memory`` does), so writes cost the sandbox's
    memory (its cgroup is charged) and the image on the host is never written."""
    lower = os.path.realpath(image_rootfs)
    scratch, rootfs = bundle / "scratch", bundle / "rootfs"
    for path in (lower, str(scratch)):
        # overlayfs splits its options on these; such a data directory cannot be used.
        if any(c in path for c in ",:\\"):
            raise RuntimeStartError(f"path unusable for an overlay mount: {path!r}")
    scratch.mkdir(mode=0o700)
    rootfs.mkdir(mode=0o755)
    _mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=0700")
    (scratch / "upper").mkdir(mode=0o755)
    (scratch / "work").mkdir(mode=0o700)
    _mount(
        "overlay", rootfs, "overlay", _MS_NOSUID | _MS_NODEV,
        f"lowerdir={lower},upperdir={scratch}/upper,workdir={scratch}/work",
    )  # fmt: skip
    return rootfs


def unmount_rootfs(bundle: Path) -> list[str]:
    """Undo :func:`mount_rootfs` (idempotent); what was unmounted."""
    released = []
    for target in (bundle / "rootfs", bundle / "scratch"):
        # Detached: a container that is still dying cannot keep it busy; its memory goes with
        # the last user.
        if _libc.umount2(os.fsencode(target), _MNT_DETACH) == 0:
            released.append(f"mount {target}")
        elif ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
            code = ctypes.get_errno()
            raise OSError(code, f"umount {target}: {os.strerror(code)}")
    return released
