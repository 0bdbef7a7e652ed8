"""The gateway's durable records: one SQLite database, ``<data_dir>/sandstorm.db``.

Tenants and their quotas, API keys (sha256 of the secret only), sandboxes, execs, snapshots and
the append-only audit log. WAL mode lets the admin commands (``sandstorm keys``, ``sandstorm
audit``) open the same file while the gateway runs; the gateway reads keys on every request, so
a new or revoked key counts at once.

Two faces:

* :class:`Store`: synchronous, one connection, for the CLI and for the worker thread;
* :class:`AsyncStore`: the gateway's face. Every call runs in ONE worker thread
  (``CapacityLimiter(1)``), so SQLite never blocks the event loop and the connection is never
  used by two threads at once.

What never reaches the database: environment values (names at most), code, stdin, command
arguments, and key secrets. The schema has no column that could hold them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import msgspec
import trio

from sandstorm.api.types import ExecResult, SandboxState

DB_NAME = "sandstorm.db"
# Rewritten (a new random token) by every change to keys and tenants made through Store, from
# any process: a gateway keeps what a key resolved to until the token changes.
CREDENTIALS_STAMP = "credentials.stamp"
KEY_CACHE_MAX = 1024
SCHEMA_VERSION = 2
P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    max_sandboxes INTEGER,
    max_memory INTEGER,
    max_concurrent_execs INTEGER
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    runtime TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    reason TEXT,
    last_event_seq INTEGER NOT NULL DEFAULT 0,
    agent_offset INTEGER NOT NULL DEFAULT 0,
    progress TEXT
);
CREATE INDEX sandboxes_tenant ON sandboxes(tenant, created_at);
CREATE TABLE execs (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    tenant TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'finished')),
    started_at TEXT NOT NULL,
    finished_at TEXT,
    result TEXT
);
CREATE INDEX execs_sandbox ON execs(sandbox_id);
CREATE TABLE exec_output (
    exec_id TEXT NOT NULL,
    stream INTEGER NOT NULL CHECK (stream IN (1, 2)),
    data BLOB NOT NULL
);
CREATE INDEX exec_output_exec ON exec_output(exec_id);
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    runtime TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    meta TEXT NOT NULL
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    tenant TEXT,
    action TEXT NOT NULL,
    sandbox_id TEXT,
    exec_id TEXT,
    snapshot_id TEXT,
    outcome TEXT NOT NULL,
    request_id TEXT
);
CREATE INDEX audit_time ON audit(time);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class StoreError(Exception):
    pass


# ---------------------------------------------------------------------------- records


class Quotas(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's limits; None = unlimited."""

    max_sandboxes: int | None = None
    max_memory: int | None = None
    max_concurrent_execs: int | None = None


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    quotas: Quotas


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    created_at: float
    revoked_at: float | None


class SandboxRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    runtime: str
    state: SandboxState
    # What the sandbox was made with, minus anything secret (see ``sandstorm.actors.router``).
    params: dict[str, Any]
    created_at: float
    ended_at: float | None = None
    reason: str | None = None
    last_event_seq: int = 0
    agent_offset: int = 0
    progress: SandboxProgress | None = None


class ExecRecordRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    sandbox_id: str
    tenant: str
    state: str
    started_at: str
    finished_at: str | None = None
    result: ExecResult | None = None


class SnapshotRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    sandbox_id: str
    runtime: str
    size_bytes: int
    sha256: str
    created_at: str
    # The runtime-independent rest of the snapshot (limits, mounts, channels), JSON.
    meta: bytes


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    seq: int = 0
    time: float
    tenant: str | None
    action: str
    sandbox_id: str | None = None
    exec_id: str | None = None
    snapshot_id: str | None = None
    outcome: str
    request_id: str | None = None


class ProgressExec(msgspec.Struct, frozen=True, kw_only=True):
    """A running exec's partial state, for ``save_progress``."""

    id: str
    started_at: str
    result: ExecResult | None = None


class RunningExecState(msgspec.Struct, frozen=True, kw_only=True):
    """What a restarted gateway needs to go on watching a running exec (its output so far is
    the partial result in the execs table)."""

    id: str
    channel: int
    timeout_s: float
    started_epoch: float
    stdout_total: int
    stderr_total: int
    kill_verdict: str | None = None
    stdin_closed: bool = False


class SandboxProgress(msgspec.Struct, frozen=True, kw_only=True):
    """A sandbox actor's own state at its last checkpoint (``agent_offset`` in the record):
    replaying the agent stream from there on top of it gives the state at the crash."""

    # The event seq at the checkpoint: replayed frames get the numbers they had before.
    event_seq: int = 0
    next_channel: int
    last_active: float
    held: bool = False
    execs: list[RunningExecState] = []


_RESULT = msgspec.json.Decoder(ExecResult)
_PROGRESS = msgspec.json.Decoder(SandboxProgress)
_ENC = msgspec.json.Encoder()


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# ---------------------------------------------------------------------------- the store


class Store:
    """One connection to ``sandstorm.db``; not thread-safe by itself (see AsyncStore)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    def open(self) -> Store:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created private before SQLite opens it: its -wal and -shm files take the database
        # file's permissions, so nothing of it is ever readable by other users.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE), so a
        # read always sees what the CLI committed last. The gateway hands the connection to one
        # worker thread at a time (AsyncStore), hence check_same_thread=False.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        self.path.chmod(0o600)
        if self.credentials_stamp() is None:
            self._credentials_changed()
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}; this gateway knows "
                    f"{SCHEMA_VERSION} (downgrades are not supported)"
                )
            if version == 0:
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        db.execute(statement)
            elif version < 2:
                # Version 2: the actor's crash-recovery state (see SandboxProgress) and the
                # output of running execs saved with it, as raw bytes.
                db.execute("ALTER TABLE sandboxes ADD COLUMN progress TEXT")
                db.execute(
                    "CREATE TABLE exec_output (exec_id TEXT NOT NULL,"
                    " stream INTEGER NOT NULL CHECK (stream IN (1, 2)), data BLOB NOT NULL)"
                )
                db.execute("CREATE INDEX exec_output_exec ON exec_output(exec_id)")
            # Later versions: `if version < 3: ALTER TABLE …`, one step per version.
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _tx(self, work: Callable[[sqlite3.Connection], T], *, full: bool = False) -> T:
        """Run ``work`` in one write transaction; ``full`` makes the commit durable at once
        (synchronous=FULL) for records that must survive a power cut (keys, snapshots)."""
        db = self.db
        if full:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                value = work(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return value
        finally:
            if full:
                db.execute("PRAGMA synchronous=NORMAL")

    # ------------------------------------------------------------------ tenants and keys

    def credentials_stamp(self) -> bytes | None:
        """The token of the last change to keys and tenants (None when unreadable)."""
        try:
            with open(self.path.parent / CREDENTIALS_STAMP, "rb") as f:
                return f.read(64)
        except OSError:
            return None

    def _credentials_changed(self) -> None:
        """After a committed change to keys or tenants: a new token, written whole (rename),
        so a gateway that cached what keys resolve to asks the database again."""
        stamp = self.path.parent / CREDENTIALS_STAMP
        staging = stamp.with_name(f".{CREDENTIALS_STAMP}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(16))
        finally:
            os.close(fd)
        os.replace(staging, stamp)

    def set_tenant(self, name: str, quotas: Quotas | None = None) -> Tenant:
        """Create the tenant; with ``quotas``, replace the limits that are given (not None)."""
        q = quotas or Quotas()

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO tenants(name) VALUES (?)", (name,))
            for column in ("max_sandboxes", "max_memory", "max_concurrent_execs"):
                value = getattr(q, column)
                if value is not None:
                    db.execute(f"UPDATE tenants SET {column} = ? WHERE name = ?", (value, name))

        self._tx(work, full=True)
        self._credentials_changed()
        tenant = self.get_tenant(name)
        assert tenant is not None
        return tenant

    def get_tenant(self, name: str) -> Tenant | None:
        row = self.db.execute(
            "SELECT max_sandboxes, max_memory, max_concurrent_execs FROM tenants WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        return Tenant(
            name=name,
            quotas=Quotas(max_sandboxes=row[0], max_memory=row[1], max_concurrent_execs=row[2]),
        )

    def add_key(self, key_id: str, tenant: str, secret_hash: str) -> ApiKey:
        now = time.time()
        self._tx(
            lambda db: db.execute(
                "INSERT INTO api_keys(id, tenant, hash, created_at) VALUES (?, ?, ?, ?)",
                (key_id, tenant, secret_hash, now),
            ),
            full=True,
        )
        self._credentials_changed()
        return ApiKey(id=key_id, tenant=tenant, created_at=now, revoked_at=None)

    def revoke_key(self, key_id: str) -> ApiKey | None:
        """Revoke (idempotent); None when no such key."""
        now = time.time()
        self._tx(
            lambda db: db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, key_id),
            ),
            full=True,
        )
        self._credentials_changed()
        return next((k for k in self.list_keys() if k.id == key_id), None)

    def list_keys(self) -> list[ApiKey]:
        rows = self.db.execute(
            "SELECT id, tenant, created_at, revoked_at FROM api_keys ORDER BY created_at"
        ).fetchall()
        return [ApiKey(id=r[0], tenant=r[1], created_at=r[2], revoked_at=r[3]) for r in rows]

    def authenticate(self, secret_hash: str | None) -> tuple[bool, Tenant | None]:
        """(whether any live key exists, the tenant of the live key with this hash).

        Every live hash is compared, in constant time (``hmac.compare_digest``), so the time
        taken says nothing about how close a guess came."""
        rows = self.db.execute(
            "SELECT hash, tenant FROM api_keys WHERE revoked_at IS NULL"
        ).fetchall()
        if secret_hash is None:
            return bool(rows), None
        found: str | None = None
        for stored, tenant in rows:
            if hmac.compare_digest(stored, secret_hash):
                found = tenant
        if found is None:
            return bool(rows), None
        return True, self.get_tenant(found) or Tenant(name=found, quotas=Quotas())

    def has_live_keys(self) -> bool:
        return self.authenticate(None)[0]

    # ------------------------------------------------------------------ sandboxes and execs

    def put_sandbox(self, record: SandboxRecord) -> None:
        self._tx(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO sandboxes(id, tenant, runtime, state, params, created_at,"
                " ended_at, reason, last_event_seq, agent_offset)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.runtime,
                    record.state,
                    _ENC.encode(record.params).decode(),
                    record.created_at,
                    record.ended_at,
                    record.reason,
                    record.last_event_seq,
                    record.agent_offset,
                ),
            )
        )

    def set_sandbox_state(
        self,
        sandbox_id: str,
        state: SandboxState,
        *,
        reason: str | None = None,
        last_event_seq: int | None = None,
    ) -> None:
        self.apply_updates([(sandbox_id, state, reason, last_event_seq)], [])

    def apply_updates(
        self,
        states: Iterable[tuple[str, SandboxState, str | None, int | None]],
        finished: Iterable[ExecRecordRow],
        audits: Iterable[AuditRecord] = (),
    ) -> None:
        """Many state changes, finished execs and audit records in one transaction (the
        gateway's recorder batches what accumulated while the previous batch was written). A
        finished exec is upserted whole, so it does not matter whether its first record got
        there before."""
        now = time.time()

        def work(db: sqlite3.Connection) -> None:
            for sandbox_id, state, reason, seq in states:
                ended = now if state in ("destroyed", "failed") else None
                db.execute(
                    "UPDATE sandboxes SET state = ?, reason = COALESCE(?, reason),"
                    " ended_at = COALESCE(ended_at, ?),"
                    " last_event_seq = MAX(last_event_seq, COALESCE(?, 0)) WHERE id = ?",
                    (state, reason, ended, seq, sandbox_id),
                )
            for row in finished:
                db.execute(_EXEC_UPSERT, _exec_values(row))
                # The result holds the output now; the checkpointed copy is not needed.
                db.execute("DELETE FROM exec_output WHERE exec_id = ?", (row.id,))
            for record in audits:
                _insert_audit(db, record)

        self._tx(work)

    def put_exec(self, record: ExecRecordRow) -> None:
        """Insert an exec; a record already there (finished first) is left as it is."""
        self._tx(
            lambda db: db.execute(
                "INSERT INTO execs(id, sandbox_id, tenant, state, started_at, finished_at,"
                " result) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                _exec_values(record),
            )
        )

    def finish_exec(self, record: ExecRecordRow) -> None:
        self.apply_updates([], [record])

    def save_progress(
        self,
        sandbox_id: str,
        last_event_seq: int,
        agent_offset: int,
        running_execs: Iterable[ProgressExec],
        progress: SandboxProgress | None = None,
        output: Iterable[tuple[str, int, bytes]] = (),
    ) -> None:
        """Crash-recovery checkpoint, in one transaction: how far the sandbox's event log and
        agent stream got, the actor's own state, its running execs (upserted), and the output
        they wrote since the previous checkpoint (``(exec_id, 1 stdout | 2 stderr, bytes)``,
        appended)."""
        row = self.db.execute("SELECT tenant FROM sandboxes WHERE id = ?", (sandbox_id,))
        found = row.fetchone()
        if found is None:
            raise StoreError(f"no sandbox record {sandbox_id}")
        tenant = found[0]

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE sandboxes SET last_event_seq = ?, agent_offset = ?, progress = ?"
                " WHERE id = ?",
                (
                    last_event_seq,
                    agent_offset,
                    _ENC.encode(progress).decode() if progress is not None else None,
                    sandbox_id,
                ),
            )
            for e in running_execs:
                result = _ENC.encode(e.result).decode() if e.result is not None else None
                db.execute(
                    "INSERT INTO execs(id, sandbox_id, tenant, state, started_at, result)"
                    " VALUES (?, ?, ?, 'running', ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET result = excluded.result"
                    " WHERE execs.state = 'running'",
                    (e.id, sandbox_id, tenant, e.started_at, result),
                )
            db.executemany(
                "INSERT INTO exec_output(exec_id, stream, data) SELECT ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM execs WHERE id = ?1 AND state = 'running')",
                [(exec_id, stream, data) for exec_id, stream, data in output if data],
            )

        self._tx(work)

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        row = self.db.execute(_SANDBOX_SELECT + " WHERE id = ?", (sandbox_id,)).fetchone()
        return _sandbox(row) if row is not None else None

    def list_sandboxes(
        self, tenant: str | None = None, limit: int = 1_000_000
    ) -> list[SandboxRecord]:
        """The newest ``limit`` sandboxes (of ``tenant``), oldest first."""
        where, args = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
        rows = self.db.execute(
            _SANDBOX_SELECT + where + " ORDER BY created_at DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [_sandbox(r) for r in reversed(rows)]

    def unfinished_sandboxes(self) -> list[SandboxRecord]:
        rows = self.db.execute(
            _SANDBOX_SELECT + " WHERE state NOT IN ('destroyed', 'failed') ORDER BY created_at"
        ).fetchall()
        return [_sandbox(r) for r in rows]

    def fail_unfinished(self, reason: str, keep: Iterable[str] = ()) -> list[str]:
        """Mark every sandbox not ended (and not in ``keep``) failed, its running execs
        finished as killed; returns their ids."""
        keep_ids = set(keep)
        doomed = [r.id for r in self.unfinished_sandboxes() if r.id not in keep_ids]
        now = time.time()

        def work(db: sqlite3.Connection) -> None:
            for sandbox_id in doomed:
                db.execute(
                    "UPDATE sandboxes SET state = 'failed', reason = ?, ended_at = ? WHERE id = ?",
                    (reason, now, sandbox_id),
                )
                for exec_id, started_at, partial in db.execute(
                    "SELECT id, started_at, result FROM execs"
                    " WHERE sandbox_id = ? AND state = 'running'",
                    (sandbox_id,),
                ).fetchall():
                    result = _killed(exec_id, partial, self.exec_output(exec_id))
                    db.execute("DELETE FROM exec_output WHERE exec_id = ?", (exec_id,))
                    db.execute(
                        "UPDATE execs SET state = 'finished', finished_at = ?, result = ?"
                        " WHERE id = ?",
                        (started_at, _ENC.encode(result).decode(), exec_id),
                    )

        self._tx(work)
        return doomed

    def exec_output(self, exec_id: str) -> tuple[bytes, bytes]:
        """(stdout, stderr) a running exec had written at its sandbox's last checkpoint."""
        parts: tuple[bytearray, bytearray] = (bytearray(), bytearray())
        for stream, data in self.db.execute(
            "SELECT stream, data FROM exec_output WHERE exec_id = ? ORDER BY rowid", (exec_id,)
        ):
            parts[stream - 1].extend(data)
        return bytes(parts[0]), bytes(parts[1])

    def get_exec(self, exec_id: str) -> ExecRecordRow | None:
        row = self.db.execute(_EXEC_SELECT + " WHERE id = ?", (exec_id,)).fetchone()
        return _exec(row) if row is not None else None

    def list_execs(self, sandbox_id: str, limit: int = 100) -> list[ExecRecordRow]:
        """The sandbox's newest ``limit`` execs, oldest first."""
        rows = self.db.execute(
            _EXEC_SELECT + " WHERE sandbox_id = ? ORDER BY rowid DESC LIMIT ?",
            (sandbox_id, limit),
        ).fetchall()
        return [_exec(r) for r in reversed(rows)]

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

    # ------------------------------------------------------------------ audit

    def record_audit(self, record: AuditRecord) -> None:
        self._tx(lambda db: _insert_audit(db, record))

    def audit(
        self, tenant: str | None = None, since: float | None = None, limit: int = 100_000
    ) -> list[AuditRecord]:
        query = (
            "SELECT seq, time, tenant, action, sandbox_id, exec_id, snapshot_id, outcome,"
            " request_id FROM audit WHERE 1=1"
        )
        args: list[object] = []
        if tenant is not None:
            query += " AND tenant = ?"
            args.append(tenant)
        if since is not None:
            query += " AND time >= ?"
            args.append(since)
        query += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [
            AuditRecord(
                seq=r[0],
                time=r[1],
                tenant=r[2],
                action=r[3],
                sandbox_id=r[4],
                exec_id=r[5],
                snapshot_id=r[6],
                outcome=r[7],
                request_id=r[8],
            )
            for r in self.db.execute(query, args).fetchall()
        ]


_SANDBOX_SELECT = (
    "SELECT id, tenant, runtime, state, params, created_at, ended_at, reason, last_event_seq,"
    " agent_offset, progress FROM sandboxes"
)
_EXEC_SELECT = "SELECT id, sandbox_id, tenant, state, started_at, finished_at, result FROM execs"
_EXEC_UPSERT = (
    "INSERT INTO execs(id, sandbox_id, tenant, state, started_at, finished_at, result)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET state = excluded.state,"
    " finished_at = excluded.finished_at, result = excluded.result"
)
_SNAPSHOT_SELECT = (
    "SELECT id, tenant, sandbox_id, runtime, size_bytes, sha256, created_at, meta FROM snapshots"
)


def _insert_audit(db: sqlite3.Connection, record: AuditRecord) -> None:
    db.execute(
        "INSERT INTO audit(time, tenant, action, sandbox_id, exec_id, snapshot_id,"
        " outcome, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.time,
            record.tenant,
            record.action,
            record.sandbox_id,
            record.exec_id,
            record.snapshot_id,
            record.outcome,
            record.request_id,
        ),
    )


def _sandbox(row: tuple[Any, ...]) -> SandboxRecord:
    return SandboxRecord(
        id=row[0],
        tenant=row[1],
        runtime=row[2],
        state=row[3],
        params=msgspec.json.decode(row[4]),
        created_at=row[5],
        ended_at=row[6],
        reason=row[7],
        last_event_seq=row[8],
        agent_offset=row[9],
        progress=_PROGRESS.decode(row[10]) if row[10] is not None else None,
    )


def _exec_values(row: ExecRecordRow) -> tuple[object, ...]:
    result = _ENC.encode(row.result).decode() if row.result is not None else None
    return (
        row.id,
        row.sandbox_id,
        row.tenant,
        row.state,
        row.started_at,
        row.finished_at,
        result,
    )


def _exec(row: tuple[Any, ...]) -> ExecRecordRow:
    return ExecRecordRow(
        id=row[0],
        sandbox_id=row[1],
        tenant=row[2],
        state=row[3],
        started_at=row[4],
        finished_at=row[5],
        result=_RESULT.decode(row[6]) if row[6] is not None else None,
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


def _killed(exec_id: str, partial: str | None, output: tuple[bytes, bytes]) -> ExecResult:
    """The result of an exec whose sandbox was lost: what was saved of it, verdict killed."""
    if partial is not None:
        return msgspec.structs.replace(_RESULT.decode(partial), verdict="killed")
    return ExecResult(
        exec_id=exec_id,
        exit_code=None,
        signal=None,
        verdict="killed",
        stdout=output[0].decode("utf-8", "replace"),
        stderr=output[1].decode("utf-8", "replace"),
        stdout_truncated=False,
        stderr_truncated=False,
        duration_ms=0.0,
        cpu_time_ms=0.0,
        max_rss_bytes=0,
    )


class AsyncStore:
    """The store for Trio code: each call runs in the store's one worker thread, in order.

    Key checks, which every request makes, go through a second connection on a thread of its
    own: WAL lets it read while the writer writes, so a request is never queued behind the
    writes of busy sandboxes (checkpoints, records) just to be authenticated."""

    def __init__(self, data_dir: Path) -> None:
        self.sync = Store(data_dir)
        self._limiter = trio.CapacityLimiter(1)
        self._reader = Store(data_dir)
        self._read_limiter = trio.CapacityLimiter(1)
        # What key hashes resolved to (see cached_credentials), for this credentials stamp.
        self._credentials: dict[str | None, Any] = {}
        self._credentials_stamp: bytes | None = None

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` (a method of ``self.sync``) in the worker thread. Cancellation abandons
        the wait, never the write: the thread finishes its transaction."""
        return await trio.to_thread.run_sync(
            lambda: fn(*args, **kwargs), limiter=self._limiter, abandon_on_cancel=False
        )

    async def cached_credentials(
        self,
        digest: str | None,
        resolve: Callable[[Store, str | None], T],
        *,
        keep: Callable[[T], bool],
    ) -> T:
        """``resolve(self.sync, digest)`` in the worker thread, or what it gave last time:
        every request resolves its key, and the answer changes only with keys and tenants,
        which rewrite the credentials stamp (read here, a small file in the page cache: no
        trip to a thread). ``keep``: which answers to cache (a caller keeps only those that
        name a tenant, so unknown keys cannot fill it)."""
        stamp = self.sync.credentials_stamp()
        if stamp is None or stamp != self._credentials_stamp:
            self._credentials.clear()
            self._credentials_stamp = stamp
        elif digest in self._credentials:
            cached: T = self._credentials[digest]
            return cached
        value = await self.call(resolve, self.sync, digest)
        # Kept only under the stamp read before the query: a request that saw a newer stamp
        # meanwhile may have cleared the cache after a change this query did not see.
        if stamp is not None and stamp == self._credentials_stamp and keep(value):
            if len(self._credentials) >= KEY_CACHE_MAX:
                self._credentials.clear()
            self._credentials[digest] = value
        return value

    async def open(self) -> None:
        await self.call(self.sync.open)
        await self._read(self._reader.open)  # after the writer applied the schema

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self._read(self._reader.close)
            await self.call(self.sync.close)

    async def _read(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await trio.to_thread.run_sync(
            lambda: fn(*args, **kwargs), limiter=self._read_limiter, abandon_on_cancel=False
        )

    async def authenticate(self, secret_hash: str | None) -> tuple[bool, Tenant | None]:
        return await self._read(self._reader.authenticate, secret_hash)

    async def put_sandbox(self, record: SandboxRecord) -> None:
        await self.call(self.sync.put_sandbox, record)

    async def put_exec(self, record: ExecRecordRow) -> None:
        await self.call(self.sync.put_exec, record)

    async def finish_exec(self, record: ExecRecordRow) -> None:
        await self.call(self.sync.finish_exec, record)

    async def set_sandbox_state(
        self, sandbox_id: str, state: SandboxState, *, reason: str | None = None
    ) -> None:
        await self.call(self.sync.set_sandbox_state, sandbox_id, state, reason=reason)

    async def save_progress(
        self,
        sandbox_id: str,
        last_event_seq: int,
        agent_offset: int,
        running_execs: list[ProgressExec],
        progress: SandboxProgress | None = None,
        output: list[tuple[str, int, bytes]] | None = None,
    ) -> None:
        await self.call(
            self.sync.save_progress,
            sandbox_id,
            last_event_seq,
            agent_offset,
            running_execs,
            progress,
            output or [],
        )

    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        return await self.call(self.sync.get_sandbox, sandbox_id)

    async def list_sandboxes(
        self, tenant: str | None = None, limit: int = 1_000_000
    ) -> list[SandboxRecord]:
        return await self.call(self.sync.list_sandboxes, tenant, limit)

    async def get_exec(self, exec_id: str) -> ExecRecordRow | None:
        return await self.call(self.sync.get_exec, exec_id)

    async def list_execs(self, sandbox_id: str, limit: int = 100) -> list[ExecRecordRow]:
        return await self.call(self.sync.list_execs, sandbox_id, limit)

    async def put_snapshot(self, record: SnapshotRecord) -> None:
        await self.call(self.sync.put_snapshot, record)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        return await self.call(self.sync.get_snapshot, snapshot_id)

    async def list_snapshots(self, tenant: str | None = None) -> list[SnapshotRecord]:
        return await self.call(self.sync.list_snapshots, tenant)

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        return await self.call(self.sync.delete_snapshot, snapshot_id)

    async def record_audit(self, record: AuditRecord) -> None:
        await self.call(self.sync.record_audit, record)

    async def audit(
        self, tenant: str | None = None, since: float | None = None
    ) -> list[AuditRecord]:
        return await self.call(self.sync.audit, tenant, since)
