"""422 snapshot_unsupported: the actor refuses before touching anything when its runtime cannot
snapshot. No runtime on this machine lacks snapshots (gVisor has them; Kata, which does not, is
not installed), so the capability check is tested on its own with a runtime that only declares
its capabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sandstorm.actors.sandbox import SandboxActor, SandboxParams
from sandstorm.api.types import RuntimeCapabilities
from sandstorm.config import load_config
from sandstorm.errors import SnapshotUnsupported
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.store import AsyncStore
from sandstorm.store.snapshots import SnapshotCatalog


class NoSnapshots:
    name = "kata"
    isolation_levels = ("strong", "maximum")
    capabilities = RuntimeCapabilities(snapshot=False, exec=True, streaming=True, network=False)


async def test_snapshot_of_a_runtime_without_snapshots_is_422(tmp_path: Path) -> None:
    spec = SandboxSpec("sbx_00000000000000000000000000", tmp_path, 1.0, 64 << 20, 64)
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
    actor = SandboxActor(params, NoSnapshots(), config, catalog)  # type: ignore[arg-type]
    actor.state = "idle"
    with trio.fail_after(5), pytest.raises(SnapshotUnsupported) as info:
        await actor._snapshot(leave_running=True)
    assert info.value.status == 422
    assert info.value.code == "snapshot_unsupported"
    assert actor.state == "idle"
    assert not any(tmp_path.iterdir())  # nothing staged
