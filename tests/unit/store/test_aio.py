"""The store as the gateway's tasks use it (``AsyncStore``): any store call run on the worker
thread, reads on the reader's connection, and what keys resolve to cached until keys or tenants
change."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sandstorm.actors.tenancy import new_key
from sandstorm.api.types import SandboxState
from sandstorm.ids import new_id
from sandstorm.store import (
    CREDENTIALS_STAMP,
    AsyncStore,
    Quotas,
    SandboxRecord,
    Store,
    key_hash,
)
from sandstorm.store import aio as async_store


async def test_resolved_keys_are_cached_until_keys_or_tenants_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway keeps what a key resolved to, and asks the database again after any change
    to keys or tenants made through Store by another process (the CLI)."""
    gateway = AsyncStore(tmp_path)
    cli = Store(tmp_path).open()
    asked: list[str | None] = []

    def resolve(store: Store, digest: str | None) -> tuple[bool, Any]:
        asked.append(digest)
        return store.authenticate(digest)

    def named(found: tuple[bool, Any]) -> bool:
        return found[1] is not None

    async def resolved(digest: str) -> tuple[bool, Any]:
        return await gateway.cached_credentials(digest, resolve, keep=named)

    try:
        with trio.fail_after(20):
            await gateway.open()
            key_id, secret = new_key()
            cli.set_tenant("acme", Quotas(max_sandboxes=3))
            cli.add_key(key_id, "acme", key_hash(secret))
            good, bad = key_hash(secret), key_hash(secret + "x")
            first = await resolved(good)
            assert first[1] is not None and first[1].quotas.max_sandboxes == 3
            assert await resolved(good) == first
            assert asked == [good]  # the second from the cache
            # An unknown key is never kept: every try asks the database.
            assert await resolved(bad) == (True, None)
            assert await resolved(bad) == (True, None)
            assert asked == [good, bad, bad]
            # Changes count at the next call: quotas, then the revocation.
            cli.set_tenant("acme", Quotas(max_sandboxes=5))
            changed = await resolved(good)
            assert changed[1] is not None and changed[1].quotas.max_sandboxes == 5
            cli.revoke_key(key_id)
            assert await resolved(good) == (False, None)
            # A query that began before a change, and ends after another request saw it, is
            # not kept: its answer may predate the change.
            cli.set_tenant("acme", Quotas(max_sandboxes=5))
            cli.add_key(key_id + "x", "acme", key_hash(secret + "y"))
            late = key_hash(secret + "y")
            started, release = trio.Event(), trio.Event()

            def slow(store: Store, digest: str | None) -> tuple[bool, Any]:
                trio.from_thread.run_sync(started.set)
                trio.from_thread.run(release.wait)
                return resolve(store, digest)

            async def slow_lookup() -> None:
                await gateway.cached_credentials(late, slow, keep=named)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_lookup)
                await started.wait()
                cli.set_tenant("acme", Quotas(max_sandboxes=6))
                # Another request sees the new stamp (and waits for the thread behind it).
                nursery.start_soon(resolved, good)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
            assert late not in gateway._credentials
            # Without a readable stamp nothing is cached.
            asked.clear()
            (tmp_path / CREDENTIALS_STAMP).unlink()
            await resolved(good)
            await resolved(good)
            assert asked == [good, good]
            # Bounded: a full cache starts over.
            cli.set_tenant("acme")
            monkeypatch.setattr(async_store, "KEY_CACHE_MAX", 2)
            keys = []
            for _ in range(3):
                other_id, other_secret = new_key()
                cli.add_key(other_id, "acme", key_hash(other_secret))
                keys.append(key_hash(other_secret))
            for digest in keys:
                await resolved(digest)
            assert len(gateway._credentials) <= 2
    finally:
        cli.close()
        await gateway.close()


async def test_any_store_method_runs_in_the_worker_thread(tmp_path: Path) -> None:
    """``call`` runs any Store method (keywords included) in the writer's thread, ``read`` on
    the reader's connection, which sees what the writer committed. A call cancelled while its
    method runs is not abandoned: the write completes."""
    store = AsyncStore(tmp_path)
    with trio.fail_after(10):
        await store.open()
        try:
            sid = new_id("sbx")
            record = SandboxRecord(
                id=sid, tenant="a", runtime="gvisor", state="creating", params={},
                created_at=time.time(),
            )  # fmt: skip
            await store.call(Store.put_sandbox, record)
            await store.call(Store.set_sandbox_state, sid, "idle", reason="held")
            stored = await store.read(Store.get_sandbox, sid)
            assert stored is not None and (stored.state, stored.reason) == ("idle", "held")
            assert [r.id for r in await store.read(Store.list_sandboxes, tenant="a")] == [sid]

            started, release = trio.Event(), threading.Event()

            def slow_write(s: Store, state: SandboxState) -> SandboxState:
                trio.from_thread.run_sync(started.set)
                release.wait()
                s.set_sandbox_state(sid, state)
                return state

            returned: list[str] = []
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def write() -> None:
                        returned.append(await store.call(slow_write, "running"))

                    nursery.start_soon(write)
                    await started.wait()
                    scope.cancel()
                    release.set()
            assert returned == ["running"]
            stored = await store.call(Store.get_sandbox, sid)
            assert stored is not None and stored.state == "running"
        finally:
            await store.close()
