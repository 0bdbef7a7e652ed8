"""Snapshot and resume: the gateway's endpoints vs raw ``runsc checkpoint`` / ``runsc restore``.

One cycle per round on each side, interleaved: start an idle agent, checkpoint it (timed:
``snapshot``), restore it (timed: ``resume``, until the agent answers a ping), tear down.
"""

from __future__ import annotations

import subprocess
import time

import trio

from bench.harness import Context, RawContainer, Result
from sandstorm.runtimes.base import HOST_ENV


async def _gateway_cycle(ctx: Context, snapshot: Result, resume: Result) -> None:
    sandbox = await ctx.client.run(command=["true"], keep_alive=600)
    # leave_running=False: a checkpoint that stops the sandbox, like raw ``runsc checkpoint``
    # (the default, leave_running=True, is checkpoint then restore).
    start = time.perf_counter()
    info = await ctx.client.snapshot(sandbox.id, leave_running=False)
    snapshot.gateway.samples.append((time.perf_counter() - start) * 1000)
    await ctx.wait_gone(sandbox.id)

    start = time.perf_counter()
    resumed = await ctx.client.resume(info.snapshot_id, keep_alive=600)
    resume.gateway.samples.append((time.perf_counter() - start) * 1000)
    await ctx.client.delete(resumed.id)
    await ctx.client.delete_snapshot(info.snapshot_id)


async def _raw_cycle(ctx: Context, snapshot: Result, resume: Result) -> None:
    image = ctx.workdir / f"image-{len(snapshot.raw.samples)}"
    async with ctx.raw_agent() as raw:
        start = time.perf_counter()
        await trio.run_process(
            ctx.runsc_cmd("checkpoint", "--image-path", str(image), raw.sid),
            capture_stdout=True,
            capture_stderr=True,
            env=HOST_ENV,
        )
        snapshot.raw.samples.append((time.perf_counter() - start) * 1000)
        await ctx.stop_raw(raw.sid, raw.process)  # frees the name for the restore

        proc = None
        try:
            start = time.perf_counter()
            proc = await ctx.start_raw(
                ["restore", "--image-path", str(image), "--bundle", str(raw.bundle), raw.sid]
            )
            await RawContainer(raw.sid, raw.bundle, proc).ping()
            resume.raw.samples.append((time.perf_counter() - start) * 1000)
        finally:
            await ctx.stop_raw(raw.sid, proc)
    await trio.run_process(["rm", "-rf", str(image)], stdout=subprocess.DEVNULL)


async def snapshot_and_resume(ctx: Context, rounds: int) -> dict[str, Result]:
    snapshot, resume = Result("ms"), Result("ms")
    snapshot.notes.append(
        "gateway: checkpoint, sha256, fsync and publish (the teardown follows the answer); "
        "raw: runsc checkpoint only"
    )
    resume.notes.append("both sides: restore until the agent answers a PING")
    for _ in range(rounds):
        await _gateway_cycle(ctx, snapshot, resume)
        await _raw_cycle(ctx, snapshot, resume)
    return {"snapshot": snapshot, "resume": resume}
