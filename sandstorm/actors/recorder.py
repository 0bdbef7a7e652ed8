"""The recorder: carries sandbox state changes and finished execs from the actors to the store.

Actors report synchronously (``sandbox_state``, ``exec_finished``: no checkpoint, so a state
change is never torn from the code that made it); one task writes what accumulated in a single
transaction, then waits for more. Pending updates are keyed by id, so a sandbox that changes
state ten times while a write is in flight costs one row: the backlog is bounded by the number of
sandboxes and execs alive at once, which admission control bounds.

Records that a response depends on are written before it is answered: a create's sandbox by the
router, a started exec by its actor (``exec_started``, unless the actor's progress record holds
it already). The batches are for what happens afterwards, audit records included (written in the
batch after the answer, not before it: a round trip to the store's thread less on every mutating
call).
"""

from __future__ import annotations

import logging

import trio

from sandstorm.api.timestamps import rfc3339
from sandstorm.api.types import ExecResult, SandboxState
from sandstorm.store import AsyncStore, AuditRecord, ExecRecordRow, Store

log = logging.getLogger(__name__)
# Audit records waiting for the store beyond which a caller waits for the write (backpressure:
# unlike states and execs, audit records are not bounded by what is alive).
MAX_PENDING_AUDITS = 10_000
RETRY_S = 1.0
FLUSH_TRIES = 3


class Recorder:
    def __init__(self, store: AsyncStore) -> None:
        self.store = store
        self._states: dict[str, tuple[str, SandboxState, str | None, int | None]] = {}
        self._execs: dict[str, ExecRecordRow] = {}
        self._audits: list[AuditRecord] = []
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        # False from a failed write until a later one succeeds: what failed is still pending
        # (retried), and checkpoints must not let a shim drop the journal meanwhile.
        self.healthy = True

    def sandbox_state(
        self, sandbox_id: str, state: SandboxState, reason: str | None, last_event_seq: int
    ) -> None:
        earlier = self._states.get(sandbox_id)
        if earlier is not None and reason is None:
            reason = earlier[2]  # a failure's reason survives a later report in the batch
        self._states[sandbox_id] = (sandbox_id, state, reason, last_event_seq)
        self._kick()

    def exec_finished(
        self, sandbox_id: str, tenant: str, started_at: str, result: ExecResult
    ) -> None:
        self._execs[result.exec_id] = ExecRecordRow(
            id=result.exec_id,
            sandbox_id=sandbox_id,
            tenant=tenant,
            state="finished",
            started_at=started_at,
            finished_at=rfc3339(),
            result=result,
        )
        self._kick()

    async def exec_started(
        self, sandbox_id: str, tenant: str, exec_id: str, started_at: str
    ) -> None:
        """Write a started exec's row now (a finished one already there is left as it is)."""
        row = ExecRecordRow(
            id=exec_id, sandbox_id=sandbox_id, tenant=tenant, state="running", started_at=started_at
        )
        await self.store.call(Store.put_exec, row)

    async def audit(self, record: AuditRecord) -> None:
        """Queue an audit record for the next batch; waits only while the backlog is full."""
        while len(self._audits) >= MAX_PENDING_AUDITS:
            self._kick()
            await self.wait_flushed()
        self._audits.append(record)
        self._kick()

    def audit_nowait(self, record: AuditRecord) -> None:
        """Queue an audit record without waiting (for a request being cancelled); at most one
        per request, so the connection limits bound these."""
        self._audits.append(record)
        self._kick()

    def _kick(self) -> None:
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not await self.write_pending():
                await trio.sleep(RETRY_S)  # the store is failing: retry, but not in a spin

    def _pending(self) -> bool:
        return bool(self._states or self._execs or self._audits)

    async def write_pending(self) -> bool:
        """Write what is pending now in one transaction (after any write already in flight:
        the store runs writes in order). On failure the batch goes back to pending — newer
        reports for the same ids win — and is retried; returns whether it was written."""
        states, self._states = self._states, {}
        execs, self._execs = self._execs, {}
        audits, self._audits = self._audits, []
        if states or execs or audits:
            try:
                await self.store.call(
                    Store.apply_updates,
                    list(states.values()),
                    list(execs.values()),
                    audits,
                )
            except Exception:
                # The store is the gateway's memory across restarts, not its lifeline: the live
                # gateway still answers, and the batch is kept for the next try.
                log.exception(
                    "could not record %d states, %d execs, %d audit records (will retry)",
                    len(states), len(execs), len(audits),
                )  # fmt: skip
                for key, state in states.items():
                    self._states.setdefault(key, state)
                for key, row in execs.items():
                    self._execs.setdefault(key, row)
                self._audits[:0] = audits
                self.healthy = False
                self._kick()
                return False
            self.healthy = True
        if not self._pending():
            self._idle.set()
        return True

    async def flush(self) -> None:
        """Write everything pending (at shutdown, shielded by the caller): a few tries."""
        for _ in range(FLUSH_TRIES):
            if not self._pending() or not await self.write_pending():
                break
        if not self._pending():
            self._idle.set()

    async def wait_flushed(self) -> None:
        """Return once everything reported before this call is written."""
        await self._idle.wait()
