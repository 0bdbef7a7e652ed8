"""Gateway-owned cgroups, one per sandbox, above the runtime's own.

Why own them: runsc removes the cgroup it creates when the sandbox dies, and with it the evidence
of an OOM kill. The gateway creates ``<parent>/<sandbox id>`` with the limits and lets the runtime
create its leaf inside, so limits hold for the whole sandbox (sentry, gofer, app memory) and the
OOM counters survive until teardown. cgroupfs is a kernel pseudo-filesystem: its reads and writes
never block on disk, so they are done inline.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import trio

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
# runsc creates its leaf in every v1 hierarchy it finds, runc also in the hybrid host's v2
# one ("unified"); teardown must sweep them all.
V1_ALL = (
    "memory", "cpu", "cpuacct", "cpuset", "pids", "devices", "freezer", "blkio",
    "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "systemd", "unified",
)  # fmt: skip
CPU_PERIOD_US = 100_000
OOM_SLACK_BYTES = 1 << 20


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


@dataclass(frozen=True, slots=True)
class Limits:
    cpu: float
    memory_bytes: int
    pids: int


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    memory_bytes: int
    cpu_time_ms: float


class SandboxCgroups:
    """cgroup v1 (or hybrid) or v2, chosen by what the host mounts."""

    def __init__(self, parent: str = "sandstorm", root: Path = CGROUP_ROOT) -> None:
        self.parent = parent
        self.root = root
        self.v2 = (root / "cgroup.controllers").exists()
        # Where each v1 controller is mounted, resolved once: every create, teardown and
        # usage read asks, and resolving is a few syscalls each time.
        self._hierarchies: dict[str, Path] = {}
        # v2: each sandbox's memory.events "max" count when its current exec started.
        self._max_events: dict[str, int] = {}
        # Sandboxes whose current window started at the limit already (see reset_memory_peak).
        self._saturated: set[str] = set()

    def runtime_path(self, sandbox_id: str) -> str:
        """The ``cgroupsPath`` handed to the runtime: a leaf inside the gateway's group."""
        return f"/{self.parent}/{sandbox_id}/sandbox"

    def _hierarchy(self, controller: str) -> Path:
        """Where a v1 controller is mounted; co-mounted ones (``cpu -> cpu,cpuacct``) resolve
        to the same directory."""
        found = self._hierarchies.get(controller)
        if found is None:
            found = self._hierarchies[controller] = (self.root / controller).resolve()
        return found

    def _dirs(self, sandbox_id: str, controllers: tuple[str, ...]) -> list[Path]:
        if self.v2:
            return [self.root / self.parent / sandbox_id]
        seen: dict[Path, None] = {}
        for c in controllers:
            hierarchy = self._hierarchy(c)
            if hierarchy.is_dir():
                seen.setdefault(hierarchy / self.parent / sandbox_id)
        return list(seen)

    def create(self, sandbox_id: str, limits: Limits) -> None:
        quota = max(1000, int(limits.cpu * CPU_PERIOD_US))
        if self.v2:
            parent = self.root / self.parent
            parent.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                _write(parent / "cgroup.subtree_control", "+memory +cpu +pids")
            d = parent / sandbox_id
            d.mkdir()
            _write(d / "memory.max", str(limits.memory_bytes))
            with contextlib.suppress(FileNotFoundError):
                _write(d / "memory.swap.max", "0")
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(d / "pids.max", str(limits.pids))
            return
        for d in self._dirs(sandbox_id, V1_CONTROLLERS):
            d.mkdir(parents=True)
        mem = self._hierarchy("memory") / self.parent / sandbox_id
        _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
        with contextlib.suppress(OSError):
            # Without this the kernel may swap instead of enforcing the limit.
            _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        with contextlib.suppress(OSError):
            _write(mem / "memory.swappiness", "0")
        cpu = self._hierarchy("cpu") / self.parent / sandbox_id
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        _write(self._hierarchy("pids") / self.parent / sandbox_id / "pids.max", str(limits.pids))

    def update(self, sandbox_id: str, old: Limits, new: Limits) -> None:
        """Change the limits of a live sandbox's group (a warm pool sandbox claimed by a
        request with other limits). Raises OSError when the kernel refuses, e.g. a memory
        limit below what the group holds (v1 answers EBUSY); callers check usage first, since
        v2 would reclaim and OOM-kill instead, and put ``old`` back on failure."""
        quota = max(1000, int(new.cpu * CPU_PERIOD_US))
        if self.v2:
            d = self.root / self.parent / sandbox_id
            _write(d / "memory.max", str(new.memory_bytes))
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(d / "pids.max", str(new.pids))
            return
        mem = self._hierarchy("memory") / self.parent / sandbox_id
        # memsw must stay >= the memory limit at every step: raise it first, lower it last.
        order = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
        if new.memory_bytes < old.memory_bytes:
            order.reverse()
        for name in order:
            try:
                _write(mem / name, str(new.memory_bytes))
            except OSError:
                if name == "memory.limit_in_bytes":
                    raise
                # memsw is optional (swap accounting off): create() tolerates its absence too.
        _write(self._hierarchy("cpu") / self.parent / sandbox_id / "cpu.cfs_quota_us", str(quota))
        _write(self._hierarchy("pids") / self.parent / sandbox_id / "pids.max", str(new.pids))

    def memory_limit(self, sandbox_id: str) -> int:
        """The group's memory limit now (0 if it cannot be read)."""
        if self.v2:
            path = self.root / self.parent / sandbox_id / "memory.max"
        else:
            path = self._hierarchy("memory") / self.parent / sandbox_id / "memory.limit_in_bytes"
        try:
            return int(_read(path))
        except (OSError, ValueError):
            return 0

    def attach(self, sandbox_id: str, pid: int) -> None:
        """Move ``pid`` into the sandbox's group itself, for runtimes (QEMU) that make no leaf
        of their own; its threads and children follow."""
        for d in self._dirs(sandbox_id, V1_CONTROLLERS):
            _write(d / "cgroup.procs", str(pid))

    def memory_bytes(self, sandbox_id: str) -> int:
        if self.v2:
            path = self.root / self.parent / sandbox_id / "memory.current"
        else:
            path = self._hierarchy("memory") / self.parent / sandbox_id / "memory.usage_in_bytes"
        try:
            return int(_read(path))
        except (OSError, ValueError):
            return 0

    def cpu_time_ms(self, sandbox_id: str) -> float:
        try:
            if self.v2:
                stat = _read(self.root / self.parent / sandbox_id / "cpu.stat")
                for line in stat.splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1000.0
                return 0.0
            ns = _read(self._hierarchy("cpuacct") / self.parent / sandbox_id / "cpuacct.usage")
            return int(ns) / 1e6
        except (OSError, ValueError):
            return 0.0

    def reset_memory_peak(self, sandbox_id: str) -> None:
        """Start a new window for :meth:`memory_peaked` (v1: reset ``max_usage_in_bytes``;
        v2: remember the ``max`` event count). A group already at its limit (gVisor returns
        freed memory to the host lazily) starts a window that cannot tell: it never peaks."""
        self._saturated.discard(sandbox_id)
        try:
            if self.v2:
                self._max_events[sandbox_id] = self._max_event_count(sandbox_id)
                d = self.root / self.parent / sandbox_id
                limit_text = _read(d / "memory.max").strip()
                usage = int(_read(d / "memory.current"))
                limit = 1 << 62 if limit_text == "max" else int(limit_text)
            else:
                mem = self._hierarchy("memory") / self.parent / sandbox_id
                _write(mem / "memory.max_usage_in_bytes", "0")
                usage = int(_read(mem / "memory.max_usage_in_bytes"))
                limit = int(_read(mem / "memory.limit_in_bytes"))
            if usage >= limit - OOM_SLACK_BYTES:
                self._saturated.add(sandbox_id)
        except (OSError, ValueError):
            pass

    def memory_peaked(self, sandbox_id: str) -> bool:
        """Whether the group's usage reached its memory limit since the last reset."""
        if sandbox_id in self._saturated:
            return False
        try:
            if self.v2:
                return self._max_event_count(sandbox_id) > self._max_events.get(sandbox_id, 0)
            mem = self._hierarchy("memory") / self.parent / sandbox_id
            limit = int(_read(mem / "memory.limit_in_bytes"))
            peak = int(_read(mem / "memory.max_usage_in_bytes"))
            return peak >= limit - OOM_SLACK_BYTES
        except (OSError, ValueError):
            return False

    def _max_event_count(self, sandbox_id: str) -> int:
        events = _read(self.root / self.parent / sandbox_id / "memory.events")
        for line in events.splitlines():
            name, _, value = line.partition(" ")
            if name == "max":
                return int(value)
        return 0

    def out_of_memory(self, sandbox_id: str) -> bool:
        """True once the group hit its memory limit hard enough for the kernel to OOM-kill.

        Only meaningful for a sandbox that died: a live one near its limit is just busy.
        """
        try:
            if self.v2:
                events = _read(self.root / self.parent / sandbox_id / "memory.events")
                for line in events.splitlines():
                    name, _, value = line.partition(" ")
                    if name in ("oom_kill", "oom") and int(value) > 0:
                        return True
                return False
            mem = self._hierarchy("memory") / self.parent / sandbox_id
            control = _read(mem / "memory.oom_control")
            for line in control.splitlines():
                name, _, value = line.partition(" ")
                if name == "oom_kill" and int(value) > 0:
                    return True
            # The kill is charged to the runtime's leaf, which is gone; what stays in ours is
            # the peak: a sandbox that died with its peak at the limit died of it.
            limit = int(_read(mem / "memory.limit_in_bytes"))
            peak = int(_read(mem / "memory.max_usage_in_bytes"))
            return peak >= limit - OOM_SLACK_BYTES
        except (OSError, ValueError):
            return False

    def process_limit_hit(self, sandbox_id: str) -> bool:
        """True once a process or thread could not be created in the sandbox's group because
        of its pids limit (the kernel counts it in ``pids.events`` where the limit is set)."""
        group = (self.root if self.v2 else self._hierarchy("pids")) / self.parent / sandbox_id
        try:
            for line in _read(group / "pids.events").splitlines():
                name, _, value = line.partition(" ")
                if name == "max" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    async def release(self, sandbox_id: str, *, tries: int = 40) -> list[str]:
        """Remove the sandbox's groups once its last task has left them: right after a kill
        the kernel may still hold a dying task (EBUSY), so removal is retried for up to
        ``tries`` times 50 ms. Returns what was released, for a teardown's report."""
        for attempt in range(tries):
            try:
                removed = self.remove(sandbox_id)
            except OSError:
                if attempt == tries - 1:
                    raise
                await trio.sleep(0.05)
                continue
            return [f"cgroup /{self.parent}/{sandbox_id}"] if removed else []
        return []

    def remove(self, sandbox_id: str) -> bool:
        """Remove the group (and any leaf the runtime left) in every hierarchy; idempotent."""
        self._max_events.pop(sandbox_id, None)
        self._saturated.discard(sandbox_id)
        removed = False
        for d in self._dirs(sandbox_id, V1_ALL):
            if not d.is_dir():
                continue
            # Deepest first: the runtime's leaf, then ours (a bottom-up walk lists only
            # directories' names; a cgroup directory holds no regular files to remove).
            for parent, subdirs, _files in os.walk(d, topdown=False):
                for name in subdirs:
                    _rmdir_cgroup(Path(parent, name))
            _rmdir_cgroup(d)
            removed = True
        return removed

    def remove_parent(self) -> bool:
        """Remove the gateway's own group once no sandbox is left in it; one that still holds
        sandboxes (kept at shutdown for the next gateway) stays. Returns whether it is gone."""
        gone = True
        for d in self._dirs("", V1_ALL):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:  # EBUSY: a sandbox's group is still inside
                gone = False
        return gone

    def list_ids(self) -> set[str]:
        ids: set[str] = set()
        for d in self._dirs("", V1_ALL):
            with contextlib.suppress(OSError):
                ids.update(p.name for p in d.iterdir() if p.is_dir())
        return ids


def _rmdir_cgroup(path: Path) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        # Processes still inside (a dying sandbox): kill them, then retry once.
        with contextlib.suppress(OSError):
            for pid in _read(path / "cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        raise
