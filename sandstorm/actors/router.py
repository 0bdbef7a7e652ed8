"""The router actor: applies the selection rules and admission control, spawns sandbox actors,
and keeps the table of sandboxes (live ones, and a bounded history of ended ones).

Admission is decided synchronously (no checkpoint between the check and the reservation), so
concurrent creates can never overshoot ``max_sandboxes`` or the memory budget.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from sandstorm.actors.execs import ExecTracker
from sandstorm.actors.pool import POOL_TENANT, WarmPool
from sandstorm.actors.quotas import TenantLedger
from sandstorm.actors.recorder import Recorder
from sandstorm.actors.sandbox import ExecPlan, Recovered, SandboxActor, SandboxParams
from sandstorm.actors.tenancy import DEFAULT_TENANT
from sandstorm.agent.client import MAX_GATEWAY_FRAME
from sandstorm.api.selection import NoRuntime, Selected, select_runtime
from sandstorm.api.types import (
    JSON_ENCODER,
    ExecRequest,
    IsolationLevel,
    Mount,
    RunRequest,
    RuntimeName,
)
from sandstorm.api.validation import (
    INLINE_CODE_LIMIT,
    check_exec,
    check_run,
    code_argv,
    resolve_mount,
)
from sandstorm.config import Config
from sandstorm.errors import (
    AtCapacity,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RuntimeUnavailable,
)
from sandstorm.ids import is_id, new_id
from sandstorm.metrics import Metrics
from sandstorm.runtimes.base import MountSpec, SandboxSpec
from sandstorm.runtimes.registry import RuntimeRegistry
from sandstorm.snapshots import SnapshotCatalog, SnapshotCorrupt, SnapshotMeta
from sandstorm.store import AsyncStore, ExecRecordRow, Quotas, SandboxRecord, Tenant

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
        *,
        metrics: Metrics | None = None,
        store: AsyncStore | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        # Durable records (None in tests of the actors alone): a create's sandbox and first
        # exec are written before it is answered, later changes through the recorder.
        self.store = store
        self.recorder = recorder
        self.quotas = TenantLedger()
        self.metrics = metrics or Metrics(process=False)
        # Set by the gateway's drain (SIGTERM): new sandboxes and execs are refused.
        self.draining = False
        self.registry = registry
        self.catalog = catalog
        self.rootfs = rootfs
        self.languages = languages
        self.sandboxes: OrderedDict[str, SandboxActor] = OrderedDict()
        # Admission: what each admitted sandbox (pool ones included) reserved, by id.
        self._reservations: dict[str, int] = {}
        self._reserved_memory = 0
        # The warm pool (None: every create boots a sandbox); see start_pool().
        self.pool: WarmPool | None = None
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

    def get(self, sandbox_id: str, tenant: str | None = None) -> SandboxActor:
        """The sandbox; NotFound, word for word as for an unknown id, when it is another
        tenant's (``tenant`` None: any tenant, for the gateway's own use)."""
        actor = self.sandboxes.get(sandbox_id) if is_id(sandbox_id, "sbx") else None
        if actor is not None and tenant is not None and actor.params.tenant != tenant:
            actor = None
        if actor is None:
            raise NotFound(f"sandbox {sandbox_id!r} not found", sandbox_id=sandbox_id)
        return actor

    def live_ids(self) -> set[str]:
        live = {sid for sid, a in self.sandboxes.items() if a.alive or not a.finished.is_set()}
        pooled = self.pool.ids() if self.pool is not None else set()
        return live | self._booting | pooled

    async def start_pool(self) -> None:
        """Start filling the warm pool (after take-over and the first reap, so that adopted
        sandboxes are counted first)."""
        assert self._nursery is not None, "router not running"
        if self.config.warm_pool and any(c.size for c in self.config.warm_pool):
            self.pool = await self._nursery.start(WarmPool(self).run)

    # ------------------------------------------------------------------ drain (SIGTERM)

    def refuse_if_draining(self, resource: str) -> None:
        if self.draining:
            self.metrics.refused("shutting_down", resource)
            raise AtCapacity("the gateway is shutting down", retry_after=5, shutting_down=True)

    async def wait_execs(self) -> None:
        """Return once no exec runs in any sandbox (callers bound the time; new execs are
        refused while draining, so this ends)."""
        while True:
            running = [
                rec for a in self.sandboxes.values() for rec in a.execs.values() if rec.running
            ]
            if not running:
                return
            await running[0].done.wait()

    async def destroy_all(self) -> None:
        """Tear every sandbox down, in parallel (each teardown is shielded)."""
        async with trio.open_nursery() as nursery:
            for actor in list(self.sandboxes.values()):
                if actor.alive:
                    nursery.start_soon(self._destroy_logged, actor)

    async def _destroy_logged(self, actor: SandboxActor) -> None:
        try:
            await actor.destroy()
        except Exception:
            # One failed teardown must not stop the others; the reaper frees what it left.
            log.exception("could not destroy %s while draining", actor.id)

    def detach_all(self) -> None:
        """Let every actor end without tearing its sandbox down (``on_shutdown = "keep"``)."""
        for actor in self.sandboxes.values():
            actor.detach()

    # ------------------------------------------------------------------ create / resume

    def _admit(self, sandbox_id: str, memory: int, *, evict: bool = True) -> None:
        """Reserve room for one sandbox, or raise AtCapacity. Idle warm pool sandboxes give
        way (``evict``): they are destroyed to make the room when that is enough."""
        if evict and self.pool is not None and not self._room_for(1, memory):
            self.pool.evict_for(1, memory)
        if len(self._reservations) >= self.config.max_sandboxes:
            self.metrics.refused("at_capacity", "sandbox")
            raise AtCapacity(
                f"the gateway already runs {len(self._reservations)} sandboxes (max_sandboxes)",
                retry_after=1,
            )
        if self._reserved_memory + memory > self.config.memory_budget:
            self.metrics.refused("at_capacity", "sandbox")
            raise AtCapacity(
                "the gateway's memory budget is fully reserved", retry_after=1,
                reserved=self._reserved_memory, budget=self.config.memory_budget,
            )  # fmt: skip
        self._reservations[sandbox_id] = memory
        self._reserved_memory += memory

    def _room_for(self, count: int, memory: int) -> bool:
        return (
            len(self._reservations) + count <= self.config.max_sandboxes
            and self._reserved_memory + memory <= self.config.memory_budget
        )

    def _resize(self, sandbox_id: str, memory: int) -> None:
        """Change an admitted sandbox's reservation (a pool sandbox claimed with another
        memory limit); AtCapacity when the budget cannot take the difference."""
        delta = memory - self._reservations[sandbox_id]
        if delta > 0 and self._reserved_memory + delta > self.config.memory_budget:
            if self.pool is not None:
                self.pool.evict_for(0, delta)
            if self._reserved_memory + delta > self.config.memory_budget:
                self.metrics.refused("at_capacity", "sandbox")
                raise AtCapacity(
                    "the gateway's memory budget is fully reserved", retry_after=1,
                    reserved=self._reserved_memory, budget=self.config.memory_budget,
                )  # fmt: skip
        self._reservations[sandbox_id] = memory
        self._reserved_memory += delta

    def _release(self, sandbox_id: str) -> None:
        """Give a sandbox's reservation back (idempotent: an evicted pool sandbox gave it back
        when it was evicted, before its teardown ended)."""
        self._reserved_memory -= self._reservations.pop(sandbox_id, 0)

    def _choose(self, level: IsolationLevel, preference: RuntimeName | None) -> Selected:
        choice = select_runtime(level, preference, self.registry.unavailable())
        if isinstance(choice, NoRuntime):
            self.metrics.refused("runtime_unavailable", "sandbox")
            raise RuntimeUnavailable(
                f"no available runtime supports isolation level {level!r}",
                isolation_level=level,
                candidates=dict(choice.candidates),
            )
        return choice

    async def create(self, req: RunRequest, tenant: Tenant | None = None) -> Created:
        with self.quotas.exec_slot(tenant, self.sandboxes.values()):
            return await self._create(req, tenant)

    async def _create(self, req: RunRequest, tenant: Tenant | None) -> Created:
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
            tenant=tenant.name if tenant is not None else DEFAULT_TENANT,
        )
        public = _public_params(req)
        self.refuse_if_draining("sandbox")
        claimed = self.pool.claim(params, tenant) if self.pool is not None else None
        if claimed is not None:
            actor = claimed
            try:
                # Recorded only now that it is the tenant's (an unclaimed one has no record).
                await self._record_sandbox(actor.params, public)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await actor.destroy()
                raise
        else:
            actor = await self._spawn(params, None, tenant, public)
        try:
            record = await actor.exec(plan)
            if claimed is not None and self.pool is not None:
                self.pool.refill_after(actor, record.done)
            await self._record_exec(actor, record)
        except BaseException:
            # A create that fails after boot (a file that cannot be written) leaves nothing.
            with trio.CancelScope(shield=True):
                await actor.destroy()
            raise
        finally:
            actor.release_hold()
        return Created(actor, record.exec_id)

    async def resume(
        self, snapshot_id: str, keep_alive: int, tenant: Tenant | None = None
    ) -> SandboxActor:
        if keep_alive > self.config.max_keep_alive_s:
            raise InvalidRequest(
                f"keep_alive is above the maximum {self.config.max_keep_alive_s}",
                field="keep_alive",
            )
        tenant_name = tenant.name if tenant is not None else DEFAULT_TENANT
        meta = await self.catalog.load(snapshot_id, tenant_name)
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
            tenant=tenant_name,
        )
        public = {
            "isolation_level": meta.isolation_level,
            "cpu_limit": meta.cpu_limit,
            "memory_limit": meta.memory_limit,
            "timeout": meta.timeout,
            "keep_alive": keep_alive,
            "restored_from": snapshot_id,
            "mounts": [
                {"source": str(m.source), "destination": m.destination, "read_only": m.read_only}
                for m in mounts
            ],
        }
        actor = await self._spawn(params, self.catalog.path(snapshot_id), tenant, public)
        actor.release_hold()
        return actor

    async def take_over(self, record: SandboxRecord) -> SandboxActor:
        """Adopt a sandbox a previous gateway left running (crash or ``on_shutdown = "keep"``):
        its actor is rebuilt from the stored record and checkpoint, and reattaches to the
        runtime. Raises if the sandbox cannot be taken over (the caller marks it failed)."""
        assert self._nursery is not None, "router not running"
        p = record.params
        mounts: list[MountSpec] = []
        for m in p.get("mounts") or []:
            # Already checked when it was created; kept as it was even if the allow-list changed
            # since (the sandbox has it mounted either way).
            mounts.append(
                MountSpec(
                    source=Path(m["source"]), destination=m["destination"], read_only=m["read_only"]
                )
            )
        spec = SandboxSpec(
            sandbox_id=record.id,
            rootfs=self.rootfs,
            cpu_limit=float(p["cpu_limit"]),
            memory_limit=int(p["memory_limit"]),
            pids_limit=self.config.pids_limit,
            mounts=tuple(mounts),
        )
        params = SandboxParams(
            sandbox_id=record.id,
            runtime_name=record.runtime,  # type: ignore[arg-type]
            isolation_level=p["isolation_level"],
            selection=p.get("selection", "preference"),
            spec=spec,
            image=p.get("image", self.config.image),
            timeout_ms=int(p["timeout"]),
            keep_alive_s=int(p["keep_alive"]),
            restored_from=p.get("restored_from"),
            tenant=record.tenant,
        )
        runtime = self.registry.driver(params.runtime_name)
        execs = await self.store.list_execs(record.id) if self.store is not None else []
        output: dict[str, tuple[bytes, bytes]] = {}
        if self.store is not None:
            for row in execs:
                if row.state == "running":
                    output[row.id] = await self.store.call(self.store.sync.exec_output, row.id)
        memory = spec.memory_limit
        # Admission as for a new sandbox, minus the refusals: it exists and must be counted.
        host = runtime.host_memory(spec)
        self._reservations[record.id] = host
        self._reserved_memory += host
        self.quotas.take_over(params.tenant, memory)
        actor = SandboxActor(
            params,
            runtime,
            self.config,
            self.catalog,
            metrics=self.metrics,
            recorder=self.recorder,
        )
        self._booting.add(actor.id)
        try:
            await self._nursery.start(
                functools.partial(
                    self._supervise, actor, None, recovered=Recovered(record, execs, output)
                )
            )
        finally:
            self._booting.discard(actor.id)
        self.sandboxes[actor.id] = actor
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

    async def _spawn(
        self,
        params: SandboxParams,
        restore_image: Path | None,
        tenant: Tenant | None = None,
        public: dict[str, Any] | None = None,
    ) -> SandboxActor:
        assert self._nursery is not None, "router not running"
        runtime = self.registry.driver(params.runtime_name)
        memory = params.spec.memory_limit
        self.refuse_if_draining("sandbox")
        try:
            self.quotas.admit_sandbox(
                tenant or Tenant(name=params.tenant, quotas=Quotas()),
                memory,
                self.sandboxes.values(),
            )
        except QuotaExceeded:
            self.metrics.refused("quota_exceeded", "sandbox")
            raise
        try:
            # The host's side counts what the runtime adds (a VMM's own memory); the tenant's
            # quota counts what the tenant asked for.
            self._admit(params.sandbox_id, runtime.host_memory(params.spec))
        except BaseException:
            self.quotas.release_sandbox(params.tenant, memory)
            raise
        try:
            await self._record_sandbox(params, public or {})
        except BaseException:
            self._release(params.sandbox_id)
            self.quotas.release_sandbox(params.tenant, memory)
            raise
        actor = SandboxActor(
            params,
            runtime,
            self.config,
            self.catalog,
            on_startup=lambda ms: self.registry.record_startup(params.runtime_name, ms),
            metrics=self.metrics,
            recorder=self.recorder,
        )
        # _supervise gives the admission back whenever the actor ends, boot failure included.
        self._booting.add(actor.id)
        source = "image" if restore_image is None else "snapshot"
        try:
            with self.metrics.creating(params.runtime_name, source):
                await self._nursery.start(self._supervise, actor, restore_image)
        finally:
            self._booting.discard(actor.id)
        self.sandboxes[actor.id] = actor
        self._trim_history()
        return actor

    async def _supervise(
        self,
        actor: SandboxActor,
        restore_image: Path | None,
        *,
        recovered: Recovered | None = None,
        task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await actor.run(restore_image, recovered=recovered, task_status=task_status)
        finally:
            self._release(actor.id)
            # Read at the end: a claimed pool sandbox's parameters are its claimer's.
            if actor.params.tenant != POOL_TENANT:  # never counted against a tenant
                self.quotas.release_sandbox(actor.params.tenant, actor.params.spec.memory_limit)
                if not actor.alive:  # (a detached actor has not ended: its sandbox runs on)
                    self.metrics.sandbox_ended(actor.state, actor.params.runtime_name)
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
        self,
        sandbox_id: str,
        req: ExecRequest,
        *,
        interactive: bool = False,
        tenant: Tenant | None = None,
    ) -> tuple[SandboxActor, str]:
        """Start an exec. ``interactive`` keeps its stdin open (stream clients feed it)."""
        actor = self.get(sandbox_id, tenant.name if tenant is not None else None)
        self.refuse_if_draining("exec")
        check_exec(req, self.config)
        plan = self.plan(req, req.timeout or actor.params.timeout_ms, interactive=interactive)
        try:
            with self.quotas.exec_slot(tenant, self.sandboxes.values()):
                record = await actor.exec(plan)
        except QuotaExceeded:
            self.metrics.refused("quota_exceeded", "exec")
            raise
        await self._record_exec(actor, record)
        return actor, record.exec_id

    # ------------------------------------------------------------------ durable records

    async def _record_sandbox(self, params: SandboxParams, public: dict[str, Any]) -> None:
        if self.store is None:
            return
        record = SandboxRecord(
            id=params.sandbox_id,
            tenant=params.tenant,
            runtime=params.runtime_name,
            state="creating",
            params={**public, "selection": params.selection, "image": params.image},
            created_at=time.time(),
        )
        await self.store.put_sandbox(record)

    async def _record_exec(self, actor: SandboxActor, record: ExecTracker) -> None:
        if self.store is None or actor.exec_recorded(record):
            return  # (written by the checkpoint before the agent heard of it: one trip less)
        row = ExecRecordRow(
            id=record.exec_id,
            sandbox_id=actor.id,
            tenant=actor.params.tenant,
            state="running",
            started_at=record.started_at,
        )
        await self.store.put_exec(row)


def _public_params(req: RunRequest) -> dict[str, Any]:
    """What the store keeps of a run request: limits and choices, never environment values,
    code, stdin, command arguments or file contents (only the names)."""
    return {
        "isolation_level": req.isolation_level,
        "runtime_preference": req.runtime_preference,
        "language": req.language,
        "cpu_limit": req.cpu_limit,
        "memory_limit": req.memory_limit,
        "timeout": req.timeout,
        "keep_alive": req.keep_alive,
        "environment_names": sorted(req.environment),
        "files": sorted(req.files),
        "mounts": [
            {"source": m.source, "destination": m.destination, "read_only": m.read_only}
            for m in req.mounts
        ],
    }
