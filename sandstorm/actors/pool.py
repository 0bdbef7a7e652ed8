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

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from sandstorm.actors.admission import Admission
from sandstorm.actors.sandbox import SandboxActor, SandboxParams
from sandstorm.config import Config, WarmPoolClass
from sandstorm.errors import AtCapacity, QuotaExceeded
from sandstorm.metrics import Metrics
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.store import Tenant

log = logging.getLogger(__name__)
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


class PoolOwner(Protocol):
    """What the warm pool needs of the router it fills for."""

    @property
    def draining(self) -> bool: ...

    async def boot_pooled(
        self, cls: WarmPoolClass, image: str, on_end: Callable[[SandboxActor], None]
    ) -> SandboxActor:
        """Admit (giving way to nothing), boot and supervise one unclaimed sandbox of ``cls``;
        ``on_end`` is called once its actor has ended (boot failure included)."""
        ...

    def admit_tenant(self, tenant: Tenant | None, params: SandboxParams) -> None:
        """Count a sandbox against its tenant's quota, or raise QuotaExceeded."""
        ...

    def release_tenant(self, params: SandboxParams) -> None: ...

    def adopt(self, actor: SandboxActor, params: SandboxParams) -> None:
        """Make a claimed sandbox the tenant's: its parameters, recorded, in the table."""
        ...


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
    def __init__(
        self, owner: PoolOwner, admission: Admission, config: Config, metrics: Metrics
    ) -> None:
        self.owner = owner
        self.admission = admission
        self.config = config
        self.metrics = metrics
        self.classes = [_Class(c, config.image) for c in config.warm_pool]
        # Claimed sandboxes whose class's refill is deferred (see refill_after).
        self._deferred: dict[str, _Class] = {}
        self._nursery: trio.Nursery | None = None
        self.min_available = config.warm_pool_min_available
        metrics.watch_pool(self.gauges)

    # ------------------------------------------------------------------ observation

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
            and not self.owner.draining
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
                self.metrics.pool_event(cls.config.runtime, "failed")
                log.warning("warm pool: a sandbox failed to boot (%s); next try in %.0fs",
                            exc, delay)  # fmt: skip
                await trio.sleep(delay)

    async def _boot(self, cls: _Class) -> None:
        cls.booting += 1
        try:
            actor = await self.owner.boot_pooled(
                cls.config, cls.image, functools.partial(self._ended, cls)
            )
        finally:
            cls.booting -= 1
        cls.ready.append(actor)
        self.metrics.pool_event(cls.config.runtime, "booted")

    def _ended(self, cls: _Class, actor: SandboxActor) -> None:
        """The pool's bookkeeping when one of its sandboxes ends (claimed or not: evicted,
        failed, at shutdown)."""
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
            self.metrics.pool_event(params.runtime_name, "miss")
            return None
        claimed = params.with_id(actor.id)
        old = actor.params.spec
        adjust = (old.memory_limit, old.cpu_limit) != (spec.memory_limit, spec.cpu_limit)
        if adjust and not self._can_adjust(actor, old, claimed.spec):
            cls.ready.insert(0, actor)
            self.metrics.pool_event(params.runtime_name, "miss")
            return None
        try:
            self.owner.admit_tenant(tenant, params)
        except QuotaExceeded:
            cls.ready.insert(0, actor)
            raise
        try:
            self.admission.resize(actor.id, actor.runtime.host_memory(claimed.spec))
        except AtCapacity:
            self.owner.release_tenant(params)
            cls.ready.insert(0, actor)
            raise
        if adjust:
            try:
                runtime = actor.runtime
                assert isinstance(runtime, LimitAdjuster)
                runtime.adjust_limits(old, claimed.spec)
            except OSError as exc:
                # The kernel refused: this sandbox's limits are in doubt, so it serves nobody.
                log.warning("warm pool: could not set limits on claim (%s)", exc)
                self.owner.release_tenant(params)
                self._discard(actor, "failed")  # (gives its whole reservation back)
                return None
        # From here it is the tenant's: its parameters, its quota, the router's table.
        self.owner.adopt(actor, claimed)
        self.metrics.pool_event(params.runtime_name, "adjusted" if adjust else "claimed")
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
                # Failed or going down: out of the pool now, its supervision does the rest.
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
        """Destroy idle pool sandboxes until admission has room for ``count`` more sandboxes
        and ``memory`` more bytes, if destroying them all would give that room; their
        admission is given back at once (their teardown goes on in the background)."""
        victims = self._victims()
        over_count, over_memory = self.admission.shortfall(count, memory)
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
        self.admission.release(actor.id)
        self.metrics.pool_event(actor.params.runtime_name, event)
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
