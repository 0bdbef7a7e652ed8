"""The recorder keeps what a failed write held and retries it; checkpoints see it unhealthy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from sandstorm.actors.recorder import Recorder
from sandstorm.ids import new_id
from sandstorm.store import AsyncStore, AuditRecord, SandboxRecord, Store


async def test_a_failed_write_is_kept_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AsyncStore(tmp_path)
    await store.open()
    try:
        sid = new_id("sbx")
        await store.call(
            Store.put_sandbox,
            SandboxRecord(
                id=sid, tenant="t", runtime="gvisor", state="creating", params={},
                created_at=time.time(),
            )
        )  # fmt: skip
        recorder = Recorder(store)
        real = Store.apply_updates
        failures = [OSError(28, "No space left on device")]

        def flaky(self: Store, *args: Any) -> None:
            if failures:
                raise failures.pop()
            real(self, *args)

        monkeypatch.setattr(Store, "apply_updates", flaky)
        recorder.sandbox_state(sid, "idle", None, 3)
        recorder.audit_nowait(
            AuditRecord(time=time.time(), tenant="t", action="run", outcome="201")
        )
        with trio.fail_after(10):
            assert await recorder.write_pending() is False
            assert recorder.healthy is False
            # A newer report for the same sandbox wins over the failed one it replaces.
            recorder.sandbox_state(sid, "running", None, 4)
            assert await recorder.write_pending() is True
        assert recorder.healthy is True
        record = await store.call(Store.get_sandbox, sid)
        assert record is not None and (record.state, record.last_event_seq) == ("running", 4)
        assert [a.action for a in await store.call(Store.audit, None, None)] == ["run"]
    finally:
        await store.close()
