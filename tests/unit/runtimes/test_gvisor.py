"""gVisor's platform: new sandboxes boot on the configured one (ptrace by default: systrap
keeps idle sandboxes busy, docs/performance.md), and a snapshot resumes on the platform it
was taken on, whatever the resuming gateway is configured with (an image taken on systrap does
not restore on ptrace)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from sandstorm.runtimes.base import RuntimeStartError
from sandstorm.runtimes.gvisor.runtime import PLATFORM_FILE, read_platform
from sandstorm.shim import read_pids, shim_paths
from tests.harness import RunningGateway


def test_the_recorded_platform_is_read_back_or_refused(tmp_path: Path) -> None:
    assert read_platform(tmp_path) is None  # none recorded: runsc's default
    (tmp_path / PLATFORM_FILE).write_text("systrap\n")
    assert read_platform(tmp_path) == "systrap"
    (tmp_path / PLATFORM_FILE).write_text("--debug\n")
    with pytest.raises(RuntimeStartError, match="unknown gVisor platform"):
        read_platform(tmp_path)


def _runsc_argv(gw: RunningGateway, sandbox_id: str) -> list[bytes]:
    """The command line of the runsc process holding ``sandbox_id`` (its shim's child)."""
    pids = read_pids(shim_paths(gw.data_dir, sandbox_id))
    assert pids is not None
    return Path(f"/proc/{pids[1]}/cmdline").read_bytes().split(b"\0")


async def _run(gw: RunningGateway, script: str) -> str:
    body = await gw.run_ok(command=["sh", "-c", script], keep_alive=60)
    sandbox_id: str = body["id"]
    return sandbox_id


async def test_sandboxes_boot_on_the_configured_platform(start_gateway: Any) -> None:
    async with start_gateway() as gw:
        with trio.fail_after(60):
            sandbox_id = await _run(gw, "true")
            assert b"--platform=ptrace" in _runsc_argv(gw, sandbox_id)
            assert read_platform(gw.data_dir / "sandboxes" / sandbox_id) == "ptrace"
    async with start_gateway(gvisor_platform="systrap") as gw:
        with trio.fail_after(60):
            sandbox_id = await _run(gw, "true")
            assert b"--platform=systrap" in _runsc_argv(gw, sandbox_id)


async def test_a_snapshot_resumes_on_the_platform_it_was_taken_on(start_gateway: Any) -> None:
    async with start_gateway(gvisor_platform="systrap") as gw:
        with trio.fail_after(60):
            sandbox_id = await _run(gw, "echo kept > /workspace/f")
            taken = await gw.client.post(
                f"/v1/sandboxes/{sandbox_id}/snapshot", json={"leave_running": False}
            )
            assert taken.status_code == 201, taken.text
            snapshot_id = taken.json()["snapshot_id"]
    async with start_gateway() as gw:  # ptrace, the default
        with trio.fail_after(60):
            resumed = await gw.client.post(
                "/v1/sandboxes/resume", json={"snapshot_id": snapshot_id, "keep_alive": 60}
            )
            assert resumed.status_code == 201, resumed.text
            sandbox_id = resumed.json()["id"]
            assert b"--platform=systrap" in _runsc_argv(gw, sandbox_id)
            read = await gw.client.post(
                f"/v1/sandboxes/{sandbox_id}/exec", json={"command": ["cat", "/workspace/f"]}
            )
            assert read.status_code == 201, read.text
            assert read.json()["result"]["stdout"] == "kept\n"
            # Snapshotted again, it stays a systrap image; new sandboxes boot on ptrace.
            again = await gw.client.post(f"/v1/sandboxes/{sandbox_id}/snapshot", json={})
            assert again.status_code == 201, again.text
            image = gw.data_dir / "snapshots" / again.json()["snapshot_id"]
            assert read_platform(image) == "systrap"
            fresh = await _run(gw, "true")
            assert b"--platform=ptrace" in _runsc_argv(gw, fresh)
