"""The snapshot catalog on disk: ``<data_dir>/snapshots/<snp id>/`` with the runtime's image
files and ``meta.json``.

A snapshot is written under a temporary name, every file fsynced, ``meta.json`` last, then
renamed into place and the directory fsynced: a crash at any point never lists a partial one.
``sha256`` covers the image files and is checked again before every resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import msgspec
import trio

from sandstorm.errors import NotFound
from sandstorm.ids import is_id
from sandstorm.protocol import IsolationLevel, SnapshotInfo

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
    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self) -> None:
        """Create the directory and drop leftovers of snapshots that never completed."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in self.root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)

    def staging_dir(self, snapshot_id: str) -> Path:
        path = self.root / f"{TMP_PREFIX}{snapshot_id}"
        path.mkdir(mode=0o700)
        return path

    def path(self, snapshot_id: str) -> Path:
        if not is_id(snapshot_id, "snp"):
            raise NotFound(f"snapshot {snapshot_id!r} not found", snapshot_id=snapshot_id)
        return self.root / snapshot_id

    async def commit(self, staging: Path, meta_without_digest: SnapshotMeta) -> SnapshotMeta:
        """Digest, fsync and atomically publish a staged snapshot."""

        def work() -> SnapshotMeta:
            digest, size = _digest(staging)
            info = msgspec.structs.replace(meta_without_digest.info, sha256=digest, size_bytes=size)
            meta = msgspec.structs.replace(meta_without_digest, info=info)
            with open(staging / META, "wb") as f:
                f.write(msgspec.json.encode(meta))
            _fsync_tree(staging)
            os.rename(staging, self.root / info.snapshot_id)
            _fsync_dir(self.root)
            return meta

        return await trio.to_thread.run_sync(work, limiter=_IO_LIMIT)

    async def discard(self, staging: Path) -> None:
        await trio.to_thread.run_sync(shutil.rmtree, staging, True, limiter=_IO_LIMIT)

    def load(self, snapshot_id: str) -> SnapshotMeta:
        try:
            with open(self.path(snapshot_id) / META, "rb") as f:
                return msgspec.json.decode(f.read(), type=SnapshotMeta)
        except (OSError, msgspec.DecodeError) as exc:
            raise NotFound(f"snapshot {snapshot_id!r} not found", snapshot_id=snapshot_id) from exc

    async def verify(self, meta: SnapshotMeta) -> None:
        directory = self.path(meta.info.snapshot_id)
        digest, _ = await trio.to_thread.run_sync(_digest, directory, limiter=_IO_LIMIT)
        if digest != meta.info.sha256:
            raise SnapshotCorrupt(
                f"snapshot {meta.info.snapshot_id} is corrupt: "
                f"sha256 {digest} != {meta.info.sha256}"
            )

    def list(self) -> list[SnapshotInfo]:
        infos = []
        with contextlib.suppress(OSError):
            for path in self.root.iterdir():
                if is_id(path.name, "snp"):
                    with contextlib.suppress(NotFound):
                        infos.append(self.load(path.name).info)
        return sorted(infos, key=lambda i: i.created_at)

    async def delete(self, snapshot_id: str) -> None:
        path = self.path(snapshot_id)
        if not (path / META).exists():
            raise NotFound(f"snapshot {snapshot_id!r} not found", snapshot_id=snapshot_id)
        # Rename first so a concurrent resume or list never sees a half-deleted snapshot.
        doomed = self.root / f"{TMP_PREFIX}deleted-{snapshot_id}"
        os.rename(path, doomed)
        await trio.to_thread.run_sync(shutil.rmtree, doomed, True, limiter=_IO_LIMIT)
