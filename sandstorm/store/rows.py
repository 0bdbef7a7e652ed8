"""The records the store keeps: one frozen struct per kind of row, and the crash-recovery state
a sandbox actor saves with its record (:class:`SandboxProgress`)."""

from __future__ import annotations

from typing import Any

import msgspec

from sandstorm.api.types import ExecResult, SandboxState


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
    #: What a file operation was about: its path (a move: "from -> to"); never content.
    target: str | None = None


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
