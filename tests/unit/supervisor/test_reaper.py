"""The reaper keeps going when a runtime cannot list its sandboxes: a slow or broken
runtime is logged and retried at the next pass, and the other runtimes are still reaped. (Real
reaping is exercised on runsc in tests/unit/runtimes; this is the loop's logic, with stand-ins.)"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from sandstorm.runtimes.base import RuntimeStartError
from sandstorm.supervisor.reaper import reap


class Listing:
    def __init__(self, orphans: list[str] | None) -> None:
        self.orphans = orphans
        self.destroyed: list[str] = []

    async def list_orphans(self, live: object) -> list[str]:
        if self.orphans is None:
            raise RuntimeStartError("runsc list timed out after 15s")
        return self.orphans

    async def destroy(self, sandbox_id: str) -> list[str]:
        self.destroyed.append(sandbox_id)
        return [f"everything of {sandbox_id}"]


async def test_a_runtime_that_cannot_list_does_not_stop_the_reaper(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken, working = Listing(None), Listing(["sbx_1"])
    available = SimpleNamespace(available=True)
    registry = SimpleNamespace(
        drivers={"gvisor": broken, "qemu": working},
        detections={"gvisor": available, "qemu": available},
    )
    with trio.fail_after(5), caplog.at_level(logging.WARNING, logger="sandstorm.supervisor.reaper"):
        released = await reap(registry, set)  # type: ignore[arg-type]
    assert released == ["everything of sbx_1"]
    assert working.destroyed == ["sbx_1"]
    assert "cannot list gvisor's sandboxes: runsc list timed out" in caplog.text
