"""The latency scenarios: each measures the gateway and its raw-runsc counterpart, interleaved.

Every scenario returns its rows by name (most return one row named like the scenario);
``bench.scale``, ``bench.snapshots`` and ``bench.files`` hold the scenarios that need more
machinery.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from bench.files import files_qemu, files_small, files_transfer, files_tree
from bench.harness import Context, Result
from bench.scale import concurrency, footprint
from bench.snapshots import snapshot_and_resume
from bench.stream_client import TICKER, flood
from sandstorm.config import WarmPoolClass
from sandstorm.sdk import AsyncClient

HELLO = "print('Hello, World!')"
Rows = dict[str, Result]


async def _run_rounds(
    ctx: Context,
    rounds: int,
    result: Result,
    client: AsyncClient | None = None,
    before: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """POST /v1/sandboxes/run of a python hello vs ``runsc run`` of the same, A B A B
    (``before`` each gateway sample, untimed)."""
    client = client or ctx.client
    for _ in range(rounds):
        if before is not None:
            await before()
        start = time.perf_counter()
        created = await client.run(code=HELLO, language="python", keep_alive=0)
        result.gateway.samples.append((time.perf_counter() - start) * 1000)
        assert created.result is not None and created.result.stdout == "Hello, World!\n"
        await ctx.wait_gone(created.id, client)

        async with ctx.raw_sandbox(["/usr/bin/python3", "-c", HELLO]) as cmd:
            start = time.perf_counter()
            done = await trio.run_process(cmd, capture_stdout=True)
            result.raw.samples.append((time.perf_counter() - start) * 1000)
            assert done.stdout == b"Hello, World!\n"


async def cold_run(ctx: Context, rounds: int) -> Rows:
    """POST /v1/sandboxes/run of a python hello (no pool) vs ``runsc run`` of the same."""
    result = Result("ms")
    await _run_rounds(ctx, rounds, result)
    return {"cold-run": result}


async def warm_run(ctx: Context, rounds: int) -> Rows:
    """POST /v1/sandboxes/run of a python hello served from the warm pool (a gateway with the
    default pool: two sandboxes of the default limits), vs ``runsc run``. Each sample waits
    until the pool has refilled, so every run is a claim, never a cold boot."""
    result = Result("ms")
    size = WarmPoolClass().size
    async with ctx.other_gateway("warm", warm_pool=[WarmPoolClass()]) as (client, http):

        async def pool_full() -> None:
            while await _pool_ready(http) < size:
                await trio.sleep(0.01)

        misses = await _pool_counter(http, "miss")
        await _run_rounds(ctx, rounds, result, client, pool_full)
        result.extra["pool_misses"] = await _pool_counter(http, "miss") - misses
        result.extra["pool_claims"] = await _pool_counter(http, "claimed")
    result.notes.append(f"a gateway with a warm pool of {size}; raw is a cold runsc run")
    return {"warm-run": result}


async def _metric(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def _pool_ready(http: httpx.AsyncClient) -> float:
    return await _metric(http, "sandstorm_pool_sandboxes", state="ready")


async def _pool_counter(http: httpx.AsyncClient, event: str) -> float:
    return await _metric(http, "sandstorm_pool_events_total", event=event)


async def _exec(ctx: Context, rounds: int, name: str, python: bool) -> Rows:
    """POST /v1/sandboxes/{id}/exec into a kept-alive sandbox vs ``runsc exec`` into a raw
    container running the agent (same user and working directory)."""
    result = Result("ms")
    if python:
        fields: dict[str, object] = {"code": HELLO, "language": "python"}
        argv, expected = ["/usr/bin/python3", "-c", HELLO], b"Hello, World!\n"
    else:
        fields, argv, expected = {"command": ["true"]}, ["/bin/true"], b""
    exec_cmd = ["exec", "--user", "1000:1000", "--cwd", "/workspace"]
    exec_cmd += ["--env", "PATH=/usr/local/bin:/usr/bin:/bin", "--env", "PYTHONUNBUFFERED=1"]
    sandbox = await ctx.client.run(command=["true"], keep_alive=600)
    try:
        async with ctx.raw_agent() as raw:
            for _ in range(rounds):
                start = time.perf_counter()
                done = await ctx.client.exec(sandbox.id, **fields)
                result.gateway.samples.append((time.perf_counter() - start) * 1000)
                assert done.result is not None and done.result.exit_code == 0, done
                assert done.result.stdout == expected.decode()

                start = time.perf_counter()
                proc = await trio.run_process(
                    ctx.runsc_cmd(*exec_cmd, raw.sid, *argv), capture_stdout=True
                )
                result.raw.samples.append((time.perf_counter() - start) * 1000)
                assert proc.stdout == expected
    finally:
        await ctx.client.delete(sandbox.id)
    return {name: result}


async def exec_true(ctx: Context, rounds: int) -> Rows:
    return await _exec(ctx, rounds, "exec-true", python=False)


async def exec_python(ctx: Context, rounds: int) -> Rows:
    return await _exec(ctx, rounds, "exec-python", python=True)


async def stream_first_byte(ctx: Context, rounds: int) -> Rows:
    """From a write inside the sandbox to its frame at a WebSocket client, vs to a host process
    reading runsc's stdout pipe directly.

    The WebSocket client (``bench.stream_client``, one per round) runs in a process of its own,
    as a deployment's does, so that its frame parsing does not share the gateway's event loop
    and CPU; starting it and opening its stream are not timed."""
    result = Result("ms")
    sandbox = await ctx.client.run(command=["true"], keep_alive=600)
    try:
        for i in range(rounds):
            out = await ctx.client_process(
                "bench.stream_client", sandbox.id, "first-byte", f"r{i}", limit_s=60
            )
            result.gateway.samples.extend(out["samples_ms"])
            buffer = b""

            def ticks(chunk: bytes | bytearray) -> None:
                nonlocal buffer
                now = time.time_ns()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                result.raw.samples.extend((now - int(x)) / 1e6 for x in lines)

            async with ctx.raw_sandbox(["/usr/bin/python3", "-c", TICKER]) as cmd:
                await ctx.read_raw(cmd, ticks)
    finally:
        await ctx.client.delete(sandbox.id)
    return {"stream-first-byte": result}


async def stream_throughput(ctx: Context, rounds: int) -> Rows:
    """MB/s of stdout from one sandbox to one WebSocket client, vs runsc's stdout pipe: bytes
    from the first stdout byte to the exec's exit, over that time.

    The WebSocket client (``bench.stream_client``, one per round) runs in a process of its own,
    as a deployment's does, so that its reading and frame parsing do not share the gateway's
    event loop and CPU; starting it and opening its stream are not timed."""
    result = Result("MB/s")
    megabytes = 20 if ctx.quick else 200
    sandbox = await ctx.client.run(command=["true"], keep_alive=600)
    try:
        for i in range(rounds):
            out = await ctx.client_process(
                "bench.stream_client",
                sandbox.id,
                "throughput",
                f"t{i}",
                str(megabytes),
                limit_s=300,
            )
            assert out["received"] == megabytes * 2**20, out
            result.gateway.samples.append(out["received"] / out["elapsed_s"] / 1e6)

            received, first = 0, 0.0

            def count(chunk: bytes | bytearray) -> None:
                nonlocal received, first
                first = first or time.perf_counter()
                received += len(chunk)

            async with ctx.raw_sandbox(["/usr/bin/python3", "-c", flood(megabytes)]) as cmd:
                await ctx.read_raw(cmd, count)
            elapsed = time.perf_counter() - first
            result.raw.samples.append(received / elapsed / 1e6)
    finally:
        await ctx.client.delete(sandbox.id)
    return {"stream-throughput": result}


# A scenario's function may produce several rows (concurrency at each N) or rows shared with
# another scenario (snapshot and resume come from one cycle): it runs once per bench run.
SCENARIOS: dict[str, Callable[[Context, int], Awaitable[Rows]]] = {
    "cold-run": cold_run,
    "warm-run": warm_run,
    "exec-true": exec_true,
    "exec-python": exec_python,
    "stream-first-byte": stream_first_byte,
    "stream-throughput": stream_throughput,
    "concurrency": concurrency,
    "snapshot": snapshot_and_resume,
    "resume": snapshot_and_resume,
    "footprint": footprint,
    "files-upload": files_transfer,
    "files-download": files_transfer,
    "files-small": files_small,
    "files-tree": files_tree,
    "files-qemu": files_qemu,
}

# Rounds per scenario: a full run, and a --quick smoke run.
ROUNDS = {
    "cold-run": (30, 3),
    "warm-run": (30, 3),
    "exec-true": (50, 3),
    "exec-python": (50, 3),
    "stream-first-byte": (20, 2),
    "stream-throughput": (5, 1),
    "concurrency": (5, 1),
    # A cycle is slow and its samples spread widely on a loaded machine: enough rounds for a
    # stable median.
    "snapshot": (20, 1),
    "resume": (20, 1),
    "footprint": (1, 1),
    # 256 MiB each way a round (--file-mib; 16 with --quick).
    "files-upload": (5, 1),
    "files-download": (5, 1),
    "files-small": (50, 3),
    "files-tree": (20, 2),
    # QEMU under TCG here moves ~15-40 MB/s: a round of 256 MiB each way takes ~25 s.
    "files-qemu": (3, 1),
}
