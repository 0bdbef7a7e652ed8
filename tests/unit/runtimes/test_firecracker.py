"""The firecracker runtime: its guest's vsock bridge compiles, detection and the registry give
the reason it cannot run here (no binary in the package registries, and /dev/kvm emulates
instead of running guests), and a sandbox with mounts is refused before anything is made.
Firecracker's API and its jailer are tested in ``firecracker/``. The life cycle on a real
Firecracker is written below and skips with detection's reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandstorm.agent import AgentChannel, FrameKind, decode_exit
from sandstorm.api.types import MIB
from sandstorm.config import load_config
from sandstorm.ids import new_id
from sandstorm.runtimes.base import MountSpec, SandboxSpec
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.firecracker.kvm_probe import kvm_runs_guests
from sandstorm.runtimes.firecracker.runtime import (
    BRIDGE_SOURCE,
    FirecrackerError,
    FirecrackerRuntime,
)
from sandstorm.runtimes.registry import build_registry
from tests.conftest import IMAGE_DATA_DIR

T = 20


# ----------------------------------------------------------------------------- the guest bridge


def test_the_guest_vsock_bridge_compiles_cleanly(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (the VM image build needs it too)")
    out = tmp_path / "bridge"
    subprocess.run(
        [
            "gcc",
            "-static",
            "-Os",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out),
            str(BRIDGE_SOURCE),
        ],
        check=True,
        timeout=120,
    )
    usage = subprocess.run([str(out)], capture_output=True, timeout=10)
    assert usage.returncode == 2 and b"usage: vsock-bridge PORT COMMAND" in usage.stderr


# ----------------------------------------------------------------------------- detection


async def test_kvm_probe_gives_a_verdict() -> None:
    with trio.fail_after(T):
        reason = await kvm_runs_guests()
    assert reason is None or ("KVM" in reason or "kvm" in reason), reason


def _fake_binary(path: Path, output: str) -> str:
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)
    return str(path)


async def test_detection_names_the_first_missing_piece(tmp_path: Path) -> None:
    cgroups = SandboxCgroups("sandstorm-fc-test")
    with trio.fail_after(T):
        missing = FirecrackerRuntime(["/nonexistent/firecracker"], [], tmp_path, "default", cgroups)
        det = await missing.detect()
        assert not det.available and det.reason == "not found at /nonexistent/firecracker"

        fc = _fake_binary(tmp_path / "firecracker", "Firecracker v1.12.0")
        no_jailer = FirecrackerRuntime([fc], ["/nonexistent/jailer"], tmp_path, "default", cgroups)
        det = await no_jailer.detect()
        assert (det.available, det.version) == (False, "v1.12.0")
        assert det.reason == "jailer not found at /nonexistent/jailer"

        wrong = _fake_binary(tmp_path / "vmm", "Firecracker v1.12.0")
        jailer = _fake_binary(tmp_path / "jailer", "Jailer v1.12.0")
        det = await FirecrackerRuntime([wrong], [jailer], tmp_path, "default", cgroups).detect()
        assert det.reason is not None and "contains 'firecracker'" in det.reason

        # Both binaries there: what stops it now is this host's KVM (or, with a real KVM,
        # the VM image of this empty data directory).
        det = await FirecrackerRuntime([fc], [jailer], tmp_path, "default", cgroups).detect()
        assert not det.available
        kvm = await kvm_runs_guests() if os.path.exists("/dev/kvm") else "/dev/kvm does not exist"
        expected = kvm or "no VM image: run `sandstorm image build --vm`"
        assert det.reason is not None
        # The probe's reason carries a timing; its first part says what is wrong.
        assert det.reason.split(":")[0] == expected.split(":")[0]


async def test_the_registry_reports_firecracker_unavailable_with_its_reason(tmp_path: Path) -> None:
    config = load_config(data_dir=str(tmp_path))
    registry = build_registry(config)
    assert "firecracker" in registry.drivers
    with trio.fail_after(60):
        await registry.detect_all()
    info = next(i for i in registry.infos() if i.name == "firecracker")
    assert info.available is False and info.reason
    assert info.capabilities.snapshot is True
    assert registry.unavailable()["firecracker"] == info.reason


# ----------------------------------------------------------------------------- real Firecracker


def _unavailable_here() -> str | None:
    """Detection's reason, on this host's configured paths and image (None: it can run)."""
    config = load_config(data_dir=str(IMAGE_DATA_DIR))
    runtime = FirecrackerRuntime(
        config.runtime_paths["firecracker"],
        config.jailer_paths,
        IMAGE_DATA_DIR,
        config.image,
        SandboxCgroups(f"{config.cgroup_parent}-fc"),
    )
    return trio.run(runtime.detect).reason


UNAVAILABLE = _unavailable_here()


@pytest.fixture
async def real_firecracker(tmp_path: Path) -> AsyncIterator[FirecrackerRuntime]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(IMAGE_DATA_DIR / "images")
    config = load_config(data_dir=str(data))
    runtime = FirecrackerRuntime(
        config.runtime_paths["firecracker"],
        config.jailer_paths,
        data,
        config.image,
        SandboxCgroups(f"{config.cgroup_parent}-fc"),
    )
    with trio.fail_after(60):
        det = await runtime.detect()
    assert det.available, det.reason
    yield runtime


async def _run(channel: AgentChannel, exec_id: int, code: str) -> bytes:
    await channel.send_exec(exec_id, ["/usr/bin/python3", "-c", code], {}, "/workspace")
    out = b""
    while True:
        frame = await channel.receive_frame()
        if frame.kind == FrameKind.STDOUT:
            out += frame.payload
        elif frame.kind == FrameKind.EXIT:
            assert decode_exit(frame.payload).exit_code == 0
            return out


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"firecracker unavailable: {UNAVAILABLE}")
async def test_real_firecracker_boots_snapshots_restores_and_leaves_nothing(
    real_firecracker: FirecrackerRuntime, tmp_path: Path
) -> None:
    runtime = real_firecracker
    spec = SandboxSpec(new_id("sbx"), IMAGE_DATA_DIR, 1.0, 256 * MIB, 64)
    with trio.fail_after(120):
        instance = await runtime.start(spec)
        try:
            await instance.channel.wait_hello()
            assert await _run(instance.channel, 1, "print(6 * 7)") == b"42\n"
            snap = tmp_path / "snapshot"
            await runtime.checkpoint(spec, snap)
            assert {p.name for p in snap.iterdir()} >= {"vmstate", "memory", "firecracker.json"}
            await instance.wait()
            restored = await runtime.restore(spec, snap)
            await restored.channel.send_ping(b"ready")
            assert (await restored.channel.receive_frame()).kind == FrameKind.PONG
            assert await _run(restored.channel, 2, "print('again')") == b"again\n"
        finally:
            released = await runtime.destroy(spec.sandbox_id)
    assert any("jail" in r for r in released)
    assert await runtime.list_orphans(set) == []
    assert spec.sandbox_id not in runtime.cgroups.list_ids()


async def test_mounts_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    """Firecracker has no shared file system device: a sandbox with mounts is refused outright,
    before a cgroup or a jail exists, rather than booted without its directories."""
    cgroups = SandboxCgroups(f"sandstorm-fc-test-{tmp_path.name[-8:]}")
    runtime = FirecrackerRuntime(["/nonexistent/firecracker"], [], tmp_path, "default", cgroups)
    spec = SandboxSpec(
        sandbox_id=new_id("sbx"),
        rootfs=tmp_path,
        cpu_limit=1.0,
        memory_limit=256 * MIB,
        pids_limit=64,
        mounts=(MountSpec(tmp_path, "/workspace/data", True),),
    )
    with trio.fail_after(T), pytest.raises(FirecrackerError, match="cannot mount"):
        await runtime.start(spec)
    assert not cgroups.list_ids()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
