"""Read-only bind mounts made on the host, for a runtime that must not be the only guard.

gVisor 0.0~20240729 (Debian's runsc since bookworm-backports) truncates a host file through a
read-only bind mount: an ``open(O_TRUNC)`` that the sentry refuses with EROFS has already
truncated the file on the host (seen here with a world-writable file under an ``ro`` mount:
``echo x > data.txt`` fails with "Read-only file system" and the host's file is empty). So a
read-only mount is made read-only by the host kernel as well: the source is bind-mounted into
the sandbox's bundle directory, every mount of that tree is remounted read-only, and runsc gets
that path. Whatever the sentry or the gofer get wrong, the kernel refuses the write. QEMU's
virtio-9p export gets the same guard: its ``readonly`` flag is QEMU's own check, this is the
kernel's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
from pathlib import Path

from sandstorm.runtimes.base import SandboxSpec

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, path: Path) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` in this mount namespace, outermost first."""
    prefix = str(directory).rstrip("/")
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return found


def bind_read_only(source: Path, target: Path) -> None:
    """Bind ``source`` (a directory or a file, with every mount below it) at ``target``, which
    must not exist, read-only, nosuid and nodev; on failure nothing is left mounted."""
    if source.is_dir():
        target.mkdir(mode=0o700)
    else:
        target.touch(mode=0o600)
    encoded = os.fsencode(target)
    _check(_libc.mount(os.fsencode(source), encoded, None, MS_BIND | MS_REC, None), target)
    try:
        # A bind is remounted read-only one mount at a time: the source's own submounts too.
        for point in mounts_under(target):
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            _check(_libc.mount(None, os.fsencode(point), None, flags, None), point)
    except BaseException:
        unmount_all(target)
        raise


def unmount_all(directory: Path) -> list[Path]:
    """Detach every mount at or below ``directory``; returns the mount points it detached.
    Raises if one stays: the caller must not delete through a mount (it would reach the
    source on the host)."""
    points = mounts_under(directory)
    for point in reversed(points):
        if _libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):  # already gone
                raise OSError(err, os.strerror(err), str(point))
    if mounts_under(directory):
        raise OSError(errno.EBUSY, "a mount stayed after unmounting", str(directory))
    return points


def read_only_on_the_host(spec: SandboxSpec, directory: Path) -> SandboxSpec:
    """``spec`` with each read-only mount's source replaced by a read-only bind of it under
    ``directory`` (created here; :func:`unmount_all` it before removing it)."""
    directory.mkdir(mode=0o700)
    mounts = []
    for number, mount in enumerate(spec.mounts):
        if mount.read_only:
            guarded = directory / str(number)
            bind_read_only(mount.source, guarded)
            mount = dataclasses.replace(mount, source=guarded)
        mounts.append(mount)
    return dataclasses.replace(spec, mounts=tuple(mounts))
