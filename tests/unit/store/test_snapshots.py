"""The snapshot catalogue (``store/snapshots.py``) on a real database and directory: its crash
rules (a partial snapshot is never listed, and is swept at start-up) and its integrity check."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sandstorm.api.types import SnapshotInfo
from sandstorm.ids import new_id
from sandstorm.store import AsyncStore
from sandstorm.store.snapshots import SnapshotCatalog, SnapshotMeta


def _meta(snapshot_id: str) -> SnapshotMeta:
    info = SnapshotInfo(
        snapshot_id=snapshot_id, sandbox_id=new_id("sbx"), runtime="gvisor", size_bytes=0,
        sha256="", created_at="2026-01-01T00:00:00.000Z",
    )  # fmt: skip
    return SnapshotMeta(
        info=info, isolation_level="standard", image="default", cpu_limit=1.0,
        memory_limit=1 << 26, timeout=1000, pids_limit=64, mounts=[], next_channel=3,
    )  # fmt: skip


async def test_partial_snapshots_are_never_listed(tmp_path: Path) -> None:
    with trio.fail_after(10):
        store = AsyncStore(tmp_path)
        await store.open()
        catalog = SnapshotCatalog(tmp_path / "snapshots", store)
        await catalog.open()
        done = new_id("snp")
        staging = catalog.staging_dir(done)
        (staging / "image").write_bytes(b"memory")
        meta = await catalog.commit(staging, _meta(done), "a")
        assert len(meta.info.sha256) == 64 and meta.info.size_bytes == 6
        # A crash mid-snapshot: a staging directory, and an image renamed into place whose
        # record was never written.
        catalog.staging_dir(new_id("snp"))
        orphan = new_id("snp")
        (catalog.root / orphan).mkdir()
        (catalog.root / orphan / "image").write_bytes(b"half")
        assert [i.snapshot_id for i in await catalog.list("a")] == [done]
        await catalog.open()  # the next start-up
        assert sorted(p.name for p in catalog.root.iterdir()) == [done]
        assert await catalog.list("b") == []
        loaded = await catalog.load(done, "a")
        await catalog.verify(loaded)
        (catalog.root / done / "image").write_bytes(b"MEMORY")
        with pytest.raises(Exception, match="corrupt"):
            await catalog.verify(loaded)
        await catalog.delete(done, "a")
        assert await catalog.list("a") == [] and not any(catalog.root.iterdir())
        await store.close()
