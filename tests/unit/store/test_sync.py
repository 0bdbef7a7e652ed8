"""The SQLite store on a real database file: schema, append-only audit, keys, records, and the
snapshot catalogue's crash rules."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sandstorm.actors.tenancy import new_key, retry_after
from sandstorm.api.types import ExecResult, SandboxState, SnapshotInfo
from sandstorm.cli.admin import parse_since
from sandstorm.ids import new_id
from sandstorm.store import (
    CREDENTIALS_STAMP,
    DB_NAME,
    SCHEMA_VERSION,
    AsyncStore,
    AuditRecord,
    ExecRecordRow,
    ProgressExec,
    Quotas,
    SandboxRecord,
    Store,
    StoreError,
    key_hash,
)
from sandstorm.store import aio as async_store
from sandstorm.store.snapshots import SnapshotCatalog, SnapshotMeta


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


async def test_resolved_keys_are_cached_until_keys_or_tenants_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway keeps what a key resolved to, and asks the database again after any change
    to keys or tenants made through Store by another process (the CLI)."""
    gateway = AsyncStore(tmp_path)
    cli = Store(tmp_path).open()
    asked: list[str | None] = []

    def resolve(store: Store, digest: str | None) -> tuple[bool, Any]:
        asked.append(digest)
        return store.authenticate(digest)

    def named(found: tuple[bool, Any]) -> bool:
        return found[1] is not None

    async def resolved(digest: str) -> tuple[bool, Any]:
        return await gateway.cached_credentials(digest, resolve, keep=named)

    try:
        with trio.fail_after(20):
            await gateway.open()
            key_id, secret = new_key()
            cli.set_tenant("acme", Quotas(max_sandboxes=3))
            cli.add_key(key_id, "acme", key_hash(secret))
            good, bad = key_hash(secret), key_hash(secret + "x")
            first = await resolved(good)
            assert first[1] is not None and first[1].quotas.max_sandboxes == 3
            assert await resolved(good) == first
            assert asked == [good]  # the second from the cache
            # An unknown key is never kept: every try asks the database.
            assert await resolved(bad) == (True, None)
            assert await resolved(bad) == (True, None)
            assert asked == [good, bad, bad]
            # Changes count at the next call: quotas, then the revocation.
            cli.set_tenant("acme", Quotas(max_sandboxes=5))
            changed = await resolved(good)
            assert changed[1] is not None and changed[1].quotas.max_sandboxes == 5
            cli.revoke_key(key_id)
            assert await resolved(good) == (False, None)
            # A query that began before a change, and ends after another request saw it, is
            # not kept: its answer may predate the change.
            cli.set_tenant("acme", Quotas(max_sandboxes=5))
            cli.add_key(key_id + "x", "acme", key_hash(secret + "y"))
            late = key_hash(secret + "y")
            started, release = trio.Event(), trio.Event()

            def slow(store: Store, digest: str | None) -> tuple[bool, Any]:
                trio.from_thread.run_sync(started.set)
                trio.from_thread.run(release.wait)
                return resolve(store, digest)

            async def slow_lookup() -> None:
                await gateway.cached_credentials(late, slow, keep=named)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_lookup)
                await started.wait()
                cli.set_tenant("acme", Quotas(max_sandboxes=6))
                # Another request sees the new stamp (and waits for the thread behind it).
                nursery.start_soon(resolved, good)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
            assert late not in gateway._credentials
            # Without a readable stamp nothing is cached.
            asked.clear()
            (tmp_path / CREDENTIALS_STAMP).unlink()
            await resolved(good)
            await resolved(good)
            assert asked == [good, good]
            # Bounded: a full cache starts over.
            cli.set_tenant("acme")
            monkeypatch.setattr(async_store, "KEY_CACHE_MAX", 2)
            keys = []
            for _ in range(3):
                other_id, other_secret = new_key()
                cli.add_key(other_id, "acme", key_hash(other_secret))
                keys.append(key_hash(other_secret))
            for digest in keys:
                await resolved(digest)
            assert len(gateway._credentials) <= 2
    finally:
        cli.close()
        await gateway.close()


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
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = Store(tmp_path).open()
    try:
        columns = {r[1] for r in store.db.execute("PRAGMA table_info(sandboxes)")}
        assert "progress" in columns
        assert store.exec_output("exe_none") == (b"", b"")
    finally:
        store.close()


def test_retry_after_is_the_earliest_release_clamped() -> None:
    assert retry_after([], now=0) == 60
    assert retry_after([None, 10.0, 30.0], now=0) == 11
    assert retry_after([0.0], now=5) == 1
    assert retry_after([1e9], now=0) == 3600


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


def test_records_hold_no_secret_columns(store: Store) -> None:
    # The schema itself has nowhere to put environment values, code, stdin or argv.
    columns = {
        row[1]
        for table in ("sandboxes", "execs", "snapshots", "audit", "api_keys", "tenants")
        for row in store.db.execute(f"PRAGMA table_info({table})").fetchall()
    }
    for forbidden in ("environment", "code", "stdin", "argv", "command", "secret", "key"):
        assert forbidden not in columns


async def test_any_store_method_runs_in_the_worker_thread(tmp_path: Path) -> None:
    """``call`` runs any Store method (keywords included) in the writer's thread, ``read`` on
    the reader's connection, which sees what the writer committed. A call cancelled while its
    method runs is not abandoned: the write completes."""
    store = AsyncStore(tmp_path)
    with trio.fail_after(10):
        await store.open()
        try:
            sid = new_id("sbx")
            record = SandboxRecord(
                id=sid, tenant="a", runtime="gvisor", state="creating", params={},
                created_at=time.time(),
            )  # fmt: skip
            await store.call(Store.put_sandbox, record)
            await store.call(Store.set_sandbox_state, sid, "idle", reason="held")
            stored = await store.read(Store.get_sandbox, sid)
            assert stored is not None and (stored.state, stored.reason) == ("idle", "held")
            assert [r.id for r in await store.read(Store.list_sandboxes, tenant="a")] == [sid]

            started, release = trio.Event(), threading.Event()

            def slow_write(s: Store, state: SandboxState) -> SandboxState:
                trio.from_thread.run_sync(started.set)
                release.wait()
                s.set_sandbox_state(sid, state)
                return state

            returned: list[str] = []
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def write() -> None:
                        returned.append(await store.call(slow_write, "running"))

                    nursery.start_soon(write)
                    await started.wait()
                    scope.cancel()
                    release.set()
            assert returned == ["running"]
            stored = await store.call(Store.get_sandbox, sid)
            assert stored is not None and stored.state == "running"
        finally:
            await store.close()
