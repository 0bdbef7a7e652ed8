"""The file scenarios: the gateway's file routes (SPEC §8) vs ``runsc exec`` moving the same
bytes in and out of the same sandbox, interleaved.

The raw side execs into the gateway's own kept sandbox (``runsc --root`` the gateway's state
root; the container id is the sandbox id) as its user, so both sides read and write the same
filesystem (gVisor's memory overlay). Its writes are fed from a pipe written here: of a large
file with ``sh -c 'exec cat > PATH'`` (cat's larger reads move 256 MiB faster than ``dd``), of a
small one with ``dd of=PATH`` (one process: no shell's ``execve``). Its reads are ``cat PATH``
into a pipe read here.

``files-upload`` and ``files-download`` come from one function (a round is: gateway upload,
raw upload, gateway download, raw download). The gateway's HTTP client there runs in a process
of its own (``bench.files_client``), as a deployment's does; while it transfers, this process's
``VmRSS`` (the gateway runs in it) is sampled every RSS_SAMPLE_S and its CPU time counted.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from bench.harness import Context, Result, status_mib
from sandstorm.runtimes.base import HOST_ENV

FILE_MIB = 256
QUICK_FILE_MIB = 16
MIB = 1 << 20
SMALL_BYTES = 1024
TREE_ENTRIES = 10_000
RSS_SAMPLE_S = 0.02
WORKSPACE = "/workspace"
GATEWAY_FILE = f"{WORKSPACE}/bench-gateway.bin"
RAW_FILE = f"{WORKSPACE}/bench-raw.bin"
TREE = f"{WORKSPACE}/tree"
# One line per entry, with what the gateway's entry holds: type, mode, size, mtime, path.
FIND_ENTRIES = ["find", TREE, "-mindepth", "1", "-maxdepth", "1", "-printf", "%y %m %s %T@ %p\n"]
MAKE_TREE = (
    "import os\n"
    f"os.makedirs({TREE!r})\n"
    f"for i in range({TREE_ENTRIES}):\n"
    f"    open(f'{TREE}/entry-{{i:05}}', 'wb').close()\n"
)
Rows = dict[str, Result]


def _raw_exec(ctx: Context, sandbox_id: str, *argv: str) -> list[str]:
    """``runsc exec`` of ``argv`` in the gateway's sandbox, as its user, in /workspace."""
    user = ["--user", "1000:1000", "--cwd", WORKSPACE]
    return ctx.gateway_runsc_cmd("exec", *user, sandbox_id, *argv)


def _content(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{sandbox_id}/files/content"


def _files(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{sandbox_id}/files"


@asynccontextmanager
async def _kept_sandbox(
    ctx: Context, memory_limit: int | None = None, isolation_level: str = "standard"
) -> AsyncIterator[str]:
    fields = {} if memory_limit is None else {"memory_limit": memory_limit}
    sandbox = await ctx.client.run(
        command=["true"], keep_alive=600, isolation_level=isolation_level, **fields
    )
    try:
        yield sandbox.id
    finally:
        with trio.CancelScope(shield=True):
            await ctx.client.delete(sandbox.id)


async def _remove(ctx: Context, sandbox_id: str, *paths: str) -> None:
    """Remove files left by a previous round (untimed), so a round never overwrites one."""
    await trio.run_process(_raw_exec(ctx, sandbox_id, "rm", "-f", *paths), env=HOST_ENV)


async def _raw_size(ctx: Context, sandbox_id: str, path: str) -> int:
    cmd = _raw_exec(ctx, sandbox_id, "stat", "--format=%s", path)
    return int((await trio.run_process(cmd, capture_stdout=True, env=HOST_ENV)).stdout)


# ------------------------------------------------------------------ gateway memory


@dataclass
class GatewayCost:
    """What the transfers cost this process (the gateway's): how far its resident set rose
    above where it stood as each transfer began (the most over all of them), how far its
    high-water mark rose over all of them, and its CPU time per MiB moved."""

    growth_mib: float = 0.0
    hwm_before_mib: float | None = None
    hwm_after_mib: float = 0.0
    cpu_s: float = 0.0
    moved_mib: int = 0

    @asynccontextmanager
    async def sampled(self, mib: int) -> AsyncIterator[None]:
        """Sample ``VmRSS`` every RSS_SAMPLE_S while the body, a transfer of ``mib``, runs."""
        cpu = time.process_time()
        before = status_mib("VmRSS")
        if self.hwm_before_mib is None:
            self.hwm_before_mib = status_mib("VmHWM")
        peak = before

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, status_mib("VmRSS"))
                await trio.sleep(RSS_SAMPLE_S)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
        peak = max(peak, status_mib("VmRSS"))
        self.growth_mib = max(self.growth_mib, peak - before)
        self.hwm_after_mib = status_mib("VmHWM")
        self.cpu_s += time.process_time() - cpu
        self.moved_mib += mib

    def report(self, result: Result) -> None:
        result.extra["gateway_rss_growth_mib"] = round(self.growth_mib, 1)
        hwm_growth = self.hwm_after_mib - (self.hwm_before_mib or 0.0)
        result.extra["gateway_vmhwm_growth_mib"] = round(hwm_growth, 1)
        if self.moved_mib:
            result.extra["gateway_cpu_ms_per_mib"] = round(self.cpu_s * 1000 / self.moved_mib, 2)


def megabytes_per_s(size: int, elapsed_s: float) -> float:
    return size / elapsed_s / 1e6


# ------------------------------------------------------------------ upload and download


async def _gateway_transfer(
    ctx: Context, sandbox_id: str, mode: str, path: str, cost: GatewayCost
) -> float:
    """MB/s of one upload or download by ``bench.files_client``."""
    limit_s = max(60.0, ctx.file_mib / 2)  # 2 MiB/s at the least
    async with cost.sampled(ctx.file_mib):
        out = await ctx.client_process(
            "bench.files_client", sandbox_id, mode, path, str(ctx.file_mib), limit_s=limit_s
        )
    assert out["bytes"] == ctx.file_mib * MIB, out
    return megabytes_per_s(out["bytes"], out["elapsed_s"])


async def _raw_upload(ctx: Context, sandbox_id: str, block: bytes) -> float:
    """MB/s of the file's bytes through ``runsc exec sh -c 'exec cat > PATH'``, from spawn
    to exit."""
    cmd = _raw_exec(ctx, sandbox_id, "sh", "-c", 'exec cat > "$0"', RAW_FILE)
    run = functools.partial(
        trio.run_process, cmd, stdin=subprocess.PIPE, capture_stderr=True, env=HOST_ENV
    )
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(run)
        assert process.stdin is not None
        for _ in range(ctx.file_mib):
            await process.stdin.send_all(block)
        await process.stdin.aclose()
    elapsed = time.perf_counter() - start
    size = await _raw_size(ctx, sandbox_id, RAW_FILE)
    assert size == ctx.file_mib * MIB, size
    return megabytes_per_s(size, elapsed)


async def _raw_download(ctx: Context, sandbox_id: str, path: str) -> float:
    """MB/s of ``runsc exec cat`` of the file into a pipe read here, from spawn to exit."""
    cmd = _raw_exec(ctx, sandbox_id, "cat", path)
    run = functools.partial(
        trio.run_process, cmd, stdout=subprocess.PIPE, capture_stderr=True, env=HOST_ENV
    )
    received = 0
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(run)
        assert process.stdout is not None
        while chunk := await process.stdout.receive_some(MIB):
            received += len(chunk)
    elapsed = time.perf_counter() - start
    assert received == ctx.file_mib * MIB, received
    return megabytes_per_s(received, elapsed)


async def files_transfer(ctx: Context, rounds: int) -> Rows:
    """``files-upload`` and ``files-download``: ``ctx.file_mib`` MiB in and out of one kept
    sandbox through the gateway (PUT/GET files/content) vs ``runsc exec``."""
    upload, download = Result("MB/s"), Result("MB/s")
    upload_cost, download_cost = GatewayCost(), GatewayCost()
    block = os.urandom(MIB)  # as bench.files_client's
    # Both sides' files (in memory, gVisor's overlay) and the sandbox's own use, with room.
    memory = 3 * ctx.file_mib * MIB + (512 << 20)
    limit_s = max(60.0, ctx.file_mib / 2)
    async with _kept_sandbox(ctx, memory) as sandbox_id:
        for _ in range(rounds):
            await _remove(ctx, sandbox_id, GATEWAY_FILE, RAW_FILE)
            sample = _gateway_transfer(ctx, sandbox_id, "upload", GATEWAY_FILE, upload_cost)
            upload.gateway.samples.append(await sample)
            with trio.fail_after(limit_s):
                upload.raw.samples.append(await _raw_upload(ctx, sandbox_id, block))
            sample = _gateway_transfer(ctx, sandbox_id, "download", GATEWAY_FILE, download_cost)
            download.gateway.samples.append(await sample)
            with trio.fail_after(limit_s):
                download.raw.samples.append(await _raw_download(ctx, sandbox_id, RAW_FILE))
    for result, cost in ((upload, upload_cost), (download, download_cost)):
        cost.report(result)
        result.extra["mib"] = ctx.file_mib
        result.notes.append(
            f"{ctx.file_mib} MiB a sample; the gateway's RSS rose at most "
            f"{result.extra['gateway_rss_growth_mib']} MiB during a transfer "
            "(sampled VmRSS of the bench's process, where the gateway runs)"
        )
    upload.notes.append("raw: runsc exec sh -c 'exec cat > PATH', its stdin a pipe written here")
    download.notes.append("raw: runsc exec cat PATH, its stdout a pipe read here")
    return {"files-upload": upload, "files-download": download}


async def files_qemu(ctx: Context, rounds: int) -> Rows:
    """``files-qemu-upload`` and ``files-qemu-download``: the same transfers into a QEMU
    sandbox (``isolation_level: maximum``), through the gateway only. Raw QEMU has no ``exec``:
    moving the bytes without the gateway would mean booting the VM by hand and speaking the
    agent's protocol to it, which is the gateway's own path, not a simpler one."""
    runtimes = {r.name: r for r in await ctx.client.runtimes()}
    if "qemu" not in runtimes or not runtimes["qemu"].available:
        print("bench: files-qemu skipped: the qemu runtime is not available", file=sys.stderr)
        return {}
    upload, download = Result("MB/s"), Result("MB/s")
    upload_cost, download_cost = GatewayCost(), GatewayCost()
    memory = 2 * ctx.file_mib * MIB + (512 << 20)  # the file and its atomic write's new copy
    async with _kept_sandbox(ctx, memory, isolation_level="maximum") as sandbox_id:
        for _ in range(rounds):
            gone = await ctx.http.delete(_files(sandbox_id), params={"path": GATEWAY_FILE})
            assert gone.status_code in (204, 404), gone.text[:500]
            sample = _gateway_transfer(ctx, sandbox_id, "upload", GATEWAY_FILE, upload_cost)
            upload.gateway.samples.append(await sample)
            sample = _gateway_transfer(ctx, sandbox_id, "download", GATEWAY_FILE, download_cost)
            download.gateway.samples.append(await sample)
    for result, cost in ((upload, upload_cost), (download, download_cost)):
        cost.report(result)
        result.extra["mib"] = ctx.file_mib
        result.notes.append(
            f"QEMU, {ctx.file_mib} MiB a sample, through the gateway only (no raw twin: QEMU "
            "has no exec); the gateway's RSS rose at most "
            f"{result.extra['gateway_rss_growth_mib']} MiB during a transfer"
        )
    return {"files-qemu-upload": upload, "files-qemu-download": download}


# ------------------------------------------------------------------ small files and a tree


async def files_small(ctx: Context, rounds: int) -> Rows:
    """PUT then GET of 1 KiB (a sample is both, HTTP included) vs ``runsc exec dd`` in and
    ``runsc exec cat`` out of the same bytes."""
    result = Result("ms")
    data = bytes(range(256)) * (SMALL_BYTES // 256)
    splits: dict[str, list[float]] = {k: [] for k in ("gw_put", "gw_get", "raw_in", "raw_out")}
    path = f"{WORKSPACE}/bench-small.bin"
    async with _kept_sandbox(ctx) as sandbox_id:
        route = _content(sandbox_id)
        put_cmd = _raw_exec(ctx, sandbox_id, "dd", f"of={path}", "status=none")
        cat_cmd = _raw_exec(ctx, sandbox_id, "cat", path)
        for _ in range(rounds):
            start = time.perf_counter()
            put = await ctx.http.put(route, params={"path": path}, content=data)
            middle = time.perf_counter()
            got = await ctx.http.get(route, params={"path": path})
            end = time.perf_counter()
            assert put.status_code == 201 and put.json()["size"] == SMALL_BYTES, put.text
            assert got.status_code == 200 and got.content == data, got.status_code
            result.gateway.samples.append((end - start) * 1000)
            splits["gw_put"].append((middle - start) * 1000)
            splits["gw_get"].append((end - middle) * 1000)

            start = time.perf_counter()
            await trio.run_process(put_cmd, stdin=data, env=HOST_ENV)
            middle = time.perf_counter()
            out = await trio.run_process(cat_cmd, capture_stdout=True, env=HOST_ENV)
            end = time.perf_counter()
            assert out.stdout == data
            result.raw.samples.append((end - start) * 1000)
            splits["raw_in"].append((middle - start) * 1000)
            splits["raw_out"].append((end - middle) * 1000)
        # The same pair back to back, as a caller that writes then reads files does: the
        # sandbox is not left to idle behind a raw exec between them.
        back_to_back = []
        for _ in range(rounds):
            start = time.perf_counter()
            await ctx.http.put(route, params={"path": path}, content=data)
            await ctx.http.get(route, params={"path": path})
            back_to_back.append((time.perf_counter() - start) * 1000)
    for name, samples in splits.items():
        result.extra[f"{name}_p50_ms"] = round(statistics.median(samples), 3)
    result.extra["gw_back_to_back_p50_ms"] = round(statistics.median(back_to_back), 3)
    result.notes.append(
        "a sample is a write then a read of 1 KiB; raw: runsc exec dd of=PATH, runsc exec cat;"
        " gw_back_to_back: the gateway's pairs one after another, with no raw exec between"
    )
    return {"files-small": result}


async def files_tree(ctx: Context, rounds: int) -> Rows:
    """GET files/list of a directory of 10,000 empty files (made by one exec, untimed) vs
    ``runsc exec find -maxdepth 1 -printf`` of the same fields into a pipe."""
    result = Result("ms", extra={"entries": TREE_ENTRIES})
    async with _kept_sandbox(ctx) as sandbox_id:
        made = await ctx.client.exec(sandbox_id, code=MAKE_TREE, language="python", timeout=120_000)
        assert made.result is not None and made.result.exit_code == 0, made
        route = f"/v1/sandboxes/{sandbox_id}/files/list"
        find = _raw_exec(ctx, sandbox_id, *FIND_ENTRIES)
        for _ in range(rounds):
            start = time.perf_counter()
            listed = await ctx.http.get(route, params={"path": TREE, "depth": 1})
            result.gateway.samples.append((time.perf_counter() - start) * 1000)
            assert listed.status_code == 200, listed.text[:500]
            body = listed.json()
            assert len(body["entries"]) == TREE_ENTRIES and not body["truncated"], len(body)

            start = time.perf_counter()
            out = await trio.run_process(find, capture_stdout=True, env=HOST_ENV)
            result.raw.samples.append((time.perf_counter() - start) * 1000)
            assert out.stdout.count(b"\n") == TREE_ENTRIES
    result.notes.append(
        "gateway: until the whole JSON body is here (not decoded); "
        "raw: runsc exec find -maxdepth 1 -printf type, mode, size, mtime and path"
    )
    return {"files-tree": result}
