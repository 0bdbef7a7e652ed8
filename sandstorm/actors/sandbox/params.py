"""What a sandbox is made with (:class:`SandboxParams`) and what one exec runs (:class:`ExecPlan`).
Both are decided before the actor exists (``sandstorm.actors.planning``); the actor only reads
them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sandstorm.api.types import IsolationLevel, RuntimeName, SelectionReason
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
