"""Faults injected on a schedule, each opening a window in the record during which the failures
it causes are expected:

- ``gateway_kill``: SIGKILL of the gateway, and a new one started on the same data directory
  (its shims keep the sandboxes; the new gateway takes them over).
- ``shim_kill``, ``runsc_kill``, ``qemu_kill``: SIGKILL of one sandbox's shim, ``runsc-sandbox``
  or QEMU process. The victim is a kept sandbox made for it, running an exec; the gateway must
  then report it ``failed``, its exec finished, further execs refused with 409, and DELETE must
  free it (the leak check at the end proves that).
- ``disk_full``: the data directory's tmpfs filled to the last byte, then freed.
- ``memory``: the gateway moved into a cgroup of its own whose memory limit leaves it a small
  margin of new charges, then moved back and the cgroup removed. It bounds only the gateway (and
  what it spawns meanwhile), never the host."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

import trio

from bench.soak.gateway import DataDir
from bench.soak.record import Client, Window
from bench.soak.workload import BOOT_S, Soak, level
from sandstorm.shim import shim_argv_directory
from tests.hoststate import cmdlines

#: After a fault ends, this long is still its doing (pooled connections found dead, a sandbox
#: whose create straddled the restart).
GRACE_S = 3.0
FAULTS = ("gateway_kill", "shim_kill", "runsc_kill", "disk_full", "qemu_kill", "memory")
SANDBOX_KILLS = {"shim_kill": "shim", "runsc_kill": "runsc", "qemu_kill": "qemu"}


async def inject(soak: Soak, data: DataDir, fault: str, hold_s: float) -> None:
    if fault == "gateway_kill":
        await gateway_kill(soak)
    elif fault in SANDBOX_KILLS:
        await sandbox_kill(soak, SANDBOX_KILLS[fault])
    elif fault == "disk_full":
        await disk_full(soak, data, hold_s)
    elif fault == "memory":
        await memory_squeeze(soak, hold_s)
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")


async def schedule(
    soak: Soak, data: DataDir, faults: list[str], first_at: float, every: float, hold_s: float
) -> None:
    """Inject ``faults`` in turn (cycling) from ``first_at`` seconds, one every ``every``
    seconds, while the workload runs."""
    at = soak.record.began + first_at
    n = 0
    while faults and at < soak.stop_at - GRACE_S:
        await trio.sleep_until(trio.current_time() + max(0.0, at - time.monotonic()))
        fault = faults[n % len(faults)]
        try:
            await inject(soak, data, fault, hold_s)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            # Reported, never silent: the soak fails on it, with the rest of its findings.
            soak.record.fault_checks.append(f"{fault}: the injection failed: {exc!r}")
        n += 1
        at = max(at + every, time.monotonic() + 1)


async def gateway_kill(soak: Soak) -> None:
    window = soak.record.open_window("gateway_kill")
    soak.up = False
    await soak.gateway.kill()
    await trio.sleep(soak.rng.uniform(0.5, 2.0))  # sandboxes keep writing into their journals
    await restart(soak, window)


async def restart(soak: Soak, window: Window) -> None:
    try:
        await soak.gateway.start()
    except RuntimeError as exc:
        soak.record.fault_checks.append(f"{window.kind}: the next gateway did not start: {exc}")
        await soak.gateway.start()  # once more; a second failure ends the soak
    soak.up = True
    window.end = time.monotonic() + GRACE_S


async def watch_gateway(soak: Soak) -> None:
    """A gateway that exits without the soak's doing is noted, and started again. Its window
    opens when it was last seen alive: it died at some point since."""
    alive_at = time.monotonic()
    while True:
        await trio.sleep(0.5)
        if soak.up and soak.gateway.proc is not None:
            soak.gateway.check_alive()
            if soak.gateway.proc is None:
                window = soak.record.open_window(
                    "gateway_crash", soak.gateway.unexpected_exits[-1][:300]
                )
                window.start = alive_at
                soak.up = False
                await restart(soak, window)
        alive_at = time.monotonic()


async def sandbox_kill(soak: Soak, target: str) -> None:
    runtime = "qemu" if target == "qemu" else "gvisor"
    client = soak.client()
    kind = f"fault.{target}_kill"
    try:
        body = {
            **level(runtime),
            "command": ["sleep", "120"],
            "timeout": 150_000,
            "wait": False,
            "keep_alive": 300,
        }
        response = await client.request(
            f"{kind}.victim", "POST", "/v1/sandboxes/run", json_body=body, budget=BOOT_S
        )
        if response is None or response.status_code != 202:
            what = "no answer" if response is None else response.text[:300]
            soak.record.fault_checks.append(f"{kind}: the victim was not created: {what}")
            return
        sid, exec_id = response.json()["id"], response.json()["exec_id"]
        soak.sandboxes.add(sid)
        pid = await _find_process(soak, sid, target)
        if pid is None:
            soak.record.fault_checks.append(f"{kind}: no {target} process found for {sid}")
            await client.request(f"{kind}.delete", "DELETE", f"/v1/sandboxes/{sid}", budget=30)
            return
        window = soak.record.open_window(f"{target}_kill", sid)
        os.kill(pid, signal.SIGKILL)
        await _expect_failed(soak, client, kind, sid, exec_id)
        response = await client.request(
            f"{kind}.delete", "DELETE", f"/v1/sandboxes/{sid}", budget=30
        )
        if response is not None and response.status_code != 200:
            soak.record.fault_checks.append(f"{kind}: DELETE of {sid}: {response.text[:300]}")
        window.end = time.monotonic()
    finally:
        await client.aclose()


async def _expect_failed(soak: Soak, client: Client, kind: str, sid: str, exec_id: str) -> None:
    """Within 30 s the gateway reports the sandbox failed (with a reason), its exec finished,
    and a further exec refused with 409."""
    state, failure = "", None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = await client.request(f"{kind}.status", "GET", f"/v1/sandboxes/{sid}/status")
        if response is None:
            await soak.wait_up()
            continue
        if response.status_code == 200:
            state, failure = response.json()["state"], response.json().get("failure")
            if state in ("failed", "destroyed"):
                break
        await trio.sleep(0.2)
    if state != "failed" or not failure:
        soak.record.fault_checks.append(
            f"{kind}: {sid} was {state!r} (failure {failure!r}) 30 s after the kill"
        )
        return
    record = await client.request(
        f"{kind}.exec_record", "GET", f"/v1/sandboxes/{sid}/execs/{exec_id}"
    )
    if record is not None and (record.status_code != 200 or record.json()["state"] != "finished"):
        soak.record.fault_checks.append(f"{kind}: the victim's exec: {record.text[:300]}")
    again = await client.request(
        f"{kind}.exec",
        "POST",
        f"/v1/sandboxes/{sid}/exec",
        json_body={"command": ["true"]},
        budget=10,
    )
    if again is not None and again.status_code != 409:
        soak.record.fault_checks.append(f"{kind}: exec in the failed {sid}: {again.status_code}")


async def _find_process(soak: Soak, sid: str, target: str) -> int | None:
    """The pid of the victim's shim, ``runsc-sandbox`` or QEMU, once it runs."""
    deadline = time.monotonic() + BOOT_S
    while time.monotonic() < deadline:
        for pid, argv in _processes_naming(sid):
            is_shim = shim_argv_directory(argv) is not None
            name = os.path.basename(argv[0])
            if (
                (target == "shim" and is_shim and b"qemu" not in argv[1])
                or (target == "runsc" and name == b"runsc-sandbox")
                or (target == "qemu" and not is_shim and name.startswith(b"qemu-system"))
            ):
                return pid
        await trio.sleep(0.2)
    return None


def _processes_naming(needle: str) -> list[tuple[int, list[bytes]]]:
    return [(pid, c.rstrip(b"\0").split(b"\0")) for pid, c in cmdlines() if needle.encode() in c]


async def disk_full(soak: Soak, data: DataDir, hold_s: float) -> None:
    """Fill the data directory's file system, hold it full, free it."""
    filler = data.mount / "filler"
    window = soak.record.open_window("disk_full")
    try:
        with filler.open("wb") as f:
            size = 0
            # The gateway writes meanwhile: what was free a moment ago may not be any more.
            for _ in range(50):
                stat = os.statvfs(data.mount)
                free = stat.f_bavail * stat.f_frsize
                if free == 0:
                    break
                try:
                    os.posix_fallocate(f.fileno(), size, free)
                    size += free
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        await trio.sleep(hold_s)
    finally:
        filler.unlink(missing_ok=True)
        window.end = time.monotonic() + GRACE_S


CGROUP = Path("/sys/fs/cgroup")
MEMORY_MARGIN = 48 << 20


async def memory_squeeze(soak: Soak, hold_s: float, margin: int = MEMORY_MARGIN) -> None:
    """The gateway in a memory cgroup allowing ``margin`` bytes of new charges, for ``hold_s``."""
    pid = soak.gateway.pid
    if pid is None:
        return
    v2 = (CGROUP / "cgroup.controllers").exists()
    hierarchy = CGROUP if v2 else CGROUP / "memory"
    squeeze = hierarchy / f"{soak.gateway.config.cgroup_parent}-squeeze"
    home = hierarchy / _memory_cgroup(pid, v2).lstrip("/")
    window = soak.record.open_window("memory", f"{margin >> 20} MiB of new charges")
    squeeze.mkdir(exist_ok=True)
    try:
        (squeeze / ("memory.high" if v2 else "memory.limit_in_bytes")).write_text(str(margin))
        (squeeze / "cgroup.procs").write_text(str(pid))
        await trio.sleep(hold_s)
    finally:
        (squeeze / ("memory.high" if v2 else "memory.limit_in_bytes")).write_text(
            "max" if v2 else "-1"
        )
        for moved in (squeeze / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # gone meanwhile
                (home / "cgroup.procs").write_text(moved)
        for _ in range(50):
            try:
                squeeze.rmdir()
                break
            except OSError:
                await trio.sleep(0.1)
        window.end = time.monotonic() + GRACE_S


def _memory_cgroup(pid: int, v2: bool) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and "memory" in controllers.split(",")):
            return path
    return "/"
