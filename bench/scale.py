"""Scenarios about many sandboxes at once: throughput at N in flight, and memory when idle."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from bench.harness import Context, RawContainer, Result, status_mib
from sandstorm.runtimes.base import HOST_ENV
from sandstorm.runtimes.cgroups import SandboxCgroups

HELLO = "print('Hello, World!')"
MIB = 1 << 20


async def _gateway_batch(ctx: Context, n: int, gone_poll_s: float = 0.01) -> tuple[float, int]:
    """N POST runs at once; returns (seconds until the last answer, failures), once every
    sandbox is torn down (polled each ``gone_poll_s``)."""
    failures = 0
    ids: list[str] = []

    async def one() -> None:
        nonlocal failures
        try:
            created = await ctx.client.run(code=HELLO, language="python", keep_alive=0)
        except Exception:
            failures += 1
            return
        ids.append(created.id)
        if created.result is None or created.result.stdout != "Hello, World!\n":
            failures += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    elapsed = time.perf_counter() - start
    for sandbox_id in ids:  # untimed: no teardown may overlap the next sample
        await ctx.wait_gone(sandbox_id, poll_s=gone_poll_s)
    return elapsed, failures


async def _raw_batch(ctx: Context, n: int) -> tuple[float, int]:
    """N ``runsc run`` of the same hello at once (bundles written beforehand, as the gateway
    writes its own inside the measured time this is slightly in raw's favour)."""
    failures = 0

    async def one(cmd: list[str]) -> None:
        nonlocal failures
        done = await trio.run_process(cmd, capture_stdout=True, check=False, env=HOST_ENV)
        if done.returncode != 0 or done.stdout != b"Hello, World!\n":
            failures += 1

    async with AsyncExitStack() as stack:
        cmds = [
            await stack.enter_async_context(ctx.raw_sandbox(["/usr/bin/python3", "-c", HELLO]))
            for _ in range(n)
        ]
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for cmd in cmds:
                nursery.start_soon(one, cmd)
        elapsed = time.perf_counter() - start
    return elapsed, failures


async def concurrency(ctx: Context, rounds: int) -> dict[str, Result]:
    """N python-hello runs in flight at once: sandboxes per second, and failures."""
    rows: dict[str, Result] = {}
    for n in (2, 4) if ctx.quick else (8, 32):
        result = Result("sb/s", extra={"n": n, "gateway_failures": 0, "raw_failures": 0})
        for _ in range(rounds):
            elapsed, failed = await _gateway_batch(ctx, n)
            result.gateway.samples.append(n / elapsed)
            result.extra["gateway_failures"] += failed
            elapsed, failed = await _raw_batch(ctx, n)
            result.raw.samples.append(n / elapsed)
            result.extra["raw_failures"] += failed
        rows[f"concurrency-{n}"] = result
    return rows


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _settle() -> None:
    await trio.sleep(1.0)  # let start-up page cache and freed buffers settle before reading


IDLE_CPU_WINDOW_S = 5.0


async def _idle_cpu_ms_per_s(cgroups: SandboxCgroups, ids: list[str]) -> float:
    """Host CPU each idle sandbox uses per second (ms/s, median over the sandboxes), from its
    cgroup over IDLE_CPU_WINDOW_S: what idle sandboxes take from the ones that work."""
    before = [cgroups.cpu_time_ms(i) for i in ids]
    await trio.sleep(IDLE_CPU_WINDOW_S)
    used = [cgroups.cpu_time_ms(i) - b for i, b in zip(ids, before, strict=True)]
    return round(sorted(used)[len(used) // 2] / IDLE_CPU_WINDOW_S, 2)


async def footprint(ctx: Context, rounds: int) -> dict[str, Result]:
    """K idle sandboxes: the gateway's RSS, each sandbox's cgroup memory, host memory per
    sandbox (MemAvailable before/after) and host CPU per idle sandbox, vs K raw containers
    idling the same agent."""
    count = 5 if ctx.quick else 100
    result = Result("MiB", extra={"sandboxes": count})
    cgroups = SandboxCgroups(ctx.cgroup_parent)
    limiter = trio.CapacityLimiter(8)

    await _settle()
    result.extra["gateway_rss_idle_mib"] = round(status_mib("VmRSS"), 1)
    before = _available_mib()
    ids: list[str] = []

    async def start_one() -> None:
        async with limiter:
            ids.append((await ctx.client.run(command=["true"], keep_alive=600)).id)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(start_one)
        await _settle()
        result.extra["gateway_rss_mib"] = round(status_mib("VmRSS"), 1)
        result.extra["gateway_host_mib_per_sandbox"] = round((before - _available_mib()) / count, 2)
        result.gateway.samples.extend(cgroups.memory_bytes(i) / MIB for i in ids)
        result.extra["gateway_idle_cpu_ms_per_s"] = await _idle_cpu_ms_per_s(cgroups, ids)
    finally:
        with trio.CancelScope(shield=True):
            for sandbox_id in ids:
                await ctx.client.delete(sandbox_id)

    await _settle()
    before = _available_mib()
    async with AsyncExitStack() as stack:
        raws: list[RawContainer] = []

        # One by one: an exit stack is not for concurrent use (and this is not a timing).
        for _ in range(count):
            raws.append(await stack.enter_async_context(ctx.raw_agent()))
        await _settle()
        result.extra["raw_host_mib_per_sandbox"] = round((before - _available_mib()) / count, 2)
        result.raw.samples.extend(cgroups.memory_bytes(r.sid) / MIB for r in raws)
        raw_ids = [r.sid for r in raws]
        result.extra["raw_idle_cpu_ms_per_s"] = await _idle_cpu_ms_per_s(cgroups, raw_ids)
    result.notes.append(
        f"gateway RSS {result.extra['gateway_rss_mib']} MiB with {count} idle sandboxes "
        f"({result.extra['gateway_rss_idle_mib']} MiB with none; bench client included)"
    )
    result.notes.append(
        f"host CPU per idle sandbox {result.extra['gateway_idle_cpu_ms_per_s']} ms/s "
        f"(raw {result.extra['raw_idle_cpu_ms_per_s']} ms/s)"
    )
    return {"footprint": result}
