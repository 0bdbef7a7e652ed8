"""The SQLite store on a real database file: schema and migrations, append-only audit, keys,
tenants and records."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from sandstorm.actors.tenancy import new_key, retry_after
from sandstorm.api.types import ExecResult
from sandstorm.cli.admin import parse_since
from sandstorm.ids import new_id
from sandstorm.store import (
    DB_NAME,
    SCHEMA_VERSION,
    AuditRecord,
    ExecRecordRow,
    ProgressExec,
    Quotas,
    SandboxRecord,
    Store,
    StoreError,
    key_hash,
)


def _result(exec_id: str, stdout: str = "out\n") -> ExecResult:
    return ExecResult(
        exec_id=exec_id, exit_code=0, signal=None, verdict="ok", stdout=stdout, stderr="",
        stdout_truncated=False, stderr_truncated=False, duration_ms=1.0, cpu_time_ms=1.0,
        max_rss_bytes=1,
    )  # fmt: skip


def _sandbox(store: Store, tenant: str = "a", state: str = "idle") -> str:
    sid = new_id("sbx")
    store.put_sandbox(
        SandboxRecord(
            id=sid, tenant=tenant, runtime="gvisor", state=state,  # type: ignore[arg-type]
            params={"memory_limit": 1}, created_at=time.time(),
        )
    )  # fmt: skip
    return sid


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path).open()
    yield s  # type: ignore[misc]
    s.close()


def test_schema_is_versioned_and_wal(store: Store, tmp_path: Path) -> None:
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    Store(tmp_path).open().close()  # reopening applies nothing twice
    raw = sqlite3.connect(tmp_path / DB_NAME)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match="schema version"):
        Store(tmp_path).open()


def test_audit_is_append_only(store: Store) -> None:
    store.record_audit(AuditRecord(time=time.time(), tenant="a", action="run", outcome="201"))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("UPDATE audit SET outcome = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("DELETE FROM audit")
    assert [r.outcome for r in store.audit("a")] == ["201"]


def test_audit_filters_by_tenant_and_time(store: Store) -> None:
    now = time.time()
    for tenant, at in (("a", now - 7200), ("a", now), ("b", now)):
        store.record_audit(AuditRecord(time=at, tenant=tenant, action="run", outcome="201"))
    assert len(store.audit()) == 3
    assert len(store.audit("a")) == 2
    assert len(store.audit("a", since=parse_since("1h", now))) == 1
    assert len(store.audit(since=parse_since("2026-01-01T00:00:00Z"))) == 3


def test_parse_since() -> None:
    assert parse_since("10m", 1000.0) == 400.0
    assert parse_since("1d", 100_000.0) == 100_000.0 - 86400
    assert parse_since("1970-01-01T00:01:00") == 60.0
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_keys_are_stored_hashed_and_revocation_counts_at_once(store: Store, tmp_path: Path) -> None:
    assert store.authenticate(None) == (False, None)
    key_id, secret = new_key()
    assert secret.startswith("sst_") and len(secret) == 47
    store.set_tenant("acme", Quotas(max_sandboxes=3))
    store.add_key(key_id, "acme", key_hash(secret))
    any_key, tenant = store.authenticate(key_hash(secret))
    assert any_key and tenant is not None and tenant.name == "acme"
    assert tenant.quotas == Quotas(max_sandboxes=3)
    assert store.authenticate(key_hash(secret + "x")) == (True, None)
    # A second connection (the CLI) revokes; the first sees it on its next query.
    other = Store(tmp_path).open()
    other.revoke_key(key_id)
    other.close()
    assert store.authenticate(key_hash(secret)) == (False, None)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(DB_NAME))
    assert secret.encode() not in raw


def test_set_tenant_only_replaces_given_limits(store: Store) -> None:
    store.set_tenant("t", Quotas(max_sandboxes=1, max_memory=2))
    tenant = store.set_tenant("t", Quotas(max_concurrent_execs=3))
    assert tenant.quotas == Quotas(max_sandboxes=1, max_memory=2, max_concurrent_execs=3)


def test_exec_records_whichever_write_comes_first(store: Store) -> None:
    sid = _sandbox(store)
    eid = new_id("exe")
    finished = ExecRecordRow(
        id=eid, sandbox_id=sid, tenant="a", state="finished", started_at="t0",
        finished_at="t1", result=_result(eid),
    )  # fmt: skip
    store.finish_exec(finished)  # the exec ended before its first record was written
    store.put_exec(
        ExecRecordRow(id=eid, sandbox_id=sid, tenant="a", state="running", started_at="t0")
    )
    row = store.get_exec(eid)
    assert row is not None and row.state == "finished" and row.result == _result(eid)
    assert [e.id for e in store.list_execs(sid)] == [eid]


def test_save_progress_and_failing_the_unfinished(store: Store) -> None:
    sid = _sandbox(store)
    ended = _sandbox(store, state="destroyed")
    eid = new_id("exe")
    store.save_progress(
        sid, 17, 4096, [ProgressExec(id=eid, started_at="t0", result=_result(eid, "part"))]
    )
    record = store.get_sandbox(sid)
    assert record is not None and (record.last_event_seq, record.agent_offset) == (17, 4096)
    assert store.fail_unfinished("gateway restarted") == [sid]
    record = store.get_sandbox(sid)
    assert record is not None and record.state == "failed" and record.reason == "gateway restarted"
    row = store.get_exec(eid)
    assert row is not None and row.state == "finished"
    assert row.result is not None and row.result.verdict == "killed" and row.result.stdout == "part"
    assert store.get_sandbox(ended).state == "destroyed"  # type: ignore[union-attr]


def test_checkpointed_output_is_kept_as_raw_bytes(store: Store) -> None:
    """Output saved across checkpoints comes back byte for byte: a UTF-8 character split
    between two checkpoints, and bytes that are not text at all."""
    sid = _sandbox(store)
    eid = new_id("exe")
    running = [ProgressExec(id=eid, started_at="t0")]
    text = "été".encode()
    store.save_progress(sid, 1, 10, running, output=[(eid, 1, text[:1]), (eid, 2, b"\xff")])
    store.save_progress(sid, 2, 20, running, output=[(eid, 1, text[1:]), (eid, 2, b"")])
    assert store.exec_output(eid) == (text, b"\xff")
    # Lost with its sandbox: the killed result is built from those bytes, which then go.
    assert store.fail_unfinished("gone") == [sid]
    row = store.get_exec(eid)
    assert row is not None and row.result is not None
    assert (row.result.stdout, row.result.verdict) == ("été", "killed")
    assert store.exec_output(eid) == (b"", b"")


def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "sandstorm.db")
    db.execute(
        "CREATE TABLE sandboxes (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, runtime TEXT NOT"
        " NULL, state TEXT NOT NULL, params TEXT NOT NULL, created_at REAL NOT NULL, ended_at"
        " REAL, reason TEXT, last_event_seq INTEGER NOT NULL DEFAULT 0, agent_offset INTEGER"
        " NOT NULL DEFAULT 0)"
    )
    db.execute(
        "CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, tenant"
        " TEXT, action TEXT NOT NULL, sandbox_id TEXT, exec_id TEXT, snapshot_id TEXT, outcome"
        " TEXT NOT NULL, request_id TEXT)"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = Store(tmp_path).open()
    try:
        columns = {r[1] for r in store.db.execute("PRAGMA table_info(sandboxes)")}
        assert "progress" in columns
        assert store.exec_output("exe_none") == (b"", b"")
        assert "target" in {r[1] for r in store.db.execute("PRAGMA table_info(audit)")}
    finally:
        store.close()


def test_retry_after_is_the_earliest_release_clamped() -> None:
    assert retry_after([], now=0) == 60
    assert retry_after([None, 10.0, 30.0], now=0) == 11
    assert retry_after([0.0], now=5) == 1
    assert retry_after([1e9], now=0) == 3600


def test_records_hold_no_secret_columns(store: Store) -> None:
    # The schema itself has nowhere to put environment values, code, stdin or argv.
    columns = {
        row[1]
        for table in ("sandboxes", "execs", "snapshots", "audit", "api_keys", "tenants")
        for row in store.db.execute(f"PRAGMA table_info({table})").fetchall()
    }
    for forbidden in ("environment", "code", "stdin", "argv", "command", "secret", "key"):
        assert forbidden not in columns


def test_a_full_disk_is_the_error_reported_and_the_store_recovers(tmp_path: Path) -> None:
    """On a full file system SQLite may end the transaction itself: the caller must see the
    disk error (which the web layer turns into a retryable 503), not a failed ROLLBACK."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        store = Store(small).open()
        try:
            filler = small / "filler"
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            big = "x" * 200_000
            with pytest.raises(sqlite3.OperationalError, match="full"):
                for _ in range(50):
                    store.record_audit(
                        AuditRecord(time=time.time(), tenant="a", action=big, outcome="201")
                    )
            filler.unlink()
            store.record_audit(AuditRecord(time=time.time(), tenant="a", action="run", outcome="1"))
            assert "1" in [r.outcome for r in store.audit("a")]
        finally:
            store.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)
