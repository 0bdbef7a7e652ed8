"""422 snapshot_unsupported: the actor refuses before touching anything when its runtime cannot
snapshot, and a runtime without snapshots refuses with the same error when asked directly. The
only such runtime is Kata; its driver is used here as it is (nothing is booted)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio

from sandstorm.actors.sandbox import SandboxActor, SandboxParams
from sandstorm.config import load_config
from sandstorm.errors import SnapshotUnsupported
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.kata import KataRuntime
from sandstorm.store import AsyncStore
from sandstorm.store.snapshots import SnapshotCatalog


def _kata(tmp_path: Path) -> KataRuntime:
    # Never detected: it has no containerd client, and is asked nothing that needs one.
    cgroups = SandboxCgroups(f"sandstorm-test-{secrets.token_hex(4)}")
    return KataRuntime([], tmp_path / "data", cgroups)


def _spec(tmp_path: Path) -> SandboxSpec:
    return SandboxSpec("sbx_00000000000000000000000000", tmp_path, 1.0, 64 << 20, 64)


async def test_snapshot_of_a_runtime_without_snapshots_is_422(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    params = SandboxParams(
        sandbox_id=spec.sandbox_id,
        runtime_name="kata",
        isolation_level="strong",
        selection="default",
        spec=spec,
        image="default",
        timeout_ms=1000,
        keep_alive_s=10,
    )
    config = load_config(None, data_dir=str(tmp_path))
    catalog = SnapshotCatalog(tmp_path, AsyncStore(tmp_path))
    actor = SandboxActor(params, _kata(tmp_path), config, catalog)
    actor.state = "idle"
    with trio.fail_after(5), pytest.raises(SnapshotUnsupported) as info:
        await actor._snapshot(leave_running=True)
    assert info.value.status == 422
    assert info.value.code == "snapshot_unsupported"
    assert actor.state == "idle"
    assert not any(tmp_path.iterdir())  # nothing staged


async def test_a_runtime_without_snapshots_refuses_them_itself(tmp_path: Path) -> None:
    runtime = _kata(tmp_path)
    spec = _spec(tmp_path)
    image = tmp_path / "image"
    with trio.fail_after(5):
        with pytest.raises(SnapshotUnsupported, match="does not offer snapshots") as info:
            await runtime.checkpoint(spec, image)
        assert info.value.details == {"runtime": "kata"}
        with pytest.raises(SnapshotUnsupported, match="does not offer snapshots"):
            await runtime.restore(spec, image)
    assert not any(tmp_path.iterdir())
