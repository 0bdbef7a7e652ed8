"""What a gateway holds on the host — runsc containers, bundle directories, cgroups, runsc
processes, shim processes and their directories and sockets — so tests can prove that nothing is
left behind."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from sandstorm.runtimes.cgroups import V1_ALL
from sandstorm.shim import shim_argv_directory, short_socket_dir

CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class HostState:
    containers: frozenset[str]
    bundles: frozenset[str]
    cgroups: frozenset[str]
    processes: frozenset[str]
    shims: frozenset[str] = frozenset()  # shim processes
    shim_files: frozenset[str] = frozenset()  # shim directories and sockets
    vms: frozenset[str] = frozenset()  # qemu processes and VM directories
    containerd: frozenset[str] = frozenset()  # the kata driver's ctr processes and files

    def mentioning(self, sandbox_id: str) -> list[str]:
        found = [f"container {c}" for c in self.containers if sandbox_id in c]
        found += [f"bundle {b}" for b in self.bundles if sandbox_id in b]
        found += [f"cgroup {c}" for c in self.cgroups if sandbox_id in c]
        found += [f"process {p}" for p in self.processes if sandbox_id in p]
        found += [f"shim {p}" for p in self.shims if sandbox_id in p]
        found += [f"shim file {f}" for f in self.shim_files if sandbox_id in f]
        found += [f"vm {v}" for v in self.vms if sandbox_id in v]
        found += [f"containerd {c}" for c in self.containerd if sandbox_id in c]
        return found

    def is_empty(self) -> bool:
        return not (
            self.containers
            or self.bundles
            or self.cgroups
            or self.processes
            or self.shims
            or self.shim_files
            or self.vms
            or self.containerd
        )


async def host_state(data_dir: Path, cgroup_parent: str) -> HostState:
    runsc = shutil.which("runsc")
    assert runsc is not None
    containers: set[str] = set()
    root = data_dir / "runsc"
    if root.is_dir():
        result = await trio.run_process(
            [runsc, "--root", str(root), "list", "-quiet"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        containers = {line.strip() for line in result.stdout.decode().splitlines() if line.strip()}
    sandboxes = data_dir / "sandboxes"
    bundles = {p.name for p in sandboxes.iterdir()} if sandboxes.is_dir() else set()
    cgroups: set[str] = set()
    for controller in CONTROLLERS:
        parent = Path("/sys/fs/cgroup") / controller / cgroup_parent
        if parent.is_dir():
            cgroups |= {f"{controller}/{p.name}" for p in parent.iterdir() if p.is_dir()}
    v2_parent = Path("/sys/fs/cgroup") / cgroup_parent
    if (Path("/sys/fs/cgroup") / "cgroup.controllers").exists() and v2_parent.is_dir():
        cgroups |= {p.name for p in v2_parent.iterdir() if p.is_dir()}
    return HostState(
        frozenset(containers),
        frozenset(bundles),
        frozenset(cgroups),
        runsc_processes(data_dir),
        shim_processes(data_dir),
        shim_files(data_dir),
        qemu_state(data_dir),
        containerd_state(data_dir),
    )


def cgroup_parent_dirs(cgroup_parent: str) -> list[str]:
    """The gateway's own cgroup, in every hierarchy that still has it."""
    root = Path("/sys/fs/cgroup")
    candidates = [root / cgroup_parent] + [root / c / cgroup_parent for c in V1_ALL]
    return sorted({str(p.resolve()) for p in candidates if p.is_dir()})


def containerd_state(data_dir: Path) -> frozenset[str]:
    """The kata driver's ``ctr`` processes, and its bundles, shim directories and sockets."""
    found = set(_processes(data_dir, lambda c: os.path.basename(c.split(b"\0")[0]) == b"ctr"))
    root = data_dir / "containerd"
    for directory in (root / "sandboxes", root / "shims", short_socket_dir(root)):
        if directory.is_dir():
            found |= {str(p) for p in directory.iterdir()}
    return frozenset(found)


def qemu_state(data_dir: Path) -> frozenset[str]:
    """QEMU processes of this data directory (and their shims), the VM directories under
    ``<data_dir>/qemu``, and the qemu driver's shim directories and sockets."""
    found = set(_processes(data_dir, lambda cmdline: b"qemu-system" in cmdline))
    shim_root = data_dir / "qemu-shim"
    for directory in (data_dir / "qemu", shim_root / "shims", short_socket_dir(shim_root)):
        if directory.is_dir():
            found |= {str(p) for p in directory.iterdir()}
    return frozenset(found)


def shim_files(data_dir: Path) -> frozenset[str]:
    found: set[str] = set()
    shims = data_dir / "shims"
    if shims.is_dir():
        found |= {str(p) for p in shims.iterdir()}
    sockets = short_socket_dir(data_dir)
    if sockets.is_dir():
        found |= {str(p) for p in sockets.iterdir()}
    return frozenset(found)


def shim_processes(data_dir: Path) -> frozenset[str]:
    return _processes(data_dir, _is_shim)


def runsc_processes(data_dir: Path) -> frozenset[str]:
    # A shim's command line names runsc (it is the shim's argument), but it is not runsc.
    return _processes(data_dir, lambda cmdline: b"runsc" in cmdline and not _is_shim(cmdline))


def _is_shim(cmdline: bytes) -> bool:
    return shim_argv_directory(cmdline.split(b"\0")) is not None


def cmdlines() -> list[tuple[int, bytes]]:
    """Every process's pid and raw command line (NUL-separated)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append((int(entry), f.read()))
            except OSError:
                continue  # gone meanwhile, or a kernel thread
    return found


def _processes(data_dir: Path, match: Callable[[bytes], bool]) -> frozenset[str]:
    needle = str(data_dir).encode()
    # Long enough to hold the sandbox id (after a shim's launcher and paths), which is what
    # HostState.mentioning looks for.
    return frozenset(
        f"{pid}: {_readable(cmdline)[:2000]}"
        for pid, cmdline in cmdlines()
        if needle in cmdline and match(cmdline)
    )


def _readable(cmdline: bytes) -> str:
    return cmdline.replace(b"\0", b" ").decode(errors="replace")


async def settled_state(
    data_dir: Path, cgroup_parent: str, want: Callable[[HostState], bool], seconds: float = 5.0
) -> HostState:
    """The host state once ``want`` holds, or the last one seen after ``seconds``.

    Teardown is done before DELETE answers, but a runsc process may take a moment to be reaped.
    """
    deadline = trio.current_time() + seconds
    while True:
        state = await host_state(data_dir, cgroup_parent)
        if want(state) or trio.current_time() > deadline:
            return state
        await trio.sleep(0.1)


def host_mounts_under(directory: Path) -> list[str]:
    """Host mount points inside ``directory`` (a sandbox's mounts live in runsc's own mount
    namespace; none may show up in the host's)."""
    prefix = str(directory)
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
