"""Every type that crosses the gateway's public wire: REST bodies and stream events.

These msgspec Structs are the single source of truth: the web layer decodes requests with them,
encodes responses with them, and ``protocol/openapi.json`` / ``protocol/stream.schema.json`` are
generated from them (``python -m sandstorm.api.schema``). New fields must get defaults so that old
clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Language = Literal["python", "javascript", "bash", "sh"]
IsolationLevel = Literal["standard", "strong", "maximum"]
RuntimeName = Literal["gvisor", "kata", "firecracker", "qemu"]
SelectionReason = Literal["preference", "default", "fallback"]
SandboxState = Literal[
    "creating", "running", "idle", "snapshotting", "stopping", "destroyed", "failed"
]
Verdict = Literal["ok", "error", "timeout", "oom", "output_limit", "killed"]
ExecState = Literal["running", "finished"]
SignalName = Literal["SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"]

LANGUAGES: tuple[Language, ...] = ("python", "javascript", "bash", "sh")
ISOLATION_LEVELS: tuple[IsolationLevel, ...] = ("standard", "strong", "maximum")
RUNTIME_NAMES: tuple[RuntimeName, ...] = ("gvisor", "kata", "firecracker", "qemu")

MIB = 1024 * 1024
# A python hello under gVisor needs about 32 MiB; below that a sandbox cannot even start.
MIN_MEMORY_LIMIT = 32 * MIB

# Static bounds; the configured maxima (memory, timeout, keep_alive) are checked after decoding.
CpuLimit = Annotated[float, Meta(ge=0.05, le=1024.0)]
MemoryLimit = Annotated[int, Meta(ge=MIN_MEMORY_LIMIT, le=1 << 44)]
TimeoutMs = Annotated[int, Meta(ge=1, le=7 * 24 * 3600 * 1000)]
KeepAliveS = Annotated[int, Meta(ge=0, le=30 * 24 * 3600)]
Argv = Annotated[
    list[Annotated[str, Meta(max_length=128 * 1024)]], Meta(min_length=1, max_length=4096)
]
Code = Annotated[str, Meta(max_length=8 * MIB)]
# Bounded in the type so that a body with a million variables is refused while decoding.
Environment = Annotated[dict[str, str], Meta(max_length=128)]
AbsPath = Annotated[str, Meta(min_length=1, max_length=4096)]


class _Wire(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for request bodies: immutable, keyword-only, unknown fields refused (typos fail)."""


class _Out(Struct, frozen=True, kw_only=True):
    """Base for response bodies."""


# --------------------------------------------------------------------------- requests


class Mount(_Wire, frozen=True):
    source: AbsPath
    destination: AbsPath
    read_only: bool = True


class RunRequest(_Wire, frozen=True):
    code: Code | None = None
    language: Language | None = None
    command: Argv | None = None
    isolation_level: IsolationLevel = "standard"
    runtime_preference: RuntimeName | None = None
    cpu_limit: CpuLimit = 1.0
    memory_limit: MemoryLimit = 512 * MIB
    timeout: TimeoutMs = 30_000
    environment: Environment = {}
    mounts: Annotated[list[Mount], Meta(max_length=64)] = []
    stdin: Code | None = None
    files: Annotated[dict[AbsPath, Code], Meta(max_length=1024)] = {}
    wait: bool = True
    keep_alive: KeepAliveS = 300
    # Keep the program's stdin open (after ``stdin``, if any) for ``stdin`` frames on the stream.
    stdin_open: bool = False
    # Processes the program leaves behind (``server &``, a daemon) run on after it ends, until
    # the sandbox ends; without it they are killed when it ends.
    background: bool = False


class ExecRequest(_Wire, frozen=True):
    code: Code | None = None
    language: Language | None = None
    command: Argv | None = None
    environment: Environment = {}
    cwd: AbsPath | None = None
    stdin: Code | None = None
    timeout: TimeoutMs | None = None
    wait: bool = True
    stdin_open: bool = False
    # Processes the program leaves behind (``server &``, a daemon) run on after it ends, until
    # the sandbox ends; without it they are killed when it ends.
    background: bool = False


class SnapshotRequest(_Wire, frozen=True):
    leave_running: bool = True


class ResumeRequest(_Wire, frozen=True):
    snapshot_id: Annotated[str, Meta(min_length=1, max_length=64)]
    keep_alive: KeepAliveS = 300


# --------------------------------------------------------------------------- responses


class ExecResult(_Out, frozen=True):
    exec_id: str
    exit_code: int | None
    signal: int | None
    verdict: Verdict
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float
    cpu_time_ms: float
    max_rss_bytes: int


class RunResponse(_Out, frozen=True):
    id: str
    state: SandboxState
    runtime: RuntimeName
    isolation_level: IsolationLevel
    selection: SelectionReason
    created_at: str
    expires_at: str | None
    exec_id: str
    result: ExecResult | None = None


class ExecResponse(_Out, frozen=True):
    id: str
    exec_id: str
    result: ExecResult | None = None


class ExecSummary(_Out, frozen=True):
    exec_id: str
    state: ExecState
    started_at: str
    argv: list[str]
    result: ExecResult | None = None


class Limits(_Out, frozen=True):
    cpu_limit: float
    memory_limit: int
    timeout: int


class Usage(_Out, frozen=True):
    memory_bytes: int
    cpu_time_ms: float


class Failure(_Out, frozen=True):
    reason: str
    at: str


class SandboxStatus(_Out, frozen=True):
    id: str
    state: SandboxState
    runtime: RuntimeName
    isolation_level: IsolationLevel
    created_at: str
    last_active_at: str
    expires_at: str | None
    limits: Limits
    usage: Usage
    execs: list[ExecSummary]
    restored_from: str | None = None
    failure: Failure | None = None
    # The seq of the newest stream event: connect with ?since=this to get only what follows.
    last_event_seq: int = 0


class SandboxList(_Out, frozen=True):
    sandboxes: list[SandboxStatus]


class DeleteResponse(_Out, frozen=True):
    id: str
    state: SandboxState
    released: list[str]


class SnapshotInfo(_Out, frozen=True):
    snapshot_id: str
    sandbox_id: str
    runtime: RuntimeName
    size_bytes: int
    sha256: str
    created_at: str


class SnapshotList(_Out, frozen=True):
    snapshots: list[SnapshotInfo]


class SnapshotDeleted(_Out, frozen=True):
    snapshot_id: str
    deleted: bool


class RuntimeCapabilities(_Out, frozen=True):
    snapshot: bool
    exec: bool
    streaming: bool
    network: bool


class RuntimeInfo(_Out, frozen=True):
    name: RuntimeName
    available: bool
    binary: str | None
    version: str | None
    isolation_levels: list[IsolationLevel]
    default_for: list[IsolationLevel]
    capabilities: RuntimeCapabilities
    reason: str | None
    startup_ms_p50: float | None


class LanguageInfo(_Out, frozen=True):
    name: Language
    version: str
    command: list[str]


class Health(_Out, frozen=True):
    status: Literal["ok"]
    version: str


class Ready(_Out, frozen=True):
    ready: bool
    store: bool
    runtimes_detected: bool
    image: bool
    available_runtimes: list[RuntimeName]


class ErrorDetail(_Out, frozen=True):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(_Out, frozen=True):
    error: ErrorDetail


# --------------------------------------------------------------------------- stream events
# Server → client frames on GET /v1/sandboxes/{id}/stream; ``seq`` is per sandbox, from 1.


class _Event(Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    seq: int
    ts: str


class StatusEvent(_Event, frozen=True, tag="status"):
    state: SandboxState
    reason: str | None = None


class ExecStartedEvent(_Event, frozen=True, tag="exec_started"):
    exec_id: str
    argv: list[str]


class StdoutEvent(_Event, frozen=True, tag="stdout"):
    exec_id: str
    data: str | None = None
    data_b64: str | None = None


class StderrEvent(_Event, frozen=True, tag="stderr"):
    exec_id: str
    data: str | None = None
    data_b64: str | None = None


class ExitEvent(_Event, frozen=True, tag="exit"):
    exec_id: str
    result: ExecResult


class FsEvent(_Event, frozen=True, tag="fs"):
    """A change under a ``watch`` (coalesced: one per path and kind per batch). ``rename`` has
    ``to``; ``overflow`` (on the watched path) says changes were lost, so a client that mirrors
    the tree lists it again."""

    watch: str
    op: Literal["create", "write", "remove", "rename", "overflow"]
    path: str
    to: str | None = None


class LaggedEvent(Struct, frozen=True, kw_only=True, tag_field="type", tag="lagged"):
    missed_from: int
    missed_to: int


class ErrorEvent(
    Struct, frozen=True, kw_only=True, tag_field="type", tag="error", omit_defaults=True
):
    code: str
    message: str
    #: The ``id`` of the client frame refused (a ``watch`` or an ``exec``), when it had one.
    id: str | None = None


class ExecAcceptedEvent(Struct, frozen=True, kw_only=True, tag_field="type", tag="exec_accepted"):
    """Direct reply to a client ``exec`` frame (not in the seq-numbered log): its exec id."""

    id: str | None
    exec_id: str


class WatchAcceptedEvent(Struct, frozen=True, kw_only=True, tag_field="type", tag="watch_accepted"):
    """Direct reply to a client ``watch`` frame: the watch is in place from here on."""

    id: str
    path: str


StreamEvent = StatusEvent | ExecStartedEvent | StdoutEvent | StderrEvent | ExitEvent | FsEvent
ServerFrame = StreamEvent | LaggedEvent | ErrorEvent | ExecAcceptedEvent | WatchAcceptedEvent


# Client → server frames on the stream.


class _ClientFrame(Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    pass


# An exec id as a client names it: bounded, so an unknown one costs nothing to refuse or log.
ClientExecId = Annotated[str, Meta(max_length=64)]


class StdinFrame(_ClientFrame, frozen=True, tag="stdin"):
    exec_id: ClientExecId
    data: Annotated[str, Meta(max_length=MIB)] | None = None
    data_b64: Annotated[str, Meta(max_length=2 * MIB)] | None = None


class StdinCloseFrame(_ClientFrame, frozen=True, tag="stdin_close"):
    exec_id: ClientExecId


class SignalFrame(_ClientFrame, frozen=True, tag="signal"):
    exec_id: ClientExecId
    signal: SignalName


class ExecFrame(_ClientFrame, frozen=True, tag="exec"):
    """Start a command whose output streams on this socket; its stdin stays open for
    ``stdin`` frames until ``stdin_close``. ``id`` is echoed in the ``exec_accepted`` reply."""

    id: Annotated[str, Meta(max_length=128)] | None = None
    code: Code | None = None
    language: Language | None = None
    command: Argv | None = None
    environment: Environment = {}
    cwd: AbsPath | None = None
    stdin: Code | None = None
    timeout: TimeoutMs | None = None
    background: bool = False


class WatchFrame(_ClientFrame, frozen=True, tag="watch"):
    """Report changes under ``path`` (with ``recursive``, in every directory below it, those
    made later included) as ``fs`` events tagged with ``id``, until ``unwatch`` or the end
    of this connection."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    path: AbsPath
    recursive: bool = False


class UnwatchFrame(_ClientFrame, frozen=True, tag="unwatch"):
    id: Annotated[str, Meta(min_length=1, max_length=128)]


ClientFrame = StdinFrame | StdinCloseFrame | SignalFrame | ExecFrame | WatchFrame | UnwatchFrame

JSON_ENCODER = msgspec.json.Encoder()
