"""The reaper: frees every resource a runtime holds for a sandbox no actor owns (a crashed
gateway's leftovers, a teardown interrupted half-way). It runs once before the first request is
served and then every :data:`REAP_INTERVAL_S`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from sandstorm.runtimes.registry import RuntimeRegistry

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 30.0


async def reap(registry: RuntimeRegistry, live_ids: Callable[[], set[str]]) -> list[str]:
    """Free every resource held for a sandbox whose id ``live_ids()`` does not return; returns
    what was released. A runtime that cannot list its sandboxes is logged and skipped (the next
    pass tries again); each destroy is shielded, so cancellation never leaves one half done."""
    released: list[str] = []
    for name, driver in registry.drivers.items():
        detection = registry.detections.get(name)
        if detection is None or not detection.available:
            continue
        try:
            orphans = await driver.list_orphans(live_ids)
        except Exception as exc:
            # A runtime too slow or broken to list its sandboxes must not stop the gateway
            # (nor the other runtimes' reaping): the next pass tries again.
            log.warning("reaper: cannot list %s's sandboxes: %s", name, exc)
            continue
        for orphan in orphans:
            with trio.CancelScope(shield=True):
                try:
                    released += await driver.destroy(orphan)
                except Exception:
                    log.exception("reaper: could not free %s", orphan)
    if released:
        log.info("reaper released %s", released)
    return released


async def reap_forever(registry: RuntimeRegistry, live_ids: Callable[[], set[str]]) -> None:
    """:func:`reap` every :data:`REAP_INTERVAL_S` until cancelled."""
    while True:
        await trio.sleep(REAP_INTERVAL_S)
        await reap(registry, live_ids)
