"""Sandboxes and their execs: the records the gateway answers from once a sandbox is gone, and
the checkpoints a restarted gateway resumes its sandboxes from."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from sandstorm.api.types import ExecResult, SandboxState
from sandstorm.store._database import Database
from sandstorm.store._tenants import insert_audit
from sandstorm.store.rows import (
    AuditRecord,
    ExecRecordRow,
    ProgressExec,
    SandboxProgress,
    SandboxRecord,
)
from sandstorm.store.schema import StoreError

_RESULT = msgspec.json.Decoder(ExecResult)
_PROGRESS = msgspec.json.Decoder(SandboxProgress)
_ENC = msgspec.json.Encoder()


class SandboxTables(Database):
    """The sandboxes, execs and exec_output tables."""

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
                insert_audit(db, record)

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
