"""The synchronous store: one connection to ``<data_dir>/sandstorm.db``, for the CLI and for
the gateway's worker thread (see :class:`~sandstorm.store.AsyncStore`)."""

from __future__ import annotations

from typing import Any

from sandstorm.store._sandboxes import SandboxTables
from sandstorm.store._tenants import TenantTables
from sandstorm.store.rows import SnapshotRecord


class Store(SandboxTables, TenantTables):
    """Every table of ``sandstorm.db`` through one connection; not thread-safe by itself (see
    AsyncStore). ``open()`` creates or migrates the database and returns the store."""

    # ------------------------------------------------------------------ snapshots

    def put_snapshot(self, record: SnapshotRecord) -> None:
        self._tx(
            lambda db: db.execute(
                "INSERT INTO snapshots(id, tenant, sandbox_id, runtime, size_bytes, sha256,"
                " created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.sandbox_id,
                    record.runtime,
                    record.size_bytes,
                    record.sha256,
                    record.created_at,
                    record.meta.decode(),
                ),
            ),
            full=True,
        )

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        row = self.db.execute(_SNAPSHOT_SELECT + " WHERE id = ?", (snapshot_id,)).fetchone()
        return _snapshot(row) if row is not None else None

    def list_snapshots(self, tenant: str | None = None) -> list[SnapshotRecord]:
        if tenant is None:
            rows = self.db.execute(_SNAPSHOT_SELECT + " ORDER BY created_at").fetchall()
        else:
            rows = self.db.execute(
                _SNAPSHOT_SELECT + " WHERE tenant = ? ORDER BY created_at", (tenant,)
            ).fetchall()
        return [_snapshot(r) for r in rows]

    def delete_snapshot(self, snapshot_id: str) -> bool:
        cursor = self._tx(
            lambda db: db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,)),
            full=True,
        )
        return cursor.rowcount > 0


_SNAPSHOT_SELECT = (
    "SELECT id, tenant, sandbox_id, runtime, size_bytes, sha256, created_at, meta FROM snapshots"
)


def _snapshot(row: tuple[Any, ...]) -> SnapshotRecord:
    return SnapshotRecord(
        id=row[0],
        tenant=row[1],
        sandbox_id=row[2],
        runtime=row[3],
        size_bytes=row[4],
        sha256=row[5],
        created_at=row[6],
        meta=row[7].encode(),
    )
