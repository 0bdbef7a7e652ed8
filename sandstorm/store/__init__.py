"""The gateway's durable records: one SQLite database, ``<data_dir>/sandstorm.db``.

Tenants and their quotas, API keys (sha256 of the secret only), sandboxes, execs, snapshots and
the append-only audit log. WAL mode lets the admin commands (``sandstorm keys``, ``sandstorm
audit``) open the same file while the gateway runs; the gateway reads keys on every request, so
a new or revoked key counts at once.

Two faces:

* :class:`Store`: synchronous, one connection, for the CLI and for the worker thread;
* :class:`AsyncStore`: the gateway's face. ``await store.call(Store.method, *args)`` runs any
  method in ONE worker thread (``CapacityLimiter(1)``), so SQLite never blocks the event loop
  and the connection is never used by two threads at once.

What never reaches the database: environment values (names at most), code, stdin, command
arguments, and key secrets. The schema has no column that could hold them.
"""

from ._tenants import CREDENTIALS_STAMP, key_hash
from .aio import AsyncStore
from .rows import (
    ApiKey,
    AuditRecord,
    ExecRecordRow,
    ProgressExec,
    Quotas,
    RunningExecState,
    SandboxProgress,
    SandboxRecord,
    SnapshotRecord,
    Tenant,
)
from .schema import DB_NAME, SCHEMA_VERSION, StoreError
from .sync import Store

__all__ = [
    "CREDENTIALS_STAMP",
    "DB_NAME",
    "SCHEMA_VERSION",
    "ApiKey",
    "AsyncStore",
    "AuditRecord",
    "ExecRecordRow",
    "ProgressExec",
    "Quotas",
    "RunningExecState",
    "SandboxProgress",
    "SandboxRecord",
    "SnapshotRecord",
    "Store",
    "StoreError",
    "Tenant",
    "key_hash",
]
