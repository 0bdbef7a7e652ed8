"""One soak from start to verdict: mount the data directory, start the gateway, warm it up and
take its usage, run the workload at N in flight with faults on a schedule, delete everything,
check for leaks with the gateway up and again after its shutdown, unmount."""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.soak import faults, leaks, workload
from bench.soak.gateway import DataDir, Gateway, GatewayConfig
from bench.soak.leaks import Leaks
from bench.soak.record import Record
from bench.soak.report import summarize
from bench.soak.workload import Soak


@dataclass
class Settings:
    seconds: float
    concurrency: int
    vm_workers: int = 1
    faults: list[str] = field(default_factory=lambda: list(faults.FAULTS))
    first_fault_s: float = 10.0
    fault_every_s: float = 30.0
    fault_hold_s: float = 8.0
    disk_bytes: int = 1 << 30
    seed: int = 0
    vm_runs: int = 0  # > 0: only this many QEMU runs in a row, no workload, no faults
    warm_pool: list[dict[str, Any]] = field(default_factory=list)


async def soak(settings: Settings) -> dict[str, Any]:
    """The soak's summary (``bench.soak.report``); ``summary["ok"]`` is its verdict."""
    base = Path(tempfile.mkdtemp(prefix="sandstorm-soak-"))
    data = DataDir(base, settings.disk_bytes)
    record = Record()
    found = Leaks()
    gateway = Gateway(GatewayConfig(data.data, warm_pool=settings.warm_pool), base)
    started = time.monotonic()
    await data.create()
    try:
        await gateway.start()
        state = Soak(record, gateway, time.monotonic(), random.Random(settings.seed))
        await warm_up(state, settings)
        found.start = leaks.usage(gateway)
        record.began = time.monotonic()
        if settings.vm_runs:
            await vm_runs(state, settings.vm_runs)
        else:
            await mixed(state, data, settings)
        await leaks.delete_everything(state, found)
        await leaks.check_after_destroy(state, data, found)
    finally:
        with trio.CancelScope(shield=True):
            await leaks.check_after_shutdown(gateway, data, found)
            problem = await data.remove()
            if problem:
                found.found.append(problem)
    summary = summarize(
        record,
        found,
        gateway.unexpected_exits,
        {
            "seconds": settings.seconds,
            "concurrency": settings.concurrency,
            "vm_workers": settings.vm_workers,
            "faults": settings.faults,
            "seed": settings.seed,
            "vm_runs": settings.vm_runs,
            "gateway_starts": gateway.starts,
            "gateway_start_s": [round(s, 2) for s in gateway.start_seconds],
            "wall_s": round(time.monotonic() - started, 1),
            "logs": str(base),
        },
    )
    return summary


async def warm_up(state: Soak, settings: Settings) -> None:
    """A few runs before the gateway's usage is taken, so that the comparison at the end is
    against a gateway that has served (imports done, pools filled)."""
    client = state.client()
    try:
        for _ in range(3):
            await workload.one_run(state, client, "gvisor")
        if settings.vm_workers or settings.vm_runs:
            await workload.one_run(state, client, "qemu")
    finally:
        await client.aclose()
    await trio.sleep(2)


async def mixed(state: Soak, data: DataDir, settings: Settings) -> None:
    state.stop_at = time.monotonic() + settings.seconds
    vm = min(settings.vm_workers, settings.concurrency)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(faults.watch_gateway, state)
        async with trio.open_nursery() as workers:
            for n in range(settings.concurrency):
                workers.start_soon(workload.worker, state, "qemu" if n < vm else "gvisor")
            workers.start_soon(
                faults.schedule,
                state,
                data,
                settings.faults,
                settings.first_fault_s,
                settings.fault_every_s,
                settings.fault_hold_s,
            )
        nursery.cancel_scope.cancel()


async def vm_runs(state: Soak, count: int) -> None:
    """``count`` QEMU runs one after another, each checked."""
    client = state.client()
    state.stop_at = float("inf")
    try:
        for _ in range(count):
            before = len(state.record.anomalies)
            await workload.one_run(state, client, "qemu")
            state.record.count("vm_runs")
            failed = len(state.record.anomalies) > before
            failed |= state.record.outcomes[-1].status != 201
            state.record.count("vm_runs_failed" if failed else "vm_runs_ok")
    finally:
        await client.aclose()
