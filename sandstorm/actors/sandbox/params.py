"""What a sandbox is made with (:class:`SandboxParams`), what the store keeps of it
(:class:`StoredParams`), and what one exec runs (:class:`ExecPlan`). All three are decided
before the actor exists (``sandstorm.actors.planning``); the actor only reads them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgspec

from sandstorm.api.types import IsolationLevel, Language, RuntimeName, SelectionReason
from sandstorm.runtimes.base import SandboxSpec


@dataclass(frozen=True, slots=True)
class SandboxParams:
    sandbox_id: str
    runtime_name: RuntimeName
    isolation_level: IsolationLevel
    selection: SelectionReason
    spec: SandboxSpec
    image: str
    timeout_ms: int
    keep_alive_s: int
    restored_from: str | None = None
    first_channel: int = 1
    tenant: str = "default"

    def with_id(self, sandbox_id: str) -> SandboxParams:
        """The same parameters for another sandbox (a pool sandbox claimed with them)."""
        spec = dataclasses.replace(self.spec, sandbox_id=sandbox_id)
        return dataclasses.replace(self, sandbox_id=sandbox_id, spec=spec)


class StoredMount(msgspec.Struct, frozen=True, kw_only=True):
    source: str
    destination: str
    read_only: bool = True


class StoredParams(msgspec.Struct, frozen=True, kw_only=True):
    """What the store keeps of a sandbox's parameters (``SandboxRecord.params``): limits and
    choices, never environment values, code, stdin, command arguments or file contents (only
    their names). Enough to rebuild the parameters when a restarted gateway takes the sandbox
    over; a field a stored row lacks takes its default."""

    isolation_level: IsolationLevel
    cpu_limit: float
    memory_limit: int
    timeout: int  # ms
    keep_alive: int  # s
    mounts: tuple[StoredMount, ...] = ()
    selection: SelectionReason = "preference"
    image: str | None = None  # None: the gateway's configured image
    restored_from: str | None = None
    # What a run request asked for besides, kept for inspection only.
    runtime_preference: RuntimeName | None = None
    language: Language | None = None
    environment_names: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, params: dict[str, Any]) -> StoredParams:
        """Decode a stored row's params; ``msgspec.ValidationError`` when they cannot be."""
        return msgspec.convert(params, cls)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = msgspec.to_builtins(self)
        return record


@dataclass(frozen=True, slots=True)
class ExecPlan:
    """An exec fully decided by the caller: argv, env, files to write first, stdin."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    timeout_ms: int
    files: dict[str, bytes]
    stdin: bytes | None
    close_stdin: bool
    #: What the program leaves running when it ends runs on; otherwise it is killed.
    background: bool = False
