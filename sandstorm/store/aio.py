"""The store for Trio code: any :class:`~sandstorm.store.Store` method, run in a worker thread.

There is no async twin of each method: ``await store.call(Store.get_sandbox, sandbox_id)`` runs
``Store.get_sandbox(<the store>, sandbox_id)`` in the writer's thread, typed as the method is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from sandstorm.store.sync import Store

KEY_CACHE_MAX = 1024
P = ParamSpec("P")
R = TypeVar("R")


class AsyncStore:
    """The gateway's face of the store. Every :meth:`call` runs in ONE worker thread
    (``CapacityLimiter(1)``), in order, so SQLite never blocks the event loop and the connection
    is never used by two threads at once.

    :meth:`read` uses a second connection on a thread of its own: WAL lets it read while the
    writer writes, so what runs there is never queued behind the writes of busy sandboxes
    (checkpoints, records).

    **Cancellation**: :meth:`call` and :meth:`read` check for cancellation on entry and while
    they wait for their thread; cancelled there, they raise :exc:`trio.Cancelled` and the method
    never runs. Once the method runs, cancellation does not abandon it (a write is never left
    half done): the call waits for it to return and returns its value (or raises its error),
    and the cancellation is delivered at the caller's next checkpoint.
    """

    def __init__(self, data_dir: Path) -> None:
        self._store = Store(data_dir)
        self._limiter = trio.CapacityLimiter(1)
        self._reader = Store(data_dir)
        self._read_limiter = trio.CapacityLimiter(1)
        # What key hashes resolved to (see cached_credentials), for this credentials stamp.
        self._credentials: dict[str | None, Any] = {}
        self._credentials_stamp: bytes | None = None

    async def call(
        self, fn: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """``fn(store, *args, **kwargs)`` in the writer's thread: ``fn`` is a method of
        :class:`Store` (``Store.put_sandbox``) or any function whose first argument is one."""
        store = self._store
        return await trio.to_thread.run_sync(
            lambda: fn(store, *args, **kwargs), limiter=self._limiter, abandon_on_cancel=False
        )

    async def read(
        self, fn: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """As :meth:`call`, on the reader's connection and thread: for queries only."""
        store = self._reader
        return await trio.to_thread.run_sync(
            lambda: fn(store, *args, **kwargs), limiter=self._read_limiter, abandon_on_cancel=False
        )

    async def cached_credentials(
        self,
        digest: str | None,
        resolve: Callable[[Store, str | None], R],
        *,
        keep: Callable[[R], bool],
    ) -> R:
        """``resolve(store, digest)`` in the writer's thread, or what it gave last time: every
        request resolves its key, and the answer changes only with keys and tenants, which
        rewrite the credentials stamp (read here, a small file in the page cache: no trip to a
        thread). ``keep``: which answers to cache (a caller keeps only those that name a
        tenant, so unknown keys cannot fill it)."""
        stamp = self._store.credentials_stamp()
        if stamp is None or stamp != self._credentials_stamp:
            self._credentials.clear()
            self._credentials_stamp = stamp
        elif digest in self._credentials:
            cached: R = self._credentials[digest]
            return cached
        value = await self.call(resolve, digest)
        # Kept only under the stamp read before the query: a request that saw a newer stamp
        # meanwhile may have cleared the cache after a change this query did not see.
        if stamp is not None and stamp == self._credentials_stamp and keep(value):
            if len(self._credentials) >= KEY_CACHE_MAX:
                self._credentials.clear()
            self._credentials[digest] = value
        return value

    async def open(self) -> None:
        await self.call(Store.open)
        await self.read(Store.open)  # after the writer applied the schema

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.read(Store.close)
            await self.call(Store.close)
