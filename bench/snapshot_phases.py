"""``python -m bench.snapshot_phases [--rounds N] [--idle S] [--json FILE]``: a snapshot of an
idle sandbox, split into phases.

The bench's ``snapshot`` scenario checkpoints a sandbox right after its run, before the agent
has started its python zygote (it does so after 0.2 s idle). A sandbox that users snapshot has
usually sat idle longer, zygote and standby included. This starts one such sandbox per round,
lets it idle ``--idle`` seconds, snapshots it with ``leave_running: false`` and reports medians
of the whole request, the agent's quiesce (the zygote stopped, ``protocol/agent.md``), the
checkpoint (``runsc checkpoint``, until runsc has let the container go), the commit (sha256,
fsync, publish) and the image's size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from bench.breakdown import print_phases, write_json
from bench.harness import bench_context
from sandstorm.actors import sandbox
from sandstorm.runtimes import gvisor
from sandstorm.store import snapshots

phases: dict[str, list[float]] = {}


def _timed(owner: Any, name: str, key: str) -> None:
    original: Callable[..., Awaitable[Any]] = getattr(owner, name)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            phases.setdefault(key, []).append((time.perf_counter() - start) * 1000)

    setattr(owner, name, timed)


async def measure(rounds: int, idle_s: float) -> dict[str, Any]:
    _timed(sandbox.SandboxActor, "_quiesce", "quiesce")
    _timed(gvisor.GvisorRuntime, "checkpoint", "checkpoint")
    _timed(snapshots.SnapshotCatalog, "commit", "commit")
    totals: list[float] = []
    sizes: list[int] = []
    async with bench_context(quick=False) as ctx:
        for _ in range(rounds):
            created = await ctx.client.run(command=["true"], keep_alive=600)
            await trio.sleep(idle_s)
            start = time.perf_counter()
            info = await ctx.client.snapshot(created.id, leave_running=False)
            totals.append((time.perf_counter() - start) * 1000)
            sizes.append(info.size_bytes)
            await ctx.wait_gone(created.id)
            await ctx.client.delete_snapshot(info.snapshot_id)
    return {
        "rounds": rounds,
        "idle_s": idle_s,
        "request_ms": round(statistics.median(totals), 1),
        "phases_ms": {k: round(statistics.median(v), 1) for k, v in phases.items()},
        "image_bytes": int(statistics.median(sizes)),
        "samples_ms": [round(t, 1) for t in totals],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshot_phases", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--idle", type=float, default=0.5, help="seconds idle before it")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = trio.run(measure, args.rounds, args.idle)
    print(f"snapshot after {report['idle_s']} s idle: {report['request_ms']} ms (median of "
          f"{report['rounds']}), image {report['image_bytes'] / 1e6:.2f} MB")  # fmt: skip
    print_phases(report["phases_ms"])
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
