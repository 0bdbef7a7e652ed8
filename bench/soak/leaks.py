"""What the soak leaves behind: after every sandbox and snapshot it made is deleted (with the
gateway still up, so destroy itself is what is checked), and again after a clean shutdown of the
gateway, nothing may remain on the host — containers, bundles, cgroups, runsc/shim/QEMU
processes, shim and VM directories, mounts — and the gateway's open fds and RSS may not have
grown past a margin over what it held after warming up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.soak.gateway import DataDir, Gateway, process_usage
from bench.soak.record import Client
from bench.soak.workload import Soak
from tests.hoststate import (
    HostState,
    cgroup_parent_dirs,
    cmdlines,
    host_mounts_under,
    settled_state,
)

#: Open fds the gateway may hold beyond its warmed-up count (a pooled connection or two).
FD_MARGIN = 16
#: RSS growth tolerated: allocator arenas and caches that Python keeps once grown.
RSS_MARGIN_BYTES = 96 << 20
RSS_MARGIN_RATIO = 1.5
SETTLE_S = 5.0


@dataclass
class Usage:
    fds: int
    rss: int


@dataclass
class Leaks:
    found: list[str] = field(default_factory=list)
    start: Usage | None = None
    end: Usage | None = None
    cleanup: list[str] = field(default_factory=list)  # what deleting everything went through
    shutdown_exit: int | None = None

    def to_json(self) -> dict[str, Any]:
        usage = {
            name: None if u is None else {"fds": u.fds, "rss_bytes": u.rss}
            for name, u in (("start", self.start), ("end", self.end))
        }
        return {
            "found": self.found,
            "gateway": usage,
            "cleanup": self.cleanup,
            "shutdown_exit": self.shutdown_exit,
        }


def usage(gateway: Gateway) -> Usage | None:
    pid = gateway.pid
    if pid is None:
        return None
    fds, rss = process_usage(pid)
    return Usage(fds, rss)


async def delete_everything(soak: Soak, leaks: Leaks) -> None:
    """DELETE every sandbox and snapshot the soak made, and any other the gateway lists."""
    client = soak.client()
    try:
        listed = await client.request("cleanup.list", "GET", "/v1/sandboxes", budget=30)
        ids = set(soak.sandboxes)
        if listed is not None and listed.status_code == 200:
            ids |= {s["id"] for s in listed.json()["sandboxes"] if s["state"] != "destroyed"}
        await _delete_all(client, leaks, "/v1/sandboxes", ids)
        snaps = await client.request("cleanup.snapshots", "GET", "/v1/snapshots", budget=30)
        snapshot_ids = set(soak.snapshots)
        if snaps is not None and snaps.status_code == 200:
            snapshot_ids |= {s["snapshot_id"] for s in snaps.json()["snapshots"]}
        await _delete_all(client, leaks, "/v1/snapshots", snapshot_ids)
    finally:
        await client.aclose()


async def _delete_all(client: Client, leaks: Leaks, collection: str, ids: set[str]) -> None:
    """DELETE ``collection/<id>`` for each id; what did not answer 200 (or 404) is noted."""
    for item in sorted(ids):
        path = f"{collection}/{item}"
        response = await client.request("cleanup.delete", "DELETE", path, budget=30)
        if response is None or response.status_code not in (200, 404):
            what = "no answer" if response is None else response.text[:300]
            leaks.cleanup.append(f"DELETE {path}: {what}")


async def check_after_destroy(soak: Soak, data: DataDir, leaks: Leaks) -> None:
    """With the gateway up: nothing on the host may name a sandbox the soak made."""
    cgroup_parent = soak.gateway.config.cgroup_parent
    ids = soak.sandboxes

    def clean(state: HostState) -> bool:
        return not any(state.mentioning(sid) for sid in ids)

    with trio.fail_after(60):
        state = await settled_state(data.data, cgroup_parent, clean, seconds=SETTLE_S)
    for sid in sorted(ids):
        leaks.found += [f"after DELETE: {thing}" for thing in state.mentioning(sid)]
    await trio.sleep(SETTLE_S)  # the gateway's own buffers and connections settle too
    leaks.end = usage(soak.gateway)


async def check_after_shutdown(gateway: Gateway, data: DataDir, leaks: Leaks) -> None:
    """After SIGTERM (on_shutdown = destroy): an empty host, and the data directory unmounts."""
    leaks.shutdown_exit = await gateway.stop()
    if leaks.shutdown_exit != 0:
        leaks.found.append(f"the gateway's shutdown exited with {leaks.shutdown_exit}")
    cgroup_parent = gateway.config.cgroup_parent
    with trio.fail_after(60):
        state = await settled_state(data.data, cgroup_parent, HostState.is_empty, seconds=15)
    if not state.is_empty():
        leaks.found.append(f"after shutdown: {state}")
    leaks.found += [f"mount {m}" for m in host_mounts_under(data.data)]
    leaks.found += [f"process {p}" for p in processes_naming(data.data)]
    squeeze = [p for p in cgroup_parent_dirs(f"{cgroup_parent}-squeeze") if Path(p).is_dir()]
    leaks.found += [f"cgroup {p}" for p in squeeze]
    for parent in cgroup_parent_dirs(cgroup_parent):
        children = [p for p in Path(parent).iterdir() if p.is_dir()]
        if children:
            leaks.found.append(f"cgroups under {parent}: {children}")
        else:
            await _rmdir(Path(parent))  # an empty parent a killed gateway left
    _compare_usage(leaks)


def _compare_usage(leaks: Leaks) -> None:
    start, end = leaks.start, leaks.end
    if start is None or end is None:
        return
    if end.fds > start.fds + FD_MARGIN:
        leaks.found.append(f"gateway fds {start.fds} -> {end.fds}")
    if end.rss > start.rss * RSS_MARGIN_RATIO and end.rss - start.rss > RSS_MARGIN_BYTES:
        leaks.found.append(f"gateway RSS {start.rss >> 20} MiB -> {end.rss >> 20} MiB")


def processes_naming(directory: Path) -> list[str]:
    """Any process at all whose command line names ``directory``."""
    needle = str(directory).encode()
    return [
        f"{pid}: " + cmdline.replace(b"\0", b" ").decode(errors="replace")[:300]
        for pid, cmdline in cmdlines()
        if needle in cmdline and pid != os.getpid()
    ]


async def _rmdir(path: Path) -> None:
    with trio.move_on_after(2):
        while True:
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # a task leaving it still counts for a moment (EBUSY)
                await trio.sleep(0.05)
