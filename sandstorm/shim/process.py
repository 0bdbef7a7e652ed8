"""Shim processes (``protocol/shim.md``): where a shim keeps its state, starting one, finding
the live ones, and ending one.

A shim holds one runtime process's stdio (see ``shim.c``). The gateway binds the shim's
listening socket itself and hands it over as an inherited descriptor, so connecting never waits
for the shim to start, and reattaching after a gateway restart is the same connect
(``channel.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from sandstorm.ids import is_id
from sandstorm.shim.build import ensure_shim_binary, is_shim_argv


def prepare_shim() -> None:
    """Build the shim binary now (at gateway start) rather than at the first sandbox."""
    ensure_shim_binary()


def shim_argv_directory(argv: list[bytes]) -> bytes | None:
    """The state directory named by a shim's command line, or None for any other process."""
    return argv[1] if is_shim_argv(argv) and len(argv) > 1 else None


DEFAULT_JOURNAL_MAX: Final = 64 * 1024 * 1024
# A Unix socket path must fit sun_path (108 bytes with its NUL); longer data directories (the
# tests' are) put sockets under a short per-data-directory directory instead.
MAX_SOCKET_PATH: Final = 100
SHORT_SOCKET_ROOT: Final = Path("/run/sandstorm")


@dataclass(frozen=True, slots=True)
class ShimPaths:
    """Where one sandbox's shim keeps its state: journal segments, ``pid``, ``exit``."""

    directory: Path
    socket: Path

    @property
    def exit_file(self) -> Path:
        return self.directory / "exit"

    @property
    def pid_file(self) -> Path:
        return self.directory / "pid"


def short_socket_dir(data_dir: Path) -> Path:
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return SHORT_SOCKET_ROOT / digest


def shim_paths(data_dir: Path, sandbox_id: str) -> ShimPaths:
    directory = data_dir / "shims" / sandbox_id
    sock = directory / "sock"
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        sock = short_socket_dir(data_dir) / f"{sandbox_id}.sock"
    return ShimPaths(directory, sock)


def remove_socket(paths: ShimPaths) -> bool:
    """Remove the shim's socket (and its short directory once empty); whether it existed."""
    try:
        paths.socket.unlink()
    except FileNotFoundError:
        return False
    if paths.socket.parent != paths.directory:
        with contextlib.suppress(OSError):  # not empty: other sandboxes' sockets
            paths.socket.parent.rmdir()
    return True


def read_exit_status(paths: ShimPaths) -> int | None:
    try:
        return int(paths.exit_file.read_text().strip())
    except (OSError, ValueError):
        return None


def read_pids(paths: ShimPaths) -> tuple[int, int] | None:
    """(shim pid, runtime pid) as the shim recorded them, or None."""
    try:
        shim_pid, runtime_pid = (int(x) for x in paths.pid_file.read_text().split())
    except (OSError, ValueError):
        return None
    return shim_pid, runtime_pid


def is_shim_process(pid: int, paths: ShimPaths) -> bool:
    """Whether ``pid`` is alive and is the shim of ``paths`` (a recycled pid is not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return shim_argv_directory(argv) == os.fsencode(paths.directory)


def shim_process_ids(shims_dir: Path) -> dict[str, int]:
    """Every live shim process whose state directory is under ``shims_dir``: id → pid."""
    found: dict[str, int] = {}
    prefix = os.fsencode(shims_dir) + b"/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        directory = shim_argv_directory(argv)
        if directory is not None and directory.startswith(prefix):
            found[os.fsdecode(directory[len(prefix) :])] = int(entry)
    return found


def pidfd_of_child(pid: int, parent: int) -> int | None:
    """A pidfd for ``pid`` if it is still ``parent``'s (unreaped, so not recycled) child."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if int(fields[1]) == parent:
            return fd
    except (OSError, IndexError, ValueError):
        pass
    os.close(fd)
    return None


def live_shims(shims_dir: Path, paths_of: Callable[[str], ShimPaths]) -> list[str]:
    """Sandbox ids under ``shims_dir`` whose shim is alive and whose runtime has not exited:
    what a restarted gateway can take over."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for entry in shims_dir.iterdir():
            if not is_id(entry.name, "sbx"):
                continue
            paths = paths_of(entry.name)
            pids = read_pids(paths)
            if pids is None or read_exit_status(paths) is not None:
                continue
            if is_shim_process(pids[0], paths):
                found.append(entry.name)
    return sorted(found)


async def end_shim(paths: ShimPaths, *, grace: float) -> list[str]:
    """Make sure the shim of ``paths`` is gone (waiting ``grace`` seconds for it to leave on its
    own, then SIGKILL, its runtime process first), then remove its directory and socket. What
    was released, described."""
    released: list[str] = []
    pids = read_pids(paths)
    if pids is not None and is_shim_process(pids[0], paths):
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(pids[0])
            try:
                with trio.move_on_after(grace):
                    await trio.lowlevel.wait_readable(fd)
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                if not poller.poll(0):  # still running
                    # Its runtime first: a shim killed alone would orphan a runtime that hangs
                    # (a `runsc run` stuck before its sandbox exists), which nobody then reaps.
                    runtime = pidfd_of_child(pids[1], pids[0])
                    if runtime is not None:
                        try:
                            signal.pidfd_send_signal(runtime, signal.SIGKILL)
                        finally:
                            os.close(runtime)
                        released.append(f"runtime process {pids[1]}")
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    with trio.move_on_after(2):
                        await trio.lowlevel.wait_readable(fd)
            finally:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
            released.append(f"shim process {pids[0]}")
    if paths.directory.exists():
        await trio.to_thread.run_sync(shutil.rmtree, paths.directory, True)
        released.append(f"shim directory {paths.directory}")
    if remove_socket(paths) and paths.socket.parent != paths.directory:
        released.append(f"shim socket {paths.socket}")
    return released


async def spawn_shim(
    paths: ShimPaths,
    runtime_argv: list[str],
    *,
    env: dict[str, str],
    journal_max: int,
    log_path: Path,
    cwd: Path | None = None,
) -> trio.Process:
    """Start a shim that runs ``runtime_argv``; its listening socket is bound before it starts.

    The shim's stderr (and the runtime's) is appended to ``log_path``. The runtime inherits the
    shim's working directory, ``cwd`` (for paths its argv gives relative: QEMU's QMP socket).
    Raises ``OSError`` when the directory or socket cannot be made, ``ShimBuildError`` when
    there is no shim binary and it cannot be built; nothing is left running then.
    """
    binary = ensure_shim_binary()  # built at gateway start (prepare_shim): a lookup here
    paths.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.directory.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Opening a local log file for append does not block in practice; it goes to the child.
    stderr = open(log_path, "ab")  # noqa: SIM115, ASYNC230
    try:
        for attempt in range(3):
            # A shared short socket directory is removed when its last socket goes (see
            # remove_socket); one removed between this mkdir and the bind is made again.
            paths.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                paths.socket.unlink()
            try:
                listener.bind(str(paths.socket))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        os.chmod(paths.socket, 0o600)
        listener.listen(8)
        return await trio.lowlevel.open_process(
            [str(binary), str(paths.directory), str(journal_max), str(listener.fileno()), "--",
             *runtime_argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            pass_fds=(listener.fileno(),),
            cwd=cwd,
            # Its own session: neither a terminal's Ctrl-C nor a SIGKILL of the gateway's
            # process group reaches it, which is the point of it.
            start_new_session=True,
        )  # fmt: skip
    finally:
        stderr.close()
        listener.close()
