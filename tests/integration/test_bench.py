"""The benchmark harness still runs: a --quick smoke run of every scenario (not the targets)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import IMAGE_DATA_DIR

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path | None = None) -> dict[str, str]:
    """The bench's environment: the built image; its temporary directory under ``tmp_path``."""
    env = {**os.environ, "SANDSTORM_DATA_DIR": str(IMAGE_DATA_DIR)}
    return env if tmp_path is None else {**env, "TMPDIR": str(tmp_path)}


async def _json_of(module_args: list[str], out: Path, env: dict[str, str], seconds: float) -> Any:
    """Run ``python -m <module_args> --json out``, which must succeed; its report."""
    with trio.fail_after(seconds):
        result = await trio.run_process(
            [sys.executable, "-m", *module_args, "--json", str(out)],
            cwd=ROOT,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return json.loads(out.read_text())


async def test_bench_quick_runs_every_scenario(runsc_required: None, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    plot = ["--plot", str(tmp_path / "bench.png")] if find_spec("matplotlib") else []
    report = await _json_of(["bench", "--quick", *plot], out, _env(), 400)
    # Every scenario; concurrency runs at N=2 and 4 in --quick (8 and 32 in full).
    assert set(report["results"]) == {
        "cold-run",
        "warm-run",
        "exec-true",
        "exec-python",
        "stream-first-byte",
        "stream-throughput",
        "concurrency-2",
        "concurrency-4",
        "snapshot",
        "resume",
        "footprint",
        "files-upload",
        "files-download",
        "files-small",
        "files-tree",
        "files-qemu-upload",
        "files-qemu-download",
    }
    # Measured through the gateway only: no raw side, no ratio, no target.
    gateway_only = {"files-qemu-upload", "files-qemu-download"}
    for name in gateway_only:
        row = report["results"][name]
        assert row["gateway"]["n"] == 1 and row["gateway"]["p50"] > 0, name
        assert row["raw"]["n"] == 0 and row["ratio_p50"] is None and row["target"] is None, name
    for name, scenario in report["results"].items():
        if name in gateway_only:
            continue
        assert scenario["gateway"]["n"] >= 1 and scenario["raw"]["n"] >= 1, name
        assert scenario["gateway"]["p50"] > 0 and scenario["raw"]["p50"] > 0, name
        assert scenario["ratio_p50"] > 0, name
        # Every row but files-tree's (a figure reported) has a target and a verdict (the
        # verdict itself is not checked: --quick is a smoke run on whatever machine runs it).
        if name == "files-tree":
            assert scenario["target"] is None
        else:
            assert isinstance(scenario["target"]["met"], bool), name
    results = report["results"]
    assert results["concurrency-4"]["extra"]["gateway_failures"] == 0
    assert results["footprint"]["extra"]["sandboxes"] == 5
    assert results["footprint"]["extra"]["gateway_idle_cpu_ms_per_s"] >= 0
    assert results["footprint"]["extra"]["raw_idle_cpu_ms_per_s"] >= 0
    assert report["failed"] == {}
    assert 0 < results["footprint"]["extra"]["gateway_rss_mib"] < 1024
    for name in ("files-upload", "files-download", *gateway_only):
        assert results[name]["extra"]["mib"] == 16, name  # --quick's size
        assert 0 <= results[name]["extra"]["gateway_rss_growth_mib"] < 1024, name
    assert results["files-tree"]["extra"]["entries"] == 10_000
    assert plot == [] or (tmp_path / "bench.png").stat().st_size > 0
    # A single scenario can be asked for; resume alone does not report the snapshot row.
    out.unlink()
    alone = await _json_of(["bench", "--quick", "--scenario", "resume"], out, _env(), 120)
    assert set(alone["results"]) == {"resume"}
    assert report["machine"]["cpus"] == os.cpu_count()


@pytest.mark.parametrize(
    ("scenario", "shims", "count", "signum", "ignored"),
    [
        # Five idle sandboxes of the bench's gateway.
        ("footprint", "data/shims/sbx_*", 5, signal.SIGTERM, None),
        ("footprint", "data/shims/sbx_*", 5, signal.SIGINT, None),
        # Under nohup: the hangup is ignored, the bench goes on until SIGTERM.
        ("footprint", "data/shims/sbx_*", 5, signal.SIGTERM, signal.SIGHUP),
        # The warm pool of a second gateway inside it.
        ("warm-run", "warm/shims/sbx_*", 2, signal.SIGTERM, None),
    ],
    ids=["sigterm", "sigint", "nohup-then-sigterm", "warm-pool-sigterm"],
)
async def test_a_bench_stopped_by_a_signal_leaves_no_sandbox(
    runsc_required: None,
    tmp_path: Path,
    scenario: str,
    shims: str,
    count: int,
    signum: int,
    ignored: int | None,
) -> None:
    """Ctrl-C, `timeout` or a closed terminal stops the bench (SIGINT, SIGTERM, SIGHUP): its
    gateways still destroy every sandbox (their shims would outlive them, and nobody else
    reaps a bench's), and the run stops there rather than going on to the next scenario. A
    signal it started with ignored stays ignored."""
    with trio.fail_after(120):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench", "--quick", "--scenario", scenario],
            cwd=ROOT,
            env=_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # As from a terminal (or nohup), whatever this test runs under.
            preexec_fn=functools.partial(_start_signals, ignored),
        )
        try:
            # Its sandboxes are up once their shims' directories are there.
            while len(list(tmp_path.glob(f"sandstorm-bench-*/{shims}"))) < count:
                assert process.poll() is None, "the bench ended before its sandboxes were up"
                await trio.sleep(0.1)
            work = next(tmp_path.glob("sandstorm-bench-*"))
            if ignored is not None:
                process.send_signal(ignored)
                await trio.sleep(1)
                assert process.poll() is None, "an ignored signal stopped the bench"
            process.send_signal(signum)
            assert process.stderr is not None
            stderr = b""
            while chunk := await process.stderr.receive_some(65536):
                stderr = (stderr + chunk)[-65536:]  # its end says why
            assert await process.wait() == 128 + signum, stderr.decode()[-3000:]
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
    assert f"stopped by signal {signum}".encode() in stderr
    assert not work.exists()
    assert [c for c in _command_lines() if str(work).encode() in c] == []


def _start_signals(ignored: int | None) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN if signum == ignored else signal.SIG_DFL)


def _command_lines() -> list[bytes]:
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # gone meanwhile
            lines.append(path.read_bytes())
    return lines


@pytest.mark.parametrize(
    ("tool", "args", "keys"),
    [
        ("bench.breakdown", ["--rounds", "1"], {"cold-run", "warm-run", "exec-true"}),
        ("bench.snapshot_phases", ["--rounds", "1", "--idle", "0"], {"phases_ms", "request_ms"}),
        ("bench.cpu_per_sandbox", ["--n", "2", "--rounds", "1"], {"per_sandbox", "samples"}),
    ],
)
async def test_the_bench_tools_that_split_the_time_run(
    runsc_required: None, tmp_path: Path, tool: str, args: list[str], keys: set[str]
) -> None:
    """The tools that split where the time goes still run (one round each, not the figures)."""
    report = await _json_of([tool, *args], tmp_path / "out.json", _env(tmp_path), 240)
    assert keys <= set(report), sorted(report)
    if tool == "bench.cpu_per_sandbox":
        for side in ("gateway", "raw"):
            row = report["per_sandbox"][side]
            assert row["sandboxes_per_s"] > 0 and row["machine_busy_ms"] > 0, row
            assert row["children_ms"] > 0, row  # runsc and the sandboxes were reaped
