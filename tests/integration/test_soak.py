"""A one-minute soak (``python -m bench.soak``): a mixed workload on gVisor and QEMU with a
gateway SIGKILL and restart, a shim kill, a ``runsc-sandbox`` kill and a full disk injected,
and no leak, hang, lost output, unexplained 5xx or unexpected answer allowed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from tests.conftest import IMAGE_DATA_DIR, require, vm_image_missing

ROOT = Path(__file__).resolve().parents[2]
FAULTS = "gateway_kill,shim_kill,disk_full,runsc_kill"


async def test_one_minute_soak_with_faults(runsc_required: None, tmp_path: Path) -> None:
    require(vm_image_missing())
    out = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "bench.soak", "--minutes", "1", "--concurrency", "4",
            "--vm-workers", "1", "--faults", FAULTS, "--first-fault", "8", "--fault-every", "12",
            "--fault-hold", "5", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "SANDSTORM_TEST_DATA_DIR": str(IMAGE_DATA_DIR), "TMPDIR": str(tmp_path)}
    with trio.fail_after(300):
        done = await trio.run_process(
            argv, cwd=ROOT, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    report = done.stdout.decode()
    assert out.exists(), report[-3000:] + done.stderr.decode()[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failures"] == dict.fromkeys(summary["failures"], 0), report[-6000:]
    assert done.returncode == 0, report[-6000:]
    kinds = [f["kind"] for f in summary["faults"]]
    assert {"gateway_kill", "shim_kill", "runsc_kill", "disk_full"} <= set(kinds), kinds
    assert summary["settings"]["gateway_starts"] >= 2
    # The workload did run, on both runtimes, and its output was checked.
    assert summary["counts"]["output_bytes_checked"] > 0
    assert (
        summary["counts"].get("scenario.one_run.qemu", 0)
        + summary["counts"].get("scenario.session.qemu", 0)
        + summary["counts"].get("scenario.stream.qemu", 0)
        > 0
    )
