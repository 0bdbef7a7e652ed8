"""The directory handling every image build shares.

A build is made inside a temporary directory next to its final one and renamed into place, so
a crash or a cancellation never leaves a half-built image under its final name. A build holds
an exclusive lock on ``<data_dir>/images/.lock`` so two builders (say the install script and a
test run) cannot race.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Final

import trio

from sandstorm.images.manifest import ImageBuildError, ImageError

__all__ = [
    "CLEANUP_GRACE_S",
    "build_lock",
    "install_tree",
    "remove_leftovers",
    "remove_tree",
    "remove_tree_or_warn",
    "tree_size",
]

# Cleanup of a failed or replaced image may take a while (a rootfs is thousands of files) but
# must not hang a shutdown forever.
CLEANUP_GRACE_S: Final = 120.0


@contextlib.asynccontextmanager
async def build_lock(path: Path, log: Callable[[str], object]) -> AsyncIterator[None]:
    """An exclusive flock on *path*, polled so that waiting for it stays cancellable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not waited:
                log(f"waiting for another image build to finish ({path})")
                waited = True
            await trio.sleep(0.5)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


async def install_tree(tmp: Path, final: Path, name: str, log: Callable[[str], object]) -> None:
    """Rename *tmp* to *final*; an existing *final* is renamed away first, then deleted."""
    old: Path | None = None
    if await trio.Path(final).exists():
        old = final.with_name(f".old-{name}-{secrets.token_hex(4)}")
        log(f"replacing the existing image {name!r}")
        await trio.Path(final).rename(old)
    try:
        await trio.Path(tmp).rename(final)
    except BaseException:
        if old is not None:
            with trio.CancelScope(shield=True):
                await trio.Path(old).rename(final)
        raise
    if old is not None:
        with trio.move_on_after(CLEANUP_GRACE_S) as scope:
            scope.shield = True
            await remove_tree_or_warn(old, log)


async def remove_leftovers(root: Path, name: str, log: Callable[[str], object]) -> None:
    """Delete temp and replaced-image directories a crashed build left behind.

    Called with the build lock held, so none of them belongs to a live build.
    """
    for prefix in (f".tmp-{name}-", f".old-{name}-"):
        for path in await trio.Path(root).glob(prefix + "*"):
            log(f"removing leftover {path}")
            await remove_tree(Path(path))


def _mounts_under(path: Path) -> list[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        # /proc/self/mounts escapes spaces etc. as octal (\040).
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if target == str(path) or target.startswith(prefix):
            found.append(target)
    return found


async def remove_tree(path: Path) -> None:
    """Delete *path*; refuse if anything is still mounted under it.

    mmdebstrap mounts /proc, /sys and device nodes inside the rootfs while it runs. If it was
    killed before unmounting them, a plain recursive delete would walk into the host's /dev and
    /sys; so lazily unmount what is left first, and give up loudly if that fails.
    """
    if not await trio.Path(path).exists():
        return
    mounts = _mounts_under(path)
    for target in sorted(mounts, key=len, reverse=True):
        await trio.run_process(["umount", "--lazy", target], check=False)
    still = _mounts_under(path)
    if still:
        raise ImageBuildError(f"not deleting {path}: still mounted: {', '.join(still)}")
    await trio.to_thread.run_sync(partial(shutil.rmtree, path, ignore_errors=True))


async def remove_tree_or_warn(path: Path, log: Callable[[str], object]) -> None:
    """:func:`remove_tree`, logging a failure instead of raising it: for cleanup paths, where
    the build's own outcome (or exception) must win."""
    try:
        await remove_tree(path)
    except (ImageError, OSError) as exc:
        log(f"warning: could not remove {path}: {exc}")


def tree_size(root: Path) -> int:
    """Bytes of the files under *root* as lstat(2) sees them, each hard link counted once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, filename))
            except OSError:
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
    return total
