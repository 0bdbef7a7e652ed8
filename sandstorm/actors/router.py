"""The router actor: the table of sandboxes (live ones, and a bounded history of ended ones) and
the entry points of every request that creates a sandbox or an exec.

A request is planned first (``planning``: checks, runtime choice, parameters), then admitted
(``admission`` for the gateway, ``quotas`` for its tenant), then its sandbox actor is spawned
under the router's nursery and supervised until it ends, when what it reserved is given back.
The warm pool (``pool``) boots its sandboxes through the same supervision.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from sandstorm.actors.admission import Admission
from sandstorm.actors.planning import Planner
from sandstorm.actors.pool import WarmPool
from sandstorm.actors.quotas import TenantLedger
from sandstorm.actors.recorder import Recorder
from sandstorm.actors.sandbox import (
    ExecPlan,
    Recovered,
    SandboxActor,
    SandboxParams,
    StoredParams,
    load_recovered,
)
from sandstorm.actors.tenancy import DEFAULT_TENANT, POOL_TENANT
from sandstorm.api.types import ExecRequest, RunRequest
from sandstorm.api.validation import check_exec
from sandstorm.config import Config, WarmPoolClass
from sandstorm.errors import AtCapacity, InvalidRequest, NotFound, QuotaExceeded
from sandstorm.ids import is_id
from sandstorm.metrics import Metrics
from sandstorm.runtimes.base import SandboxRuntime
from sandstorm.runtimes.registry import RuntimeRegistry
from sandstorm.store import AsyncStore, Quotas, SandboxRecord, Store, Tenant
from sandstorm.store.snapshots import SnapshotCatalog, SnapshotCorrupt

log = logging.getLogger(__name__)
# Ended sandboxes stay answerable (status, results, a late stream's replay) until one of these
# bounds evicts the oldest; after that their id is unknown (404).
MAX_ENDED = 10_000
ENDED_RETAINED_BYTES = 256 * 1024 * 1024
ENDED_RETENTION_S = 3600.0


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
        # Durable records (None in tests of the actors alone): a create's sandbox is written
        # before it is answered (its first exec by its actor), later changes through the
        # recorder.
        self.store = store
        self.recorder = recorder
        self.quotas = TenantLedger()
        self.metrics = metrics or Metrics(process=False)
        self.admission = Admission(config, self.metrics)
        self.planner = Planner(config, rootfs, languages, self.metrics, registry.select)
        # Set by the gateway's drain (SIGTERM): new sandboxes and execs are refused.
        self.draining = False
        self.registry = registry
        self.catalog = catalog
        self.sandboxes: OrderedDict[str, SandboxActor] = OrderedDict()
        # The warm pool (None: every create boots a sandbox); see start_pool().
        self.pool: WarmPool | None = None
        self._nursery: trio.Nursery | None = None
        self.open_streams = 0
        # Ids of every actor under supervision, booting ones (not in the table yet) and the
        # warm pool's included: the reaper must not touch them.
        self._supervised: set[str] = set()

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
        return live | self._supervised

    async def start_pool(self) -> None:
        """Start filling the warm pool (after take-over and the first reap, so that adopted
        sandboxes are counted first)."""
        assert self._nursery is not None, "router not running"
        if self.config.warm_pool and any(c.size for c in self.config.warm_pool):
            pool = WarmPool(self, self.admission, self.config, self.metrics)
            self.pool = await self._nursery.start(pool.run)
            self.admission.make_room = pool.evict_for

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

    async def create(self, req: RunRequest, tenant: Tenant | None = None) -> Created:
        with self.quotas.exec_slot(tenant, self.sandboxes.values()):
            return await self._create(req, tenant)

    async def _create(self, req: RunRequest, tenant: Tenant | None) -> Created:
        planned = self.planner.run(req, tenant.name if tenant is not None else DEFAULT_TENANT)
        self.refuse_if_draining("sandbox")
        claimed = self.pool.claim(planned.params, tenant) if self.pool is not None else None
        if claimed is None:
            # A create that fails after boot (a file that cannot be written) leaves nothing:
            # the actor tears its sandbox down before it raises.
            actor = await self._spawn(
                planned.params, None, tenant, planned.stored, first_exec=planned.first_exec
            )
            assert actor.first_exec is not None
            return Created(actor, actor.first_exec.exec_id)
        try:
            # Recorded only now that it is the tenant's (an unclaimed one has no record).
            await self._record_sandbox(claimed.params, planned.stored)
        except BaseException:
            with trio.CancelScope(shield=True):
                await claimed.destroy()
            raise
        tracker = await claimed.start_first_exec(planned.first_exec)
        if self.pool is not None:
            self.pool.refill_after(claimed, tracker.done)
        return Created(claimed, tracker.exec_id)

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
        params, stored = self.planner.resume(meta, keep_alive, tenant_name)
        actor = await self._spawn(params, self.catalog.path(snapshot_id), tenant, stored)
        actor.release_hold()
        return actor

    async def take_over(self, record: SandboxRecord) -> SandboxActor:
        """Adopt a sandbox a previous gateway left running (crash or ``on_shutdown = "keep"``):
        its actor is rebuilt from the stored record and progress record, and reattaches to the
        runtime. Raises if the sandbox cannot be taken over (the caller marks it failed)."""
        assert self._nursery is not None, "router not running"
        params = self.planner.taken_over(record)
        runtime = self.registry.driver(params.runtime_name)
        recovered = await load_recovered(self.store, record)
        # Admission as for a new sandbox, minus the refusals: it exists and must be counted.
        self.admission.take_over(record.id, runtime.host_memory(params.spec))
        self.quotas.take_over(params.tenant, params.spec.memory_limit)
        actor = self._actor(params, runtime, self.recorder)
        await self._nursery.start(
            functools.partial(self._supervise, actor, None, recovered=recovered)
        )
        self.sandboxes[actor.id] = actor
        return actor

    async def _spawn(
        self,
        params: SandboxParams,
        restore_image: Path | None,
        tenant: Tenant | None,
        stored: StoredParams,
        *,
        first_exec: ExecPlan | None = None,
    ) -> SandboxActor:
        assert self._nursery is not None, "router not running"
        runtime = self.registry.driver(params.runtime_name)
        self.refuse_if_draining("sandbox")
        self.admit_tenant(tenant, params)
        try:
            # The host's side counts what the runtime adds (a VMM's own memory); the tenant's
            # quota counts what the tenant asked for.
            self.admission.admit(params.sandbox_id, runtime.host_memory(params.spec))
        except BaseException:
            self.release_tenant(params)
            raise
        try:
            await self._record_sandbox(params, stored)
        except BaseException:
            self.admission.release(params.sandbox_id)
            self.release_tenant(params)
            raise
        actor = self._actor(params, runtime, self.recorder)
        # _supervise gives the admission back whenever the actor ends, boot failure included.
        try:
            await self._nursery.start(
                functools.partial(
                    self._supervise, actor, restore_image, first_exec=first_exec, count_boot=True
                )
            )
        except BaseException:
            if actor.booted:  # and torn down again: its history is kept like any other's
                self.sandboxes[actor.id] = actor
                self._trim_history()
            raise
        self.sandboxes[actor.id] = actor
        self._trim_history()
        return actor

    def _actor(
        self, params: SandboxParams, runtime: SandboxRuntime, recorder: Recorder | None
    ) -> SandboxActor:
        return SandboxActor(
            params,
            runtime,
            self.config,
            self.catalog,
            on_startup=lambda ms: self.registry.record_startup(params.runtime_name, ms),
            metrics=self.metrics,
            recorder=recorder,
        )

    async def _supervise(
        self,
        actor: SandboxActor,
        restore_image: Path | None,
        *,
        first_exec: ExecPlan | None = None,
        recovered: Recovered | None = None,
        count_boot: bool = False,
        on_end: Callable[[SandboxActor], None] | None = None,
        task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._supervised.add(actor.id)
        try:
            await actor.run(
                restore_image,
                first_exec=first_exec,
                recovered=recovered,
                count_boot=count_boot,
                task_status=task_status,
            )
        finally:
            self._supervised.discard(actor.id)
            self.admission.release(actor.id)
            # Read at the end: a claimed pool sandbox's parameters are its claimer's.
            if actor.params.tenant != POOL_TENANT:  # never counted against a tenant
                self.release_tenant(actor.params)
                if not actor.alive:  # (a detached actor has not ended: its sandbox runs on)
                    self.metrics.sandbox_ended(actor.state, actor.params.runtime_name)
            self._trim_history()
            if on_end is not None:
                on_end(actor)

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

    # ------------------------------------------------------------------ for the warm pool

    async def boot_pooled(
        self, cls: WarmPoolClass, image: str, on_end: Callable[[SandboxActor], None]
    ) -> SandboxActor:
        assert self._nursery is not None, "router not running"
        params = self.planner.pooled(cls, image)
        runtime = self.registry.driver(params.runtime_name)
        # Never at the expense of another pool sandbox, nor of a request (it would evict us).
        self.admission.admit(params.sandbox_id, runtime.host_memory(params.spec), evict=False)
        actor = self._actor(params, runtime, None)  # recorded only once claimed
        await self._nursery.start(functools.partial(self._supervise, actor, None, on_end=on_end))
        return actor

    def admit_tenant(self, tenant: Tenant | None, params: SandboxParams) -> None:
        try:
            self.quotas.admit_sandbox(
                tenant or Tenant(name=params.tenant, quotas=Quotas()),
                params.spec.memory_limit,
                self.sandboxes.values(),
            )
        except QuotaExceeded:
            self.metrics.refused("quota_exceeded", "sandbox")
            raise

    def release_tenant(self, params: SandboxParams) -> None:
        self.quotas.release_sandbox(params.tenant, params.spec.memory_limit)

    def adopt(self, actor: SandboxActor, params: SandboxParams) -> None:
        actor.adopt(params, self.recorder)
        self.sandboxes[actor.id] = actor

    # ------------------------------------------------------------------ execs

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
        check_exec(req, max_timeout_ms=self.config.max_timeout_ms)
        plan = self.planner.exec(
            req, req.timeout or actor.params.timeout_ms, interactive=interactive
        )
        try:
            with self.quotas.exec_slot(tenant, self.sandboxes.values()):
                tracker = await actor.exec(plan)
        except QuotaExceeded:
            self.metrics.refused("quota_exceeded", "exec")
            raise
        return actor, tracker.exec_id

    # ------------------------------------------------------------------ durable records

    async def _record_sandbox(self, params: SandboxParams, stored: StoredParams) -> None:
        if self.store is None:
            return
        record = SandboxRecord(
            id=params.sandbox_id,
            tenant=params.tenant,
            runtime=params.runtime_name,
            state="creating",
            params=stored.to_record(),
            created_at=time.time(),
        )
        await self.store.call(Store.put_sandbox, record)
