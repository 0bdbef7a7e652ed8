"""Take-over after a restart: the sandboxes an earlier gateway left running (it crashed, or
shut down with ``on_shutdown = "keep"``) are adopted by new actors; the records of the rest are
failed with a reason, before the first request is served."""

from __future__ import annotations

import logging

import trio

from sandstorm.actors.router import Router
from sandstorm.runtimes.registry import RuntimeRegistry
from sandstorm.store import AsyncStore, SandboxRecord, Store

log = logging.getLogger(__name__)
LOST_REASON = "the gateway restarted and the sandbox was no longer running"


async def take_over(store: AsyncStore, registry: RuntimeRegistry, router: Router) -> list[str]:
    """Adopt every unfinished sandbox whose runtime still runs it; fail the others' records.
    Returns the ids taken over. A sandbox that cannot be adopted is logged and failed."""
    started = trio.current_time()
    records = await store.call(Store.unfinished_sandboxes)
    surviving: set[tuple[str, str]] = set()
    for name, driver in registry.drivers.items():
        detection = registry.detections.get(name)
        if records and detection is not None and detection.available:
            surviving |= {(name, sid) for sid in await driver.surviving()}
    taken: list[str] = []

    async def take(record: SandboxRecord) -> None:
        try:
            await router.take_over(record)
        except Exception as exc:
            log.warning("sandbox %s could not be taken over: %s", record.id, exc)
        else:
            taken.append(record.id)

    async with trio.open_nursery() as nursery:
        for record in records:
            if (record.runtime, record.id) in surviving:
                nursery.start_soon(take, record)
    lost = await store.call(Store.fail_unfinished, LOST_REASON, keep=taken)
    if records:
        log.info(
            "took over %d sandboxes of an earlier gateway in %.0f ms; %d were gone",
            len(taken),
            (trio.current_time() - started) * 1000,
            len(lost),
        )
    return taken
