"""Per-tenant quotas, kept by the router beside its gateway-wide admission control.

Like admission, each check and its reservation happen with no checkpoint in between, so
concurrent requests of one tenant can never overshoot its limits. Sandboxes are reserved from
admission to the end of the actor; an exec is counted from the moment it is admitted (pending)
until its record stops running.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sandstorm.actors.sandbox import SandboxActor
from sandstorm.actors.tenancy import check_exec_quota, check_sandbox_quota, retry_after
from sandstorm.store import Tenant


class TenantLedger:
    def __init__(self) -> None:
        self._sandboxes: defaultdict[str, int] = defaultdict(int)
        self._memory: defaultdict[str, int] = defaultdict(int)
        self._pending_execs: defaultdict[str, int] = defaultdict(int)

    def usage(self, tenant: str) -> tuple[int, int]:
        """(sandboxes, memory_limit bytes) the tenant holds, booting ones included."""
        return self._sandboxes[tenant], self._memory[tenant]

    def admit_sandbox(self, tenant: Tenant, memory: int, actors: Iterable[SandboxActor]) -> None:
        """Reserve one sandbox of ``memory`` for the tenant, or raise QuotaExceeded."""
        name = tenant.name
        if tenant.quotas.max_sandboxes is not None or tenant.quotas.max_memory is not None:
            wait = retry_after(
                a.expires_at() for a in actors if a.params.tenant == name and a.alive
            )
            check_sandbox_quota(tenant, self._sandboxes[name], self._memory[name], memory, wait)
        self._sandboxes[name] += 1
        self._memory[name] += memory

    def take_over(self, tenant: str, memory: int) -> None:
        """Count a sandbox a previous gateway left running: it exists, so it is never refused
        (a tenant can be over quota until it ends)."""
        self._sandboxes[tenant] += 1
        self._memory[tenant] += memory

    def release_sandbox(self, tenant: str, memory: int) -> None:
        self._sandboxes[tenant] -= 1
        self._memory[tenant] -= memory
        if self._sandboxes[tenant] == 0:
            del self._sandboxes[tenant], self._memory[tenant]

    @contextmanager
    def exec_slot(self, tenant: Tenant | None, actors: Iterable[SandboxActor]) -> Iterator[None]:
        """Hold a pending exec for the tenant while one is being started (QuotaExceeded if it
        already runs its maximum). Once started, the running record itself counts."""
        if tenant is None or tenant.quotas.max_concurrent_execs is None:
            yield
            return
        name = tenant.name
        now, mono = time.time(), time.monotonic()
        running = [
            rec
            for a in actors
            if a.params.tenant == name and a.alive
            for rec in a.execs.values()
            if rec.running
        ]
        wait = retry_after(now + rec.started_mono + rec.timeout_s - mono for rec in running)
        check_exec_quota(tenant, len(running) + self._pending_execs[name], wait)
        self._pending_execs[name] += 1
        try:
            yield
        finally:
            self._pending_execs[name] -= 1
            if self._pending_execs[name] == 0:
                del self._pending_execs[name]
