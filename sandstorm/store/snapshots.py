"""The snapshot catalog: image files on disk under ``<data_dir>/snapshots/<snp id>/``, records
in the store (``sandstorm.store``), which is the source of truth.

A snapshot is written under a temporary name, every file fsynced, renamed into place and the
directory fsynced; only then is its record (with the sha256) inserted. A crash at any point
never lists a partial one: on open, image directories without a record are deleted. ``sha256``
covers the image files and is checked again before every resume. Snapshots belong to the tenant
whose sandbox was snapshotted; for any other tenant they do not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import msgspec
import trio

from sandstorm.api.types import IsolationLevel, SnapshotInfo
from sandstorm.errors import NotFound
from sandstorm.ids import is_id
from sandstorm.store import AsyncStore, SnapshotRecord, Store

# Written by catalogues before the store; imported once (tenant "default") on open.
META = "meta.json"
TMP_PREFIX = ".tmp-"
_IO_LIMIT = trio.CapacityLimiter(2)


class SnapshotMount(msgspec.Struct, frozen=True, kw_only=True):
    source: str
    destination: str
    read_only: bool


class SnapshotMeta(msgspec.Struct, frozen=True, kw_only=True):
    info: SnapshotInfo
    isolation_level: IsolationLevel
    image: str
    cpu_limit: float
    memory_limit: int
    timeout: int
    pids_limit: int
    mounts: list[SnapshotMount]
    # Exec channels already used inside the agent; a resumed sandbox numbers new execs above.
    next_channel: int


class SnapshotCorrupt(Exception):
    pass


def _digest(directory: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for path in sorted(directory.iterdir()):
        if path.name == META or not path.is_file():
            continue
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotCatalog:
    def __init__(self, root: Path, store: AsyncStore) -> None:
        self.root = root
        self.store = store

    async def open(self) -> None:
        """Create the directory, drop leftovers of snapshots that never completed, and the
        records of images that are gone (the store must be open)."""
        await self.store.call(self._open)

    def _open(self, store: Store) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        known = {r.id: r for r in store.list_snapshots()}
        for path in self.root.iterdir():
            if path.name in known:
                continue
            if is_id(path.name, "snp") and (path / META).is_file():
                with contextlib.suppress(OSError, msgspec.DecodeError):
                    meta = msgspec.json.decode((path / META).read_bytes(), type=SnapshotMeta)
                    store.put_snapshot(_record(meta, "default"))
                    continue
            # A crash between the rename and the record, or a staging directory.
            shutil.rmtree(path, ignore_errors=True)
        for snapshot_id in known:
            if not (self.root / snapshot_id).is_dir():
                store.delete_snapshot(snapshot_id)

    def staging_dir(self, snapshot_id: str) -> Path:
        path = self.root / f"{TMP_PREFIX}{snapshot_id}"
        path.mkdir(mode=0o700)
        return path

    def path(self, snapshot_id: str) -> Path:
        if not is_id(snapshot_id, "snp"):
            raise NotFound(f"snapshot {snapshot_id!r} not found", snapshot_id=snapshot_id)
        return self.root / snapshot_id

    async def commit(
        self, staging: Path, meta_without_digest: SnapshotMeta, tenant: str
    ) -> SnapshotMeta:
        """Digest, fsync and atomically publish a staged snapshot, then record it."""

        def work() -> SnapshotMeta:
            digest, size = _digest(staging)
            info = msgspec.structs.replace(meta_without_digest.info, sha256=digest, size_bytes=size)
            meta = msgspec.structs.replace(meta_without_digest, info=info)
            _fsync_tree(staging)
            os.rename(staging, self.root / info.snapshot_id)
            _fsync_dir(self.root)
            return meta

        meta = await trio.to_thread.run_sync(work, limiter=_IO_LIMIT)
        try:
            await self.store.call(Store.put_snapshot, _record(meta, tenant))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.discard(self.root / meta.info.snapshot_id)
            raise
        return meta

    async def discard(self, staging: Path) -> None:
        await trio.to_thread.run_sync(shutil.rmtree, staging, True, limiter=_IO_LIMIT)

    async def load(self, snapshot_id: str, tenant: str) -> SnapshotMeta:
        """The snapshot's record; NotFound when it does not exist or is another tenant's."""
        record = (
            await self.store.call(Store.get_snapshot, snapshot_id)
            if is_id(snapshot_id, "snp")
            else None
        )
        if record is None or record.tenant != tenant:
            raise NotFound(f"snapshot {snapshot_id!r} not found", snapshot_id=snapshot_id)
        return msgspec.json.decode(record.meta, type=SnapshotMeta)

    async def verify(self, meta: SnapshotMeta) -> None:
        directory = self.path(meta.info.snapshot_id)
        try:
            digest, _ = await trio.to_thread.run_sync(_digest, directory, limiter=_IO_LIMIT)
        except OSError as exc:
            raise SnapshotCorrupt(
                f"snapshot {meta.info.snapshot_id} is unreadable: {exc}"
            ) from None
        if digest != meta.info.sha256:
            raise SnapshotCorrupt(
                f"snapshot {meta.info.snapshot_id} is corrupt: "
                f"sha256 {digest} != {meta.info.sha256}"
            )

    async def list(self, tenant: str) -> list[SnapshotInfo]:
        records = await self.store.call(Store.list_snapshots, tenant)
        return [msgspec.json.decode(r.meta, type=SnapshotMeta).info for r in records]

    async def delete(self, snapshot_id: str, tenant: str) -> None:
        await self.load(snapshot_id, tenant)
        # The record goes first, so a concurrent resume or list never sees a half-deleted
        # snapshot; a crash before the files are gone leaves a directory the next open drops.
        if not await self.store.call(Store.delete_snapshot, snapshot_id):
            raise NotFound(f"snapshot {snapshot_id!r} not found", snapshot_id=snapshot_id)
        doomed = self.root / f"{TMP_PREFIX}deleted-{snapshot_id}"
        with contextlib.suppress(OSError):
            os.rename(self.path(snapshot_id), doomed)
        await trio.to_thread.run_sync(shutil.rmtree, doomed, True, limiter=_IO_LIMIT)


def _record(meta: SnapshotMeta, tenant: str) -> SnapshotRecord:
    info = meta.info
    return SnapshotRecord(
        id=info.snapshot_id,
        tenant=tenant,
        sandbox_id=info.sandbox_id,
        runtime=info.runtime,
        size_bytes=info.size_bytes,
        sha256=info.sha256,
        created_at=info.created_at,
        meta=msgspec.json.encode(meta),
    )
