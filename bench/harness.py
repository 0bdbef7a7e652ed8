"""What every scenario needs: a real gateway, raw runsc, sample series and their summaries."""

from __future__ import annotations

import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec
import trio

from sandstorm.agent import HEADER, FrameKind, agent_command
from sandstorm.config import Config, load_config
from sandstorm.images import image_rootfs, load_manifest
from sandstorm.main import serve
from sandstorm.runtimes.base import HOST_ENV, SandboxSpec
from sandstorm.runtimes.cgroups import V1_ALL, SandboxCgroups
from sandstorm.runtimes.gvisor import GvisorRuntime
from sandstorm.runtimes.oci import oci_config
from sandstorm.sdk import AsyncClient

ROOT = Path(__file__).resolve().parents[1]
IMAGE_DATA_DIR = Path(os.environ.get("SANDSTORM_DATA_DIR", "/var/lib/sandstorm"))
PING = int(FrameKind.PING)


@dataclass
class Series:
    samples: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Percentiles of the samples; of none (a row with no raw side), n = 0 and zeros."""
        s = sorted(self.samples)
        if not s:
            return {"n": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}

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


Unit = Literal["ms", "MB/s", "sb/s", "MiB"]
# Units where a bigger number is better (throughputs); the rest are costs.
HIGHER_IS_BETTER = {"MB/s", "sb/s"}


@dataclass
class Result:
    unit: Unit
    gateway: Series = field(default_factory=Series)
    raw: Series = field(default_factory=Series)
    # Figures that are not sample series (failures, RSS) and what a reader must know.
    extra: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        g, r = self.gateway.summary(), self.raw.summary()
        return {
            "unit": self.unit,
            "gateway": g,
            "raw": r,
            "ratio_p50": round(g["p50"] / r["p50"], 3) if r["p50"] else None,
            "extra": self.extra,
            "notes": self.notes,
            "samples": {"gateway": self.gateway.samples, "raw": self.raw.samples},
        }


@dataclass
class RawContainer:
    """A raw ``runsc run`` in the background with the agent as its process, on pipes."""

    sid: str
    bundle: Path
    process: trio.Process

    async def ping(self) -> None:
        """A PING/PONG round trip with the agent: the raw equivalent of the gateway's
        readiness check after a restore."""
        assert self.process.stdin is not None and self.process.stdout is not None
        await self.process.stdin.send_all(HEADER.pack(PING, 1, 4) + b"ping")
        await _read_at_least(self.process.stdout, HEADER.size + 4)


async def _read_at_least(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(1 << 16)
        if not chunk:
            raise RuntimeError(f"raw container closed its stdout after {len(data)} bytes")
        data += chunk
    return data


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
    # The size of the file the upload and download scenarios move (bench.files).
    file_mib: int = 256

    async def wait_gone(
        self, sandbox_id: str, client: AsyncClient | None = None, poll_s: float = 0.01
    ) -> None:
        """Wait (untimed) until a sandbox's teardown is over, so it cannot overlap a sample."""
        client = client or self.client
        while (await client.status(sandbox_id)).state not in ("destroyed", "failed"):
            await trio.sleep(poll_s)

    @asynccontextmanager
    async def other_gateway(
        self, name: str, **overrides: Any
    ) -> AsyncIterator[tuple[AsyncClient, httpx.AsyncClient]]:
        """A second gateway in this process, on its own data directory and cgroup parent,
        configured like the first plus ``overrides`` (the warm pool's): yields its clients."""
        data = self.workdir / name
        data.mkdir()
        (data / "images").symlink_to(IMAGE_DATA_DIR / "images")
        config = load_config(
            None, port=0, data_dir=str(data), cgroup_parent=f"{self.cgroup_parent}-{name}",
            max_sandboxes=256, on_shutdown="destroy",
            gvisor_platform=self.config.gvisor_platform, **overrides,
        )  # fmt: skip
        async with _gateway(config) as clients:
            yield clients

    async def client_process(self, module: str, *args: str, limit_s: float) -> Any:
        """Run ``python -m <module> URL <args…> limit_s`` (a client of the gateway in a process
        of its own, with ``self.client``'s URL and key; killed and reaped after ``limit_s`` +
        15 seconds, having given up by itself after ``limit_s``): its last JSON line."""
        env = dict(os.environ)
        if self.client.api_key:
            env["SANDSTORM_API_KEY"] = self.client.api_key
        cmd = [sys.executable, "-m", module, self.client.url, *args, str(limit_s)]
        with trio.fail_after(limit_s + 15):
            done = await trio.run_process(
                cmd, cwd=ROOT, env=env, capture_stdout=True, capture_stderr=True, check=False
            )
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"{module} {' '.join(args)} exited {done.returncode}: {why}")
        return json.loads(done.stdout.decode().splitlines()[-1])

    def runsc_cmd(self, *args: str) -> list[str]:
        """A runsc command line with the same global flags as the gateway's."""
        return [self.runsc, "--root", str(self.workdir / "root"),
                f"--platform={self.config.gvisor_platform}", "--network=none",
                "--overlay2=root:memory", *args]  # fmt: skip

    def gateway_runsc_cmd(self, *args: str) -> list[str]:
        """A runsc command line on the gateway's own state root: ``exec`` into one of its
        sandboxes (container id = sandbox id), as the raw twin of a request to that sandbox."""
        return [self.runsc, "--root", str(Path(self.config.data_dir) / "runsc"),
                f"--platform={self.config.gvisor_platform}", "--network=none",
                "--overlay2=root:memory", *args]  # fmt: skip

    @asynccontextmanager
    async def raw_bundle(self, argv: list[str]) -> AsyncIterator[tuple[str, Path]]:
        """A bundle equivalent to the gateway's (same image, flags, cgroup layout) running
        ``argv`` directly; yields its container id and directory."""
        sid = f"raw-{secrets.token_hex(6)}"
        bundle = self.workdir / sid
        bundle.mkdir()
        cgroups = SandboxCgroups(self.cgroup_parent)
        spec = SandboxSpec(sid, self.rootfs, 1.0, 512 << 20, 256)
        config = oci_config(spec, cgroups.runtime_path(sid))
        process: dict[str, Any] = config["process"]  # type: ignore[assignment]
        process["args"] = argv
        (bundle / "config.json").write_bytes(msgspec.json.encode(config))
        cgroups.create(sid, GvisorRuntime.host_limits(spec))
        try:
            yield sid, bundle
        finally:
            for _ in range(50):
                try:
                    cgroups.remove(sid)
                    break
                except OSError:
                    await trio.sleep(0.05)

    @asynccontextmanager
    async def raw_sandbox(self, argv: list[str]) -> AsyncIterator[list[str]]:
        """:meth:`raw_bundle`, yielding the ``runsc run`` command line."""
        async with self.raw_bundle(argv) as (sid, bundle):
            yield self.runsc_cmd("run", "--bundle", str(bundle), sid)

    async def start_raw(self, args: list[str]) -> trio.Process:
        """Start ``runsc run``/``restore`` in the background, the agent on its pipes."""
        return await trio.lowlevel.open_process(
            self.runsc_cmd(*args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=HOST_ENV,
        )

    async def stop_raw(self, sid: str, proc: trio.Process | None) -> None:
        """Kill and delete a raw container and reap its runsc; shielded, bounded."""
        with trio.CancelScope(shield=True):
            for args in (["kill", "--all", sid, "KILL"], ["delete", "--force", sid]):
                with trio.move_on_after(15):
                    await trio.run_process(
                        self.runsc_cmd(*args),
                        check=False,
                        capture_stdout=True,
                        capture_stderr=True,
                        env=HOST_ENV,
                    )
            if proc is not None:
                if proc.stdin is not None:
                    await proc.stdin.aclose()
                with trio.move_on_after(5):
                    await proc.wait()
                proc.kill()
                await proc.wait()

    @asynccontextmanager
    async def raw_agent(self) -> AsyncIterator[RawContainer]:
        """A raw container running the agent, idle (the raw twin of an idle sandbox); yields
        once the agent has said HELLO."""
        async with self.raw_bundle(list(agent_command())) as (sid, bundle):
            proc = None
            try:
                proc = await self.start_raw(["run", "--bundle", str(bundle), sid])
                assert proc.stdout is not None
                await _read_at_least(proc.stdout, HEADER.size)  # HELLO
                yield RawContainer(sid, bundle, proc)
            finally:
                await self.stop_raw(sid, proc)

    async def read_raw(self, cmd: list[str], on_chunk: Callable[[bytes | bytearray], None]) -> None:
        """Run ``runsc run`` and hand each chunk of its stdout to ``on_chunk`` as it arrives."""
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, env=HOST_ENV)
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
async def bench_context(
    quick: bool, gvisor_platform: str | None = None, file_mib: int = 256
) -> AsyncIterator[Context]:
    """A gateway of its own (and its raw counterpart's flags), on ``gvisor_platform`` when
    given, else the gateway's default."""
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
    # Room for the footprint scenario's 100 idle sandboxes (the default admits 64, and 32 of
    # the default 512 MiB in its 16 GiB budget: admission reserves limits, not what they use).
    # No warm pool: every scenario but warm-run (which starts a gateway with one) measures
    # cold boots.
    config = load_config(
        None, port=0, data_dir=str(work / "data"), cgroup_parent=parent, max_sandboxes=256,
        memory_budget=256 << 30, on_shutdown="destroy", warm_pool=[],
        **({"gvisor_platform": gvisor_platform} if gvisor_platform else {}),
    )  # fmt: skip
    try:
        async with _gateway(config) as (client, http):
            yield Context(
                client,
                http,
                config,
                _runsc(),
                image_rootfs(IMAGE_DATA_DIR),
                work,
                parent,
                quick,
                file_mib,
            )
    finally:
        for name in (parent, f"{parent}-warm"):
            cg = SandboxCgroups(name)
            for d in cg._dirs("", V1_ALL):
                if d.is_dir():
                    os.rmdir(d)
        await trio.to_thread.run_sync(__import__("shutil").rmtree, work, True)


@asynccontextmanager
async def _gateway(config: Config) -> AsyncIterator[tuple[AsyncClient, httpx.AsyncClient]]:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(_serve, config)
        async with (
            AsyncClient(binds[0]) as client,
            httpx.AsyncClient(base_url=binds[0], timeout=300) as http,
            _stopped_by_signals(),
        ):
            yield client, http
        nursery.cancel_scope.cancel()


class Interrupted(BaseException):
    """The bench was stopped by a signal (its number), after its gateway cleaned up. Not an
    ``Exception``: a scenario's failure is reported and the run goes on, a stop is not."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


@asynccontextmanager
async def _stopped_by_signals() -> AsyncIterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP (``timeout``, a closed terminal) cancels what runs inside, so
    the gateway around it still destroys its sandboxes (their shims outlive a killed gateway by
    design, and nobody else would reap a bench's), then raises :class:`Interrupted`."""
    caught: list[int] = []
    # One the bench started with ignored stays ignored: `nohup` (SIGHUP), a background job of a
    # script (SIGINT) mean to keep it running.
    wanted = [
        s
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(s) is not signal.SIG_IGN
    ]
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    caught.append(signum)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    if caught:
        raise Interrupted(caught[0])


async def _serve(config: Config, *, task_status: trio.TaskStatus[list[str]]) -> None:
    await serve(config, task_status=task_status, handle_signals=False)


def _runsc() -> str:
    for path in ("/usr/local/bin/runsc", "/usr/bin/runsc"):
        if os.access(path, os.X_OK):
            return path
    raise SystemExit("runsc not found")


def status_mib(field: str, status: str | None = None) -> float:
    """A ``VmRSS``/``VmHWM``-like line of ``/proc/self/status`` (or of ``status``, its text) in
    MiB; 0 when absent. The gateway runs in this process, together with the bench's own
    client, so a figure of this process overstates the gateway's a little."""
    if status is None:
        status = Path("/proc/self/status").read_text()
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) / 1024  # kB
    return 0.0


def loadavg() -> list[float]:
    """The host's 1, 5 and 15 minute load averages."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


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
        "runsc": _runsc_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _runsc_version() -> str:
    try:
        out = subprocess.run([_runsc(), "--version"], capture_output=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError, SystemExit):
        return "unknown"
    first = out.stdout.decode(errors="replace").splitlines()[:1]
    return first[0].removeprefix("runsc version ").strip() if first else "unknown"
