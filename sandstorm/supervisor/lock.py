"""One gateway per data directory: a second one would take the first one's sandboxes for
orphans and reap them, and their teardowns would race.

The hold is an ``flock`` on ``<data_dir>/gateway.lock``, which the kernel releases when the
holding process exits in any way (a crash or SIGKILL included), so a dead gateway never blocks
the next start. The file names the holder's pid for the refusal's message; it is never removed
(removing it would let a third process lock a new file while the second still holds the old)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "gateway.lock"


class DataDirInUse(Exception):
    """Another live gateway holds the data directory; the message names it."""


@contextlib.contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` for this process until the block exits; raises
    :exc:`DataDirInUse` at once if another process holds it. Blocking, but never waits: the
    lock is taken or refused immediately."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirInUse(
                f"the data directory {data_dir} is in use by another gateway (pid {holder}); "
                "stop it first, or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock, if it was taken
