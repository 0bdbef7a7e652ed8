"""The benchmark harness still runs: a --quick smoke run of every scenario (not the targets)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from tests.conftest import IMAGE_DATA_DIR

ROOT = Path(__file__).resolve().parents[2]


async def test_bench_quick_runs_every_scenario(runsc_required: None, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "SANDSTORM_DATA_DIR": str(IMAGE_DATA_DIR)}
    with trio.fail_after(300):
        result = await trio.run_process(
            [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
            cwd=ROOT,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"cold-run", "stream-first-byte", "stream-throughput"}
    for name, scenario in report["results"].items():
        assert scenario["gateway"]["n"] >= 1 and scenario["raw"]["n"] >= 1, name
        assert scenario["gateway"]["p50"] > 0 and scenario["raw"]["p50"] > 0, name
    assert report["machine"]["cpus"] == os.cpu_count()
