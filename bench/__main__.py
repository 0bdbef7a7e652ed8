"""``python -m bench [--scenario NAME…] [--rounds N] [--quick] [--json FILE]``

Starts a real gateway (Hypercorn on a free port, real runsc) in this process and, for each
scenario, alternates one gateway sample with one raw-runtime sample (A B A B…), so that both see
the same machine noise. Prints p50/p90/p99 and the ratio of medians; writes JSON on request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from sandstorm.config import Config, load_config
from sandstorm.gateway import serve
from sandstorm.images.builder import image_rootfs, load_manifest
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.runtimes.cgroups import V1_ALL, SandboxCgroups
from sandstorm.runtimes.gvisor import RUNSC_ENV, oci_config

HELLO = "print('Hello, World!')"


@dataclass
class Series:
    name: str
    samples_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples_ms)

        def pct(p: float) -> float:
            return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]

        return {
            "n": len(s),
            "p50": round(statistics.median(s), 2),
            "p90": round(pct(90), 2),
            "p99": round(pct(99), 2),
            "min": round(s[0], 2),
        }


@dataclass
class Context:
    client: httpx.AsyncClient
    config: Config
    runsc: str
    rootfs: Path
    workdir: Path
    cgroup_parent: str


async def _timed(fn: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await fn()
    return (time.perf_counter() - start) * 1000


async def gateway_cold_run(ctx: Context) -> float:
    sandbox_id = ""

    async def once() -> None:
        nonlocal sandbox_id
        r = await ctx.client.post(
            "/v1/sandboxes/run", json={"code": HELLO, "language": "python", "keep_alive": 0}
        )
        body = r.json()
        assert r.status_code == 201 and body["result"]["stdout"] == "Hello, World!\n", r.text
        sandbox_id = body["id"]

    ms = await _timed(once)
    # Not timed: let the teardown finish so it does not overlap the next sample.
    while (await ctx.client.get(f"/v1/sandboxes/{sandbox_id}/status")).json()["state"] not in (
        "destroyed",
        "failed",
    ):
        await trio.sleep(0.01)
    return ms


async def raw_runsc_run(ctx: Context) -> float:
    """``runsc run`` of an equivalent bundle: same image, flags and cgroup layout, no gateway."""
    sid = f"raw-{secrets.token_hex(6)}"
    bundle = ctx.workdir / sid
    bundle.mkdir()
    cgroups = SandboxCgroups(ctx.cgroup_parent)
    from sandstorm.runtimes.cgroups import Limits

    spec = SandboxSpec(sid, ctx.rootfs, 1.0, 512 << 20, 256)
    config = oci_config(spec, cgroups.runtime_path(sid))
    process: dict[str, Any] = config["process"]  # type: ignore[assignment]
    process["args"] = ["/usr/bin/python3", "-c", HELLO]
    (bundle / "config.json").write_bytes(msgspec.json.encode(config))
    argv = [ctx.runsc, "--root", str(ctx.workdir / "root"), "--network=none",
            "--overlay2=root:memory", "run", "--bundle", str(bundle), sid]  # fmt: skip

    async def once() -> None:
        cgroups.create(sid, Limits(1.0, 512 << 20, 256))
        result = await trio.run_process(argv, capture_stdout=True, env=RUNSC_ENV)
        assert result.stdout == b"Hello, World!\n", result.stdout

    try:
        return await _timed(once)
    finally:
        cgroups.remove(sid)


SCENARIOS: dict[
    str, tuple[Callable[[Context], Awaitable[float]], Callable[[Context], Awaitable[float]]]
] = {
    "cold-run": (gateway_cold_run, raw_runsc_run),
}


async def run_bench(names: list[str], rounds: int, warmup: int) -> dict[str, Any]:
    manifest = load_manifest(Path("/var/lib/sandstorm"))
    if manifest is None:
        raise SystemExit("no default image: run `sandstorm image build` first")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sandstorm-bench-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        (work / "data" / "images").symlink_to("/var/lib/sandstorm/images")
        (work / "root").mkdir()
        parent = f"sandstorm-bench-{secrets.token_hex(3)}"
        config = load_config(None, port=0, data_dir=str(work / "data"), cgroup_parent=parent)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(_serve, config)
            async with httpx.AsyncClient(base_url=binds[0], timeout=120) as client:
                ctx = Context(client, config, _runsc(), image_rootfs(Path("/var/lib/sandstorm")),
                              work, parent)  # fmt: skip
                for name in names:
                    gateway_fn, raw_fn = SCENARIOS[name]
                    gw, raw = Series("gateway"), Series("raw")
                    for i in range(warmup + rounds):
                        a, b = await gateway_fn(ctx), await raw_fn(ctx)
                        if i >= warmup:
                            gw.samples_ms.append(a)
                            raw.samples_ms.append(b)
                    g, r = gw.summary(), raw.summary()
                    results[name] = {
                        "gateway": g,
                        "raw": r,
                        "ratio_p50": round(g["p50"] / r["p50"], 3),
                        "samples": {"gateway": gw.samples_ms, "raw": raw.samples_ms},
                    }
            nursery.cancel_scope.cancel()
        cg = SandboxCgroups(parent)
        for d in cg._dirs("", V1_ALL):
            if d.is_dir():
                os.rmdir(d)
    return results


async def _serve(config: Config, *, task_status: trio.TaskStatus[list[str]]) -> None:
    await serve(config, task_status=task_status, handle_signals=False)


def _runsc() -> str:
    for path in ("/usr/local/bin/runsc", "/usr/bin/runsc"):
        if os.access(path, os.X_OK):
            return path
    raise SystemExit("runsc not found")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds, no warm-up")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    names = args.scenario or sorted(SCENARIOS)
    rounds, warmup = (3, 0) if args.quick else (args.rounds, 3)
    results = trio.run(run_bench, names, rounds, warmup)
    print(f"{'scenario':<12} {'side':<8} {'p50':>8} {'p90':>8} {'p99':>8}  ratio(p50)")
    for name, r in results.items():
        for side in ("gateway", "raw"):
            s = r[side]
            ratio = f"{r['ratio_p50']:.2f}x" if side == "gateway" else ""
            print(
                f"{name:<12} {side:<8} {s['p50']:>8.1f} {s['p90']:>8.1f} {s['p99']:>8.1f}  {ratio}"
            )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
