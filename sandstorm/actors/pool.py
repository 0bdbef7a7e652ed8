"""The warm pool: sandboxes booted ahead of demand, so that a run skips the boot.

One class per ``[[warm_pool]]`` entry (runtime, image, limits, size). Each pool sandbox is an
ordinary sandbox actor under the router, admitted like any other (it counts against
``max_sandboxes`` and ``memory_budget``) but owned by no tenant: it has no store record, is not
in the router's table (so no listing, lookup or tenant quota sees it), and a gateway that stops
destroys it (after a crash the reaper does: nothing records it). A run whose runtime and image
match a class takes one (:meth:`WarmPool.claim`, synchronous, so two requests can never take
the same); its limits are set on claim when they differ and that is safe, otherwise the run
boots a sandbox of its own. A claimed sandbox is the claimer's for good and is destroyed after
use like any other: it never goes back. Each claim wakes its class's filler, which boots a
replacement in the background, one at a time per class.

The pool gives way: a request that needs admission room destroys idle pool sandboxes
(:meth:`WarmPool.evict_for`), and when the host's MemAvailable falls below
``warm_pool_min_available`` the pool empties itself and does not refill until memory is back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

from sandstorm.actors.sandbox import SandboxActor, SandboxParams
from sandstorm.config import WarmPoolClass
from sandstorm.errors import AtCapacity, QuotaExceeded
from sandstorm.ids import new_id
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.store import Quotas, Tenant

if TYPE_CHECKING:
    from sandstorm.actors.router import Router

log = logging.getLogger(__name__)
# Not a valid tenant name (tenancy.TENANT_RE), so it can never be a caller's.
POOL_TENANT = "(pool)"
# A claim may lower the memory limit only this far above what the sandbox already holds.
LOWER_HEADROOM_BYTES = 16 << 20
# How often the fillers look again at memory and admission room while they cannot boot.
CHECK_INTERVAL_S = 1.0
# Refill only once MemAvailable is this far above the threshold, so the pool does not boot and
# evict in turn around it.
REFILL_MARGIN_BYTES = 256 << 20
FAILURE_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# A claim's replacement boots once the claiming run's first exec is over (a boot is hundreds of
# ms of CPU: on a small host it would slow the very run the pool is serving), or after this.
REFILL_DEFER_MAX_S = 1.0
# ... and a moment more, for the run's answer to go out before the boot takes the CPU.
REFILL_AFTER_EXEC_S = 0.01
MEMINFO = Path("/proc/meminfo")


@runtime_checkable
class LimitAdjuster(Protocol):
    """A runtime that can change a live sandbox's limits (gVisor: its host cgroup)."""

    def adjust_limits(self, old: SandboxSpec, new: SandboxSpec) -> None: ...


@dataclass
class _Class:
    config: WarmPoolClass
    image: str
    ready: list[SandboxActor] = field(default_factory=list)  # oldest first
    booting: int = 0
    # Claims whose replacement waits until the claimed sandbox's first exec is over.
    deferred: int = 0
    wake: trio.Event = field(default_factory=trio.Event)


def mem_available(path: Path = MEMINFO) -> int | None:
    """The host's MemAvailable in bytes (None if unknown). /proc never blocks on disk."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class WarmPool:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.config = router.config
        self.classes = [_Class(c, router.config.image) for c in router.config.warm_pool]
        # Every unclaimed pool actor until it has ended (ready, or evicted and going down).
        self._actors: dict[str, SandboxActor] = {}
        # Claimed sandboxes whose class's refill is deferred (see refill_after).
        self._deferred: dict[str, _Class] = {}
        self._nursery: trio.Nursery | None = None
        self.min_available = router.config.warm_pool_min_available
        router.metrics.watch_pool(self.gauges)

    # ------------------------------------------------------------------ observation

    def ids(self) -> set[str]:
        """Ids of every pool sandbox not yet ended (the reaper must leave them alone)."""
        return set(self._actors)

    def gauges(self) -> Iterable[tuple[str, str, int]]:
        """(runtime, state, count) for the ``sandstorm_pool_sandboxes`` gauge."""
        for cls in self.classes:
            yield cls.config.runtime, "ready", len(cls.ready)
            yield cls.config.runtime, "booting", cls.booting

    def ready_count(self) -> int:
        return sum(len(c.ready) for c in self.classes)

    # ------------------------------------------------------------------ the fillers

    async def run(
        self, *, task_status: trio.TaskStatus[WarmPool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for cls in self.classes:
                if cls.config.size > 0:
                    nursery.start_soon(self._fill, cls)
            nursery.start_soon(self._watch_memory)
            task_status.started(self)

    def _memory_low(self, margin: int = 0) -> bool:
        available = mem_available()
        return available is not None and available < self.min_available + margin

    def _wants(self, cls: _Class) -> bool:
        return (
            len(cls.ready) + cls.booting + cls.deferred < cls.config.size
            and not self.router.draining
            and not self._memory_low(REFILL_MARGIN_BYTES)
        )

    async def _fill(self, cls: _Class) -> None:
        failures = 0
        while True:
            while not self._wants(cls):
                cls.wake = trio.Event()
                with trio.move_on_after(CHECK_INTERVAL_S):
                    await cls.wake.wait()
            try:
                await self._boot(cls)
                failures = 0
            except AtCapacity:
                # No room now; requests have it first. Look again when a sandbox ends (or in
                # a while): a fresh event, so an old wake-up cannot make this spin.
                cls.wake = trio.Event()
                with trio.move_on_after(CHECK_INTERVAL_S):
                    await cls.wake.wait()
            except Exception as exc:
                delay = FAILURE_BACKOFF_S[min(failures, len(FAILURE_BACKOFF_S) - 1)]
                failures += 1
                self.router.metrics.pool_event(cls.config.runtime, "failed")
                log.warning("warm pool: a sandbox failed to boot (%s); next try in %.0fs",
                            exc, delay)  # fmt: skip
                await trio.sleep(delay)

    async def _boot(self, cls: _Class) -> None:
        router = self.router
        assert router._nursery is not None
        c = cls.config
        sandbox_id = new_id("sbx")
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            rootfs=router.rootfs,
            cpu_limit=c.cpu_limit,
            memory_limit=c.memory_limit,
            pids_limit=self.config.pids_limit,
        )
        params = SandboxParams(
            sandbox_id=sandbox_id,
            runtime_name=c.runtime,
            isolation_level="standard",
            selection="default",
            spec=spec,
            image=cls.image,
            timeout_ms=30_000,
            keep_alive_s=self.config.max_keep_alive_s,
            tenant=POOL_TENANT,
        )
        runtime = router.registry.driver(c.runtime)
        # Never at the expense of another pool sandbox, nor of a request (it would evict us).
        router._admit(sandbox_id, runtime.host_memory(spec), evict=False)
        actor = SandboxActor(
            params,
            runtime,
            self.config,
            router.catalog,
            on_startup=lambda ms: router.registry.record_startup(c.runtime, ms),
            metrics=router.metrics,
            recorder=None,  # recorded only once claimed
        )
        self._actors[sandbox_id] = actor
        cls.booting += 1
        try:
            await router._nursery.start(self._supervise, actor, cls)
        except BaseException:
            self._actors.pop(sandbox_id, None)
            raise
        finally:
            cls.booting -= 1
        cls.ready.append(actor)
        router.metrics.pool_event(c.runtime, "booted")

    async def _supervise(
        self,
        actor: SandboxActor,
        cls: _Class,
        *,
        task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The router's supervision (admission given back at the end), plus the pool's
        bookkeeping when an unclaimed sandbox ends (evicted, failed, shutdown)."""
        try:
            await self.router._supervise(actor, None, task_status=task_status)
        finally:
            self._actors.pop(actor.id, None)
            if actor in cls.ready:
                cls.ready.remove(actor)
            self._undefer(actor.id)
            cls.wake.set()

    async def _watch_memory(self) -> None:
        while True:
            await trio.sleep(CHECK_INTERVAL_S)
            if self._memory_low() and self.ready_count():
                log.warning("warm pool: host memory is low; destroying idle pool sandboxes")
                self._evict(self.ready_count(), "memory")

    # ------------------------------------------------------------------ claim and evict

    def claim(self, params: SandboxParams, tenant: Tenant | None) -> SandboxActor | None:
        """Hand a ready pool sandbox to this request, adopted with ``params`` (its own id
        kept), or None when none fits (the caller boots one). Synchronous: no other request
        can take it meanwhile. Raises QuotaExceeded (the tenant's quota) or AtCapacity (a
        larger memory limit the budget cannot take); the sandbox then stays in the pool."""
        spec = params.spec
        # Mounts are made at boot, and a pool sandbox has none.
        cls, actor = (None, None) if spec.mounts else self._take(params)
        if cls is None or actor is None:
            self.router.metrics.pool_event(params.runtime_name, "miss")
            return None
        router = self.router
        claimed_spec = dataclasses.replace(spec, sandbox_id=actor.id)
        claimed = dataclasses.replace(params, sandbox_id=actor.id, spec=claimed_spec)
        old = actor.params.spec
        adjust = (old.memory_limit, old.cpu_limit) != (spec.memory_limit, spec.cpu_limit)
        if adjust and not self._can_adjust(actor, old, claimed_spec):
            cls.ready.insert(0, actor)
            router.metrics.pool_event(params.runtime_name, "miss")
            return None
        try:
            router.quotas.admit_sandbox(
                tenant or Tenant(name=params.tenant, quotas=Quotas()),
                spec.memory_limit,
                router.sandboxes.values(),
            )
        except QuotaExceeded:
            cls.ready.insert(0, actor)
            router.metrics.refused("quota_exceeded", "sandbox")
            raise
        try:
            router._resize(actor.id, actor.runtime.host_memory(claimed_spec))
        except AtCapacity:
            router.quotas.release_sandbox(params.tenant, spec.memory_limit)
            cls.ready.insert(0, actor)
            raise
        if adjust:
            try:
                runtime = actor.runtime
                assert isinstance(runtime, LimitAdjuster)
                runtime.adjust_limits(old, claimed_spec)
            except OSError as exc:
                # The kernel refused: this sandbox's limits are in doubt, so it serves nobody.
                log.warning("warm pool: could not set limits on claim (%s)", exc)
                router.quotas.release_sandbox(params.tenant, spec.memory_limit)
                self._discard(actor, "failed")  # (gives its whole reservation back)
                return None
        # From here it is the tenant's: its parameters, its quota, the router's table.
        self._actors.pop(actor.id, None)
        actor.adopt(claimed, router.recorder)
        router.sandboxes[actor.id] = actor
        router.metrics.pool_event(params.runtime_name, "adjusted" if adjust else "claimed")
        cls.deferred += 1
        self._deferred[actor.id] = cls
        assert self._nursery is not None
        self._nursery.start_soon(self._undefer_later, actor.id)
        return actor

    def refill_after(self, actor: SandboxActor, done: trio.Event) -> None:
        """The claimed ``actor``'s first exec ends when ``done`` is set: its replacement boots
        then (at the latest :data:`REFILL_DEFER_MAX_S` after the claim)."""
        assert self._nursery is not None
        if actor.id in self._deferred:
            self._nursery.start_soon(self._undefer_when, actor.id, done)

    async def _undefer_when(self, sandbox_id: str, done: trio.Event) -> None:
        with trio.move_on_after(REFILL_DEFER_MAX_S):
            await done.wait()
            await trio.sleep(REFILL_AFTER_EXEC_S)
        self._undefer(sandbox_id)

    async def _undefer_later(self, sandbox_id: str) -> None:
        await trio.sleep(REFILL_DEFER_MAX_S)
        self._undefer(sandbox_id)

    def _undefer(self, sandbox_id: str) -> None:
        cls = self._deferred.pop(sandbox_id, None)
        if cls is not None:
            cls.deferred -= 1
            cls.wake.set()

    def _take(self, params: SandboxParams) -> tuple[_Class | None, SandboxActor | None]:
        """Take the oldest ready sandbox of a matching class, one with the same limits first."""
        spec = params.spec
        fits = [
            c
            for c in self.classes
            if c.config.runtime == params.runtime_name and c.image == params.image
        ]
        fits.sort(
            key=lambda c: (c.config.memory_limit, c.config.cpu_limit)
            != (spec.memory_limit, spec.cpu_limit)
        )
        for cls in fits:
            while cls.ready:
                actor = cls.ready.pop(0)
                if actor.state == "idle" and actor.alive:
                    return cls, actor
                # Failed or going down: its supervision removes it from _actors.
        return None, None

    def _can_adjust(self, actor: SandboxActor, old: SandboxSpec, new: SandboxSpec) -> bool:
        if not isinstance(actor.runtime, LimitAdjuster):
            return False
        if new.memory_limit >= old.memory_limit:
            return True
        # Lowering below what the sandbox holds would make the kernel reclaim or OOM-kill it.
        try:
            held = actor.runtime.usage(actor.id).memory_bytes
        except OSError:
            return False  # its cgroup cannot be read: do not touch it, the run boots its own
        return new.memory_limit >= held + LOWER_HEADROOM_BYTES

    def evict_for(self, count: int, memory: int) -> None:
        """Destroy idle pool sandboxes until the router has room for ``count`` more sandboxes
        and ``memory`` more bytes, if destroying them all would give that room; their
        admission is given back at once (their teardown goes on in the background)."""
        router = self.router
        victims = self._victims()
        over_count = len(router._reservations) + count - self.config.max_sandboxes
        over_memory = router._reserved_memory + memory - self.config.memory_budget
        if over_count > len(victims) or over_memory > sum(_memory(a) for a in victims):
            return
        chosen: list[SandboxActor] = []
        for actor in victims:
            if len(chosen) >= over_count and sum(map(_memory, chosen)) >= over_memory:
                break
            chosen.append(actor)
        for actor in chosen:
            log.info("warm pool: destroying idle %s to admit a request", actor.id)
            self._discard(actor, "evicted")

    def _evict(self, count: int, why: str) -> None:
        for actor in self._victims()[:count]:
            log.info("warm pool: destroying idle %s (%s)", actor.id, why)
            self._discard(actor, "evicted")

    def _victims(self) -> list[SandboxActor]:
        """Ready pool sandboxes in eviction order: the newest first (the oldest are the next
        to be claimed)."""
        return [a for cls in self.classes for a in reversed(cls.ready)]

    def _discard(self, actor: SandboxActor, event: str) -> None:
        for cls in self.classes:
            if actor in cls.ready:
                cls.ready.remove(actor)
        self.router._release(actor.id)
        self.router.metrics.pool_event(actor.params.runtime_name, event)
        assert self._nursery is not None
        self._nursery.start_soon(self._destroy, actor)

    async def _destroy(self, actor: SandboxActor) -> None:
        with trio.CancelScope(shield=True):
            try:
                await actor.destroy()
            except Exception:
                log.exception("warm pool: could not destroy %s; the reaper will", actor.id)


def _memory(actor: SandboxActor) -> int:
    return actor.params.spec.memory_limit
