"""The scenarios: each measures the gateway and its raw-runsc counterpart, interleaved."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import trio

from bench.harness import Context, Result

HELLO = "print('Hello, World!')"
# Prints a wall-clock timestamp (ns), one per line, every 10 ms; the reader takes the difference.
TICKS = 20
TICKER = (
    "import time, sys\n"
    f"for _ in range({TICKS}):\n"
    "    sys.stdout.write(str(time.time_ns()) + '\\n'); sys.stdout.flush(); time.sleep(0.01)\n"
)


def flood(megabytes: int) -> str:
    return (
        "import sys\nb = b'x' * 65535 + b'\\n'\n"
        f"for _ in range({megabytes * 16}): sys.stdout.buffer.write(b)\n"
    )


async def cold_run(ctx: Context, rounds: int) -> Result:
    """POST /v1/sandboxes/run of a python hello (no pool) vs ``runsc run`` of the same."""
    result = Result("ms")
    for _ in range(rounds):
        start = time.perf_counter()
        created = await ctx.client.run(code=HELLO, language="python", keep_alive=0)
        result.gateway.samples.append((time.perf_counter() - start) * 1000)
        assert created.result is not None and created.result.stdout == "Hello, World!\n"
        await ctx.wait_gone(created.id)

        async with ctx.raw_sandbox(["/usr/bin/python3", "-c", HELLO]) as cmd:
            start = time.perf_counter()
            done = await trio.run_process(cmd, capture_stdout=True)
            result.raw.samples.append((time.perf_counter() - start) * 1000)
            assert done.stdout == b"Hello, World!\n"
    return result


async def stream_first_byte(ctx: Context, rounds: int) -> Result:
    """From a write inside the sandbox to its frame at a WebSocket client, vs to a host process
    reading runsc's stdout pipe directly."""
    result = Result("ms")
    sandbox = await ctx.client.run(command=["true"], keep_alive=600)
    try:
        async with ctx.client.stream(sandbox.id, since=10**12) as stream:
            for i in range(rounds):
                await stream.exec(f"r{i}", code=TICKER, language="python")
                async for event in stream:
                    now = time.time_ns()
                    kind = type(event).__name__
                    if kind == "StdoutEvent" and event.data:
                        for line in event.data.splitlines():
                            result.gateway.samples.append((now - int(line)) / 1e6)
                    elif kind == "ExitEvent":
                        break
                buffer = b""

                def ticks(chunk: bytes) -> None:
                    nonlocal buffer
                    now = time.time_ns()
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    result.raw.samples.extend((now - int(x)) / 1e6 for x in lines)

                async with ctx.raw_sandbox(["/usr/bin/python3", "-c", TICKER]) as cmd:
                    await ctx.read_raw(cmd, ticks)
    finally:
        await ctx.client.delete(sandbox.id)
    return result


async def stream_throughput(ctx: Context, rounds: int) -> Result:
    """MB/s of stdout from one sandbox to one WebSocket client, vs runsc's stdout pipe."""
    result = Result("MB/s")
    megabytes = 20 if ctx.quick else 200
    sandbox = await ctx.client.run(command=["true"], keep_alive=600)
    try:
        async with ctx.client.stream(sandbox.id, since=10**12) as stream:
            for i in range(rounds):
                await stream.exec(
                    f"t{i}", code=flood(megabytes), language="python", timeout=600_000
                )
                received, first = 0, 0.0
                async for event in stream:
                    kind = type(event).__name__
                    if kind == "StdoutEvent" and event.data:
                        first = first or time.perf_counter()
                        received += len(event.data)
                    elif kind == "ExitEvent":
                        break
                elapsed = time.perf_counter() - first
                assert received == megabytes * 2**20, received
                result.gateway.samples.append(received / elapsed / 1e6)

                received, first = 0, 0.0

                def count(chunk: bytes) -> None:
                    nonlocal received, first
                    first = first or time.perf_counter()
                    received += len(chunk)

                async with ctx.raw_sandbox(["/usr/bin/python3", "-c", flood(megabytes)]) as cmd:
                    await ctx.read_raw(cmd, count)
                elapsed = time.perf_counter() - first
                result.raw.samples.append(received / elapsed / 1e6)
    finally:
        await ctx.client.delete(sandbox.id)
    return result


SCENARIOS: dict[str, Callable[[Context, int], Awaitable[Result]]] = {
    "cold-run": cold_run,
    "stream-first-byte": stream_first_byte,
    "stream-throughput": stream_throughput,
}

# Rounds per scenario: a full run, and a --quick smoke run.
ROUNDS = {"cold-run": (30, 3), "stream-first-byte": (20, 2), "stream-throughput": (5, 1)}


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2)
