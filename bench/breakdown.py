"""``python -m bench.breakdown [--rounds N] [--json FILE]``: where a request's time goes.

Runs the requests of ``cold-run``, ``warm-run``, ``exec-true`` and ``exec-python`` against the
same gateways as the bench (one without a pool, one with the default warm pool) and splits each
into phases, from marks taken by thin timing wrappers around the gateway's own methods in this
process (the gateway's code is not changed; the wrappers cost microseconds). Prints the median
of each phase, and the CPU time this process (gateway and bench client) spent per request.

Phases, in order: ``http in`` (client call to the router: HTTP client, Hypercorn, Quart, the
before-request hooks, decoding), ``record`` (the sandbox record a create writes before it
answers), ``claim`` (warm pool), ``boot: shim`` (shim spawn and handshake), ``boot: agent
hello`` (runsc boot up to the agent's HELLO), ``checkpoint`` (the crash-recovery save before an
exec reaches the agent), ``agent: to started`` (exec frame out of the gateway, through the shim
and runsc into the agent, which forks; back to STARTED), ``agent: to exit`` (the process runs and
exits, its EXIT frame back), ``http out`` (EXIT frame to the client holding the decoded answer).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from bench.harness import Context, bench_context
from bench.scenarios import HELLO, _pool_ready
from sandstorm import agent as agent_client
from sandstorm.actors import pool, router, sandbox
from sandstorm.config import WarmPoolClass
from sandstorm.runtimes import gvisor
from sandstorm.sdk import AsyncClient

# The first time each point is passed after marks.clear(): the request's own, not a background
# task's (a pool refill, a periodic checkpoint) that passes it later.
marks: dict[str, float] = {}


def _mark_async(owner: Any, name: str, key: str) -> None:
    original = getattr(owner, name)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault(key + "<", time.perf_counter())
        try:
            return await original(*args, **kwargs)
        finally:
            marks.setdefault(key + ">", time.perf_counter())

    setattr(owner, name, timed)


def _mark_sync(owner: Any, name: str, key: str) -> None:
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault(key + "<", time.perf_counter())
        result = None
        try:
            result = original(*args, **kwargs)
            return result
        finally:
            marks.setdefault(key + ">", time.perf_counter())
            marks.setdefault(key + "=", 1.0 if result is not None else 0.0)

    setattr(owner, name, timed)


def instrument() -> None:
    _mark_async(router.Router, "create", "create")
    _mark_async(router.Router, "exec", "exec")
    _mark_async(router.Router, "_record_sandbox", "record")
    _mark_sync(pool.WarmPool, "claim", "claim")
    _mark_async(gvisor.GvisorRuntime, "start", "start")
    _mark_async(sandbox.SandboxActor, "_await_ready", "ready")
    _mark_async(sandbox.SandboxActor, "_record_progress", "checkpoint")
    _mark_async(agent_client.AgentChannel, "send_exec", "send")
    dispatch = sandbox.SandboxActor._dispatch

    def timed_dispatch(self: sandbox.SandboxActor, kind: int, channel: int, payload: bytes) -> None:
        if kind == agent_client.FrameKind.STARTED:
            marks.setdefault("started", time.perf_counter())
        elif kind == agent_client.FrameKind.EXIT:
            marks.setdefault("exit", time.perf_counter())
        dispatch(self, kind, channel, payload)

    sandbox.SandboxActor._dispatch = timed_dispatch  # type: ignore[method-assign, assignment]


def phases(start: float, end: float, entry: str) -> dict[str, float] | None:
    m = marks
    if "started" not in m or "exit" not in m:
        return None  # the frames came in through another path this round (not timed)
    out: dict[str, float] = {"http in": m[entry + "<"] - start}
    if "record<" in m:
        out["record"] = m["record>"] - m["record<"]
    claimed = m.get("claim=") == 1.0
    if "claim<" in m:
        out["claim"] = m["claim>"] - m["claim<"]
    if "start<" in m and not claimed:  # (a claim's refill boots meanwhile: not this request)
        out["boot: shim"] = m["start>"] - m["start<"]
        out["boot: agent hello"] = m["ready>"] - m["ready<"]
    out["checkpoint"] = m["checkpoint>"] - m["checkpoint<"]
    out["agent: to started"] = m["started"] - m["send<"]
    out["agent: to exit"] = m["exit"] - m["started"]
    out["http out"] = end - m["exit"]
    out["total"] = end - start
    return {k: v * 1000 for k, v in out.items()}


Request = Callable[[], Awaitable[Any]]


async def measure(
    rounds: int, request: Request, entry: str, before: Request | None = None
) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    untimed = 0
    cpu = 0.0
    for _ in range(rounds):
        if before is not None:
            await before()
        marks.clear()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        await request()
        end = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        row = phases(start, end, entry)
        if row is None:
            untimed += 1
        else:
            rows.append(row)
    medians = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    cpu_ms = round(cpu / rounds * 1000, 2)
    return {"phases_ms": medians, "process_cpu_ms": cpu_ms, "untimed_rounds": untimed}


async def breakdown(rounds: int) -> dict[str, Any]:
    instrument()
    report: dict[str, Any] = {}
    async with bench_context(quick=False) as ctx:
        report["cold-run"] = await _runs(ctx, ctx.client, rounds, None)
        async with ctx.other_gateway("warm", warm_pool=[WarmPoolClass()]) as (warm, http):

            async def full() -> None:
                while await _pool_ready(http) < WarmPoolClass().size:
                    await trio.sleep(0.01)

            report["warm-run"] = await _runs(ctx, warm, rounds, full)
        kept = await ctx.client.run(command=["true"], keep_alive=600)
        try:
            for name, fields in (
                ("exec-true", {"command": ["true"]}),
                ("exec-python", {"code": HELLO, "language": "python"}),
            ):

                async def one(fields: dict[str, Any] = fields) -> None:
                    await ctx.client.exec(kept.id, **fields)

                report[name] = await measure(rounds, one, "exec")
        finally:
            await ctx.client.delete(kept.id)
    return report


async def _runs(
    ctx: Context, client: AsyncClient, rounds: int, before: Request | None
) -> dict[str, Any]:
    ids: list[str] = []

    async def one() -> None:
        created = await client.run(code=HELLO, language="python", keep_alive=0)
        ids.append(created.id)

    async def settle() -> None:
        for sandbox_id in ids:
            await ctx.wait_gone(sandbox_id, client)
        ids.clear()
        if before is not None:
            await before()

    return await measure(rounds, one, "create", settle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = trio.run(breakdown, args.rounds)
    for name, row in report.items():
        cpu, untimed = row["process_cpu_ms"], row["untimed_rounds"]
        print(f"{name}  (this process's CPU per request: {cpu} ms; untimed rounds: {untimed})")
        print_phases(row["phases_ms"])
    write_json(args.json, report)
    return 0


def print_phases(phases_ms: dict[str, float]) -> None:
    for phase, ms in phases_ms.items():
        print(f"  {phase:<20} {ms:8.2f} ms")


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
