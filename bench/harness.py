"""What every scenario needs: a real gateway, raw runsc, sample series and their summaries."""

from __future__ import annotations

import os
import platform
import secrets
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec
import trio

from sandstorm.client import AsyncClient
from sandstorm.config import Config, load_config
from sandstorm.gateway import serve
from sandstorm.images.builder import image_rootfs, load_manifest
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.runtimes.cgroups import V1_ALL, SandboxCgroups
from sandstorm.runtimes.gvisor import RUNSC_ENV, host_limits, oci_config

IMAGE_DATA_DIR = Path(os.environ.get("SANDSTORM_DATA_DIR", "/var/lib/sandstorm"))


@dataclass
class Series:
    samples: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples)

        def pct(p: float) -> float:
            return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]

        return {
            "n": len(s),
            "p50": round(statistics.median(s), 3),
            "p90": round(pct(90), 3),
            "p99": round(pct(99), 3),
            "min": round(s[0], 3),
            "max": round(s[-1], 3),
        }


@dataclass
class Result:
    unit: Literal["ms", "MB/s"]
    gateway: Series = field(default_factory=Series)
    raw: Series = field(default_factory=Series)

    def to_json(self) -> dict[str, Any]:
        g, r = self.gateway.summary(), self.raw.summary()
        return {
            "unit": self.unit,
            "gateway": g,
            "raw": r,
            "ratio_p50": round(g["p50"] / r["p50"], 3) if r["p50"] else None,
            "samples": {"gateway": self.gateway.samples, "raw": self.raw.samples},
        }


@dataclass
class Context:
    client: AsyncClient
    http: httpx.AsyncClient
    config: Config
    runsc: str
    rootfs: Path
    workdir: Path
    cgroup_parent: str
    quick: bool

    async def wait_gone(self, sandbox_id: str) -> None:
        """Wait (untimed) until a sandbox's teardown is over, so it cannot overlap a sample."""
        while (await self.client.status(sandbox_id)).state not in ("destroyed", "failed"):
            await trio.sleep(0.01)

    @asynccontextmanager
    async def raw_sandbox(self, argv: list[str]) -> AsyncIterator[list[str]]:
        """A bundle equivalent to the gateway's (same image, flags, cgroup layout) running
        ``argv`` directly; yields the ``runsc run`` command line."""
        sid = f"raw-{secrets.token_hex(6)}"
        bundle = self.workdir / sid
        bundle.mkdir()
        cgroups = SandboxCgroups(self.cgroup_parent)
        spec = SandboxSpec(sid, self.rootfs, 1.0, 512 << 20, 256)
        config = oci_config(spec, cgroups.runtime_path(sid))
        process: dict[str, Any] = config["process"]  # type: ignore[assignment]
        process["args"] = argv
        (bundle / "config.json").write_bytes(msgspec.json.encode(config))
        cgroups.create(sid, host_limits(spec))
        try:
            yield [self.runsc, "--root", str(self.workdir / "root"), "--network=none",
                   "--overlay2=root:memory", "run", "--bundle", str(bundle), sid]  # fmt: skip
        finally:
            for _ in range(50):
                try:
                    cgroups.remove(sid)
                    break
                except OSError:
                    await trio.sleep(0.05)

    async def read_raw(self, cmd: list[str], on_chunk: Callable[[bytes], None]) -> None:
        """Run ``runsc run`` and hand each chunk of its stdout to ``on_chunk`` as it arrives."""
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, env=RUNSC_ENV)
        assert proc.stdout is not None
        try:
            while chunk := await proc.stdout.receive_some(1 << 20):
                on_chunk(chunk)
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    with trio.move_on_after(5):
                        await proc.wait()
                    proc.kill()
                await proc.wait()


@asynccontextmanager
async def bench_context(quick: bool) -> AsyncIterator[Context]:
    if load_manifest(IMAGE_DATA_DIR) is None:
        raise SystemExit("no default image: run `sandstorm image build` first")
    work = Path(
        await trio.to_thread.run_sync(
            lambda: __import__("tempfile").mkdtemp(prefix="sandstorm-bench-")
        )
    )
    (work / "data").mkdir()
    (work / "data" / "images").symlink_to(IMAGE_DATA_DIR / "images")
    (work / "root").mkdir()
    parent = f"sandstorm-bench-{secrets.token_hex(3)}"
    config = load_config(None, port=0, data_dir=str(work / "data"), cgroup_parent=parent)
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(_serve, config)
            async with (
                AsyncClient(binds[0]) as client,
                httpx.AsyncClient(base_url=binds[0], timeout=300) as http,
            ):
                yield Context(
                    client,
                    http,
                    config,
                    _runsc(),
                    image_rootfs(IMAGE_DATA_DIR),
                    work,
                    parent,
                    quick,
                )
            nursery.cancel_scope.cancel()
    finally:
        cg = SandboxCgroups(parent)
        for d in cg._dirs("", V1_ALL):
            if d.is_dir():
                os.rmdir(d)
        await trio.to_thread.run_sync(__import__("shutil").rmtree, work, True)


async def _serve(config: Config, *, task_status: trio.TaskStatus[list[str]]) -> None:
    await serve(config, task_status=task_status, handle_signals=False)


def _runsc() -> str:
    for path in ("/usr/local/bin/runsc", "/usr/bin/runsc"):
        if os.access(path, os.X_OK):
            return path
    raise SystemExit("runsc not found")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
