"""Sync iteration over an async source: Trio runs it in a worker thread, a bounded queue hands
its items over."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

#: Items read ahead of the caller at most.
QUEUE_ITEMS = 256


def iterate_in_thread(
    source: Callable[[], AbstractAsyncContextManager[AsyncIterator[Any]]], *, name: str
) -> Iterator[Any]:
    """Yield what ``source()`` (an async context manager over an async iterator) yields.

    A caller that stops iterating stops the reading too; leaving the loop early cancels the
    worker, which closes the source. The worker's error is raised in the caller's thread.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_ITEMS)
    done = object()
    started = threading.Event()
    handle: dict[str, Any] = {}

    async def pump() -> None:
        with trio.CancelScope() as scope:
            handle["scope"], handle["token"] = scope, trio.lowlevel.current_trio_token()
            started.set()
            async with source() as iterator:
                async for item in iterator:
                    # Wait for room without blocking Trio, so a cancel can get in.
                    while True:
                        try:
                            items.put_nowait(item)
                            break
                        except queue.Full:
                            await trio.sleep(0.01)

    def worker() -> None:
        outcome: object = done
        try:
            trio.run(pump)
        except BaseException as exc:  # handed to the caller's thread
            outcome = exc
        finally:
            started.set()
            # The caller may be gone (it left the loop): never block on a full queue.
            with contextlib.suppress(queue.Full):
                items.put(outcome, timeout=1)

    thread = threading.Thread(target=worker, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        started.wait(timeout=5)
        if "scope" in handle and thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(handle["scope"].cancel, trio_token=handle["token"])
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                items.get(timeout=0.1)  # make room in case the worker waits to put
            thread.join(timeout=0.1)
