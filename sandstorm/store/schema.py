"""The database file's shape: its tables, their version, and the step from each older version.

A database newer than this code is refused (downgrades are not supported); an older one is
brought up to :data:`SCHEMA_VERSION` in one transaction when a store opens it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

DB_NAME = "sandstorm.db"
SCHEMA_VERSION = 3

SCHEMA = """
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
    request_id TEXT,
    target TEXT
);
CREATE INDEX audit_time ON audit(time);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class StoreError(Exception):
    pass


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database at ``path``, open as ``db``, to :data:`SCHEMA_VERSION`."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}; this gateway knows "
                f"{SCHEMA_VERSION} (downgrades are not supported)"
            )
        if version == 0:
            for statement in SCHEMA.split(";\n"):
                if statement.strip():
                    db.execute(statement)
        if 0 < version < 2:
            # Version 2: the actor's crash-recovery state (see SandboxProgress) and the
            # output of running execs saved with it, as raw bytes.
            db.execute("ALTER TABLE sandboxes ADD COLUMN progress TEXT")
            db.execute(
                "CREATE TABLE exec_output (exec_id TEXT NOT NULL,"
                " stream INTEGER NOT NULL CHECK (stream IN (1, 2)), data BLOB NOT NULL)"
            )
            db.execute("CREATE INDEX exec_output_exec ON exec_output(exec_id)")
        if 0 < version < 3:
            # Version 3: the path a file operation was about (never its content).
            db.execute("ALTER TABLE audit ADD COLUMN target TEXT")
        # Later versions: `if 0 < version < 4: ALTER TABLE …`, one step per version.
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back already (a full disk)
            db.execute("ROLLBACK")
        raise
