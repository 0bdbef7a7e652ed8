"""Answers from the store for sandboxes the running gateway no longer holds (ended before the
last restart, or evicted from the router's history): the same wire types as live ones.

What the store does not keep is reported empty: usage (the sandbox is gone) and an exec's argv
(command arguments and code are never stored).
"""

from __future__ import annotations

from sandstorm.api.timestamps import rfc3339_from_epoch
from sandstorm.api.types import ExecSummary, Failure, Limits, SandboxStatus, Usage
from sandstorm.store import ExecRecordRow, SandboxRecord


def exec_summary(row: ExecRecordRow) -> ExecSummary:
    return ExecSummary(
        exec_id=row.id,
        state="finished" if row.state == "finished" else "running",
        started_at=row.started_at,
        argv=[],
        result=row.result,
    )


def sandbox_status(record: SandboxRecord, execs: list[ExecRecordRow]) -> SandboxStatus:
    params = record.params
    ended = record.ended_at if record.ended_at is not None else record.created_at
    failure = None
    if record.state == "failed":
        failure = Failure(reason=record.reason or "unknown", at=rfc3339_from_epoch(ended))
    return SandboxStatus(
        id=record.id,
        state=record.state,
        runtime=record.runtime,  # type: ignore[arg-type]
        isolation_level=params.get("isolation_level", "standard"),
        created_at=rfc3339_from_epoch(record.created_at),
        last_active_at=rfc3339_from_epoch(ended),
        expires_at=None,
        limits=Limits(
            cpu_limit=float(params.get("cpu_limit", 0.0)),
            memory_limit=int(params.get("memory_limit", 0)),
            timeout=int(params.get("timeout", 0)),
        ),
        usage=Usage(memory_bytes=0, cpu_time_ms=0.0),
        execs=[exec_summary(e) for e in execs],
        restored_from=params.get("restored_from"),
        failure=failure,
        last_event_seq=record.last_event_seq,
    )
