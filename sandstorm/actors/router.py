"""The router actor: applies the selection rules and admission control, spawns sandbox actors,
and keeps the table of sandboxes (live ones, and a bounded history of ended ones).

Admission is decided synchronously (no checkpoint between the check and the reservation), so
concurrent creates can never overshoot ``max_sandboxes`` or the memory budget.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio

from sandstorm.actors.sandbox import ExecPlan, SandboxActor, SandboxParams
from sandstorm.agent.client import MAX_GATEWAY_FRAME
from sandstorm.config import Config
from sandstorm.errors import AtCapacity, InvalidRequest, NotFound, RuntimeUnavailable
from sandstorm.ids import is_id, new_id
from sandstorm.protocol import (
    JSON_ENCODER,
    ExecRequest,
    IsolationLevel,
    Mount,
    RunRequest,
    RuntimeName,
)
from sandstorm.runtimes.base import MountSpec, SandboxSpec
from sandstorm.runtimes.registry import RuntimeRegistry
from sandstorm.selection import NoRuntime, Selected, select_runtime
from sandstorm.snapshots import SnapshotCatalog, SnapshotCorrupt, SnapshotMeta
from sandstorm.validation import (
    INLINE_CODE_LIMIT,
    check_exec,
    check_run,
    code_argv,
    resolve_mount,
)

log = logging.getLogger(__name__)
# Ended sandboxes stay answerable (status, results, a late stream's replay) until one of these
# bounds evicts the oldest; after that their id is unknown (404).
MAX_ENDED = 10_000
ENDED_RETAINED_BYTES = 256 * 1024 * 1024
ENDED_RETENTION_S = 3600.0
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/workspace",
    "LANG": "C.UTF-8",
    "USER": "sandbox",
    # Output should stream as it is written; Python block-buffers a pipe unless told otherwise.
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True, slots=True)
class Created:
    actor: SandboxActor
    exec_id: str


class Router:
    def __init__(
        self,
        config: Config,
        registry: RuntimeRegistry,
        catalog: SnapshotCatalog,
        rootfs: Path,
        languages: set[str],
    ) -> None:
        self.config = config
        self.registry = registry
        self.catalog = catalog
        self.rootfs = rootfs
        self.languages = languages
        self.sandboxes: OrderedDict[str, SandboxActor] = OrderedDict()
        self._reserved_memory = 0
        self._reserved_count = 0
        self._nursery: trio.Nursery | None = None
        self.open_streams = 0
        # Ids whose actor is booting: not in the table yet, but the reaper must not touch them.
        self._booting: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery every sandbox actor lives in. Cancelling it ends them all: each actor
        tears its sandbox down (shielded) before the nursery closes, all in parallel."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    # ------------------------------------------------------------------ lookups

    def get(self, sandbox_id: str) -> SandboxActor:
        actor = self.sandboxes.get(sandbox_id) if is_id(sandbox_id, "sbx") else None
        if actor is None:
            raise NotFound(f"sandbox {sandbox_id!r} not found", sandbox_id=sandbox_id)
        return actor

    def live_ids(self) -> set[str]:
        live = {sid for sid, a in self.sandboxes.items() if a.alive or not a.finished.is_set()}
        return live | self._booting

    # ------------------------------------------------------------------ create / resume

    def _admit(self, memory: int) -> None:
        if self._reserved_count >= self.config.max_sandboxes:
            raise AtCapacity(
                f"the gateway already runs {self._reserved_count} sandboxes (max_sandboxes)",
                retry_after=1,
            )
        if self._reserved_memory + memory > self.config.memory_budget:
            raise AtCapacity(
                "the gateway's memory budget is fully reserved", retry_after=1,
                reserved=self._reserved_memory, budget=self.config.memory_budget,
            )  # fmt: skip
        self._reserved_count += 1
        self._reserved_memory += memory

    def _release(self, memory: int) -> None:
        self._reserved_count -= 1
        self._reserved_memory -= memory

    def _choose(self, level: IsolationLevel, preference: RuntimeName | None) -> Selected:
        choice = select_runtime(level, preference, self.registry.unavailable())
        if isinstance(choice, NoRuntime):
            raise RuntimeUnavailable(
                f"no available runtime supports isolation level {level!r}",
                isolation_level=level,
                candidates=dict(choice.candidates),
            )
        return choice

    async def create(self, req: RunRequest) -> Created:
        mounts = check_run(req, self.config)
        choice = self._choose(req.isolation_level, req.runtime_preference)
        plan = self.plan(req, req.timeout)
        sandbox_id = new_id("sbx")
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            rootfs=self.rootfs,
            cpu_limit=req.cpu_limit,
            memory_limit=req.memory_limit,
            pids_limit=self.config.pids_limit,
            mounts=mounts,
        )
        params = SandboxParams(
            sandbox_id=sandbox_id,
            runtime_name=choice.runtime,
            isolation_level=req.isolation_level,
            selection=choice.reason,
            spec=spec,
            image=self.config.image,
            timeout_ms=req.timeout,
            keep_alive_s=req.keep_alive,
        )
        actor = await self._spawn(params, None)
        try:
            record = await actor.exec(plan)
        except BaseException:
            # A create that fails after boot (a file that cannot be written) leaves nothing.
            with trio.CancelScope(shield=True):
                await actor.destroy()
            raise
        finally:
            actor.release_hold()
        return Created(actor, record.exec_id)

    async def resume(self, snapshot_id: str, keep_alive: int) -> SandboxActor:
        if keep_alive > self.config.max_keep_alive_s:
            raise InvalidRequest(
                f"keep_alive is above the maximum {self.config.max_keep_alive_s}",
                field="keep_alive",
            )
        meta = self.catalog.load(snapshot_id)
        try:
            await self.catalog.verify(meta)
        except SnapshotCorrupt as exc:
            raise InvalidRequest(str(exc), field="snapshot_id") from None
        mounts = self._snapshot_mounts(meta)
        sandbox_id = new_id("sbx")
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            rootfs=self.rootfs,
            cpu_limit=meta.cpu_limit,
            memory_limit=meta.memory_limit,
            pids_limit=meta.pids_limit,
            mounts=mounts,
        )
        params = SandboxParams(
            sandbox_id=sandbox_id,
            runtime_name=meta.info.runtime,
            isolation_level=meta.isolation_level,
            selection="preference",
            spec=spec,
            image=meta.image,
            timeout_ms=meta.timeout,
            keep_alive_s=keep_alive,
            restored_from=snapshot_id,
            first_channel=meta.next_channel,
        )
        actor = await self._spawn(params, self.catalog.path(snapshot_id))
        actor.release_hold()
        return actor

    def _snapshot_mounts(self, meta: SnapshotMeta) -> tuple[MountSpec, ...]:
        # The allow-list may have changed since the snapshot: check the mounts again.
        return tuple(
            resolve_mount(
                Mount(source=m.source, destination=m.destination, read_only=m.read_only),
                i,
                self.config,
            )
            for i, m in enumerate(meta.mounts)
        )

    async def _spawn(self, params: SandboxParams, restore_image: Path | None) -> SandboxActor:
        assert self._nursery is not None, "router not running"
        runtime = self.registry.driver(params.runtime_name)
        memory = params.spec.memory_limit
        self._admit(memory)
        actor = SandboxActor(
            params,
            runtime,
            self.config,
            self.catalog,
            on_startup=lambda ms: self.registry.record_startup(params.runtime_name, ms),
        )
        # _supervise gives the admission back whenever the actor ends, boot failure included.
        self._booting.add(actor.id)
        try:
            await self._nursery.start(self._supervise, actor, restore_image, memory)
        finally:
            self._booting.discard(actor.id)
        self.sandboxes[actor.id] = actor
        self._trim_history()
        return actor

    async def _supervise(
        self,
        actor: SandboxActor,
        restore_image: Path | None,
        memory: int,
        *,
        task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await actor.run(restore_image, task_status=task_status)
        finally:
            self._release(memory)
            self._trim_history()

    def _trim_history(self) -> None:
        """Evict ended sandboxes, oldest first, beyond the count, byte and age bounds."""
        ended = [a for a in self.sandboxes.values() if a.finished.is_set()]
        retained = sum(a.retained_bytes() for a in ended)
        now = trio.current_time()
        for actor in sorted(ended, key=lambda a: a.ended_at or 0.0):
            too_many = len(self.sandboxes) > MAX_ENDED
            too_big = retained > ENDED_RETAINED_BYTES
            too_old = actor.ended_at is not None and now - actor.ended_at > ENDED_RETENTION_S
            if not (too_many or too_big or too_old):
                break
            retained -= actor.retained_bytes()
            del self.sandboxes[actor.id]

    # ------------------------------------------------------------------ execs

    def plan(
        self, req: RunRequest | ExecRequest, timeout_ms: int, *, interactive: bool = False
    ) -> ExecPlan:
        env = dict(BASE_ENV)
        env.update(req.environment)
        files = {path: content.encode() for path, content in getattr(req, "files", {}).items()}
        if req.code is not None:
            assert req.language is not None
            if req.language not in self.languages:
                raise InvalidRequest(
                    f"language {req.language} is not in the image", field="language"
                )
            if len(req.code.encode()) <= INLINE_CODE_LIMIT:
                argv = code_argv(req.language, req.code, is_file=False)
            else:
                path = f"/tmp/.sandstorm-code-{os.urandom(6).hex()}"
                files[path] = req.code.encode()
                argv = code_argv(req.language, path, is_file=True)
        else:
            assert req.command is not None
            argv = list(req.command)
        cwd = getattr(req, "cwd", None) or "/workspace"
        # argv, environment and cwd travel in one agent frame, JSON-encoded (escaping can grow
        # them): refuse what cannot fit rather than fail after the sandbox exists.
        size = len(JSON_ENCODER.encode({"argv": argv, "env": env, "cwd": cwd}))
        if size > MAX_GATEWAY_FRAME - 1024:
            field = "command" if req.command is not None else "environment"
            raise InvalidRequest(
                f"command, environment and cwd take {size} bytes encoded; the limit is "
                f"{MAX_GATEWAY_FRAME - 1024}",
                field=field,
            )
        stdin = req.stdin.encode() if req.stdin is not None else None
        return ExecPlan(
            argv=argv,
            env=env,
            cwd=cwd,
            timeout_ms=timeout_ms,
            files=files,
            stdin=stdin,
            close_stdin=not (interactive or req.stdin_open),
        )

    async def exec(
        self, sandbox_id: str, req: ExecRequest, *, interactive: bool = False
    ) -> tuple[SandboxActor, str]:
        """Start an exec. ``interactive`` keeps its stdin open (stream clients feed it)."""
        actor = self.get(sandbox_id)
        check_exec(req, self.config)
        plan = self.plan(req, req.timeout or actor.params.timeout_ms, interactive=interactive)
        record = await actor.exec(plan)
        return actor, record.exec_id
