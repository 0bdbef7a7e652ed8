"""Tenants, their API keys, and the audit log of what was done in their name.

Every change to keys and tenants rewrites the credentials stamp, a small file beside the
database, from whichever process made it: a gateway keeps what a key resolved to until the stamp
changes, so a new or revoked key counts at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from typing import Self

from sandstorm.store._database import Database
from sandstorm.store.rows import ApiKey, AuditRecord, Quotas, Tenant

# Rewritten (a new random token) by every change to keys and tenants made through Store, from
# any process: a gateway keeps what a key resolved to until the token changes.
CREDENTIALS_STAMP = "credentials.stamp"


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TenantTables(Database):
    """The tenants, api_keys and audit tables."""

    def open(self) -> Self:
        super().open()
        if self.credentials_stamp() is None:
            self._credentials_changed()
        return self

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

    # ------------------------------------------------------------------ audit

    def record_audit(self, record: AuditRecord) -> None:
        self._tx(lambda db: insert_audit(db, record))

    def audit(
        self, tenant: str | None = None, since: float | None = None, limit: int = 100_000
    ) -> list[AuditRecord]:
        query = (
            "SELECT seq, time, tenant, action, sandbox_id, exec_id, snapshot_id, outcome,"
            " request_id, target FROM audit WHERE 1=1"
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
                target=r[9],
            )
            for r in self.db.execute(query, args).fetchall()
        ]


def insert_audit(db: sqlite3.Connection, record: AuditRecord) -> None:
    db.execute(
        "INSERT INTO audit(time, tenant, action, sandbox_id, exec_id, snapshot_id,"
        " outcome, request_id, target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.time,
            record.tenant,
            record.action,
            record.sandbox_id,
            record.exec_id,
            record.snapshot_id,
            record.outcome,
            record.request_id,
            record.target,
        ),
    )
