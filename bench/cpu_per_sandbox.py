"""``python -m bench.cpu_per_sandbox [--n N] [--rounds R] [--json FILE]``: the CPU one cold run
costs, gateway against raw runsc, at N in flight.

``concurrency`` counts sandboxes per second. On a machine whose cores are all busy that is the
inverse of the CPU each sandbox costs, so this splits that CPU, around each batch of N python
hellos (the gateway's batch until its sandboxes are torn down, raw's until ``runsc run`` and its
bundle are gone), A B A B like the bench:

- ``machine_busy``: the whole machine's busy time (``/proc/stat``), which also holds kernel work
  charged to no process;
- ``bench_process``: this process, which runs the gateway and its HTTP client (raw's side: the
  bench spawning runsc);
- ``children``: every process this one reaped, with what they reaped (shims, ``runsc``, the
  sandbox's gofer and sentry).

Each per sandbox, medians over the rounds, with ``busy_fraction`` (how much of the cores the
batch kept busy) and ``sandboxes_per_s`` (N over the batch's time up to its last answer).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from bench.breakdown import write_json
from bench.harness import Context, bench_context
from bench.scale import _gateway_batch, _raw_batch

CLK_TCK = os.sysconf("SC_CLK_TCK")
GONE_POLL_S = 0.1  # the gateway side's teardown wait: sparse, so it costs the count little


def _machine() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far. Busy: user, nice, system, irq and
    softirq; total adds idle and iowait. Steal (a hypervisor's other guests) is neither, and
    guest time is already inside user."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    busy = user + nice + system + irq + softirq
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def _own() -> tuple[float, float]:
    """(this process, its reaped children) CPU seconds so far."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


async def _gateway(ctx: Context, n: int) -> float:
    elapsed, failures = await _gateway_batch(ctx, n, gone_poll_s=GONE_POLL_S)
    assert failures == 0, f"{failures} gateway runs failed"
    return elapsed


async def _raw(ctx: Context, n: int) -> float:
    elapsed, failures = await _raw_batch(ctx, n)
    assert failures == 0, f"{failures} raw runs failed"
    return elapsed


async def _measure(
    ctx: Context, n: int, batch: Callable[[Context, int], Awaitable[float]]
) -> dict[str, float]:
    busy0, total0 = _machine()
    me0, kids0 = _own()
    elapsed = await batch(ctx, n)
    busy1, total1 = _machine()
    me1, kids1 = _own()
    return {
        "sandboxes_per_s": n / elapsed,
        "machine_busy_ms": (busy1 - busy0) * 1000 / n,
        "bench_process_ms": (me1 - me0) * 1000 / n,
        "children_ms": (kids1 - kids0) * 1000 / n,
        "busy_fraction": (busy1 - busy0) / (total1 - total0),
    }


async def measure(n: int, rounds: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {"gateway": [], "raw": []}
    async with bench_context(quick=False) as ctx:
        await _gateway(ctx, min(n, 4))  # warm up: images in the page cache, the agent built
        for _ in range(rounds):
            samples["gateway"].append(await _measure(ctx, n, _gateway))
            samples["raw"].append(await _measure(ctx, n, _raw))
    medians = {
        side: {k: round(statistics.median(s[k] for s in rows), 3) for k in rows[0]}
        for side, rows in samples.items()
    }
    return {"n": n, "rounds": rounds, "per_sandbox": medians, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_sandbox", description=__doc__)
    parser.add_argument("--n", type=int, default=32, help="cold runs in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = trio.run(measure, args.n, args.rounds)
    print(f"{args.n} cold runs in flight, medians of {args.rounds} rounds, per sandbox:")
    for side, row in report["per_sandbox"].items():
        print(
            f"  {side:<8} {row['sandboxes_per_s']:6.2f} sb/s"
            f"  machine busy {row['machine_busy_ms']:6.1f} ms"
            f" ({row['busy_fraction']:.0%} of the cores)"
            f"  bench process {row['bench_process_ms']:5.1f} ms"
            f"  children {row['children_ms']:6.1f} ms"
        )
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
