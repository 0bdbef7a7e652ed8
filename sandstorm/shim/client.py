"""Gateway side of the shim (``protocol/shim.md``): start one, attach to one, and the instance.

A shim holds one runtime process's stdio (see ``shim.c``). The gateway binds the shim's
listening socket itself and hands it over as an inherited descriptor, so connecting never waits
for the shim to start, and reattaching after a gateway restart is the same connect.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
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

from sandstorm.agent import HEADER, AgentChannel, Frame
from sandstorm.ids import is_id
from sandstorm.runtimes.base import RuntimeStartError
from sandstorm.shim import wire
from sandstorm.shim.build import ensure_shim_binary, is_shim_argv

# Shims started by gateways before the shim was C: ``python -I -S [-c LAUNCHER] main.py DIR …``.
# They speak the same protocol, so a gateway upgraded under them still finds and reattaches them.
_PYTHON_SHIM_MAIN: Final = os.fsencode(Path(__file__).resolve().with_name("main.py"))


def prepare_shim() -> None:
    """Build the shim binary now (at gateway start) rather than at the first sandbox."""
    ensure_shim_binary()


def shim_argv_directory(argv: list[bytes]) -> bytes | None:
    """The state directory named by a shim's command line, or None for any other process."""
    if is_shim_argv(argv):
        return argv[1] if len(argv) > 1 else None
    if len(argv) > 6 and _PYTHON_SHIM_MAIN in argv[:6]:
        at = argv.index(_PYTHON_SHIM_MAIN) + 1
        return argv[at] if at < len(argv) else None
    return None


DEFAULT_JOURNAL_MAX: Final = 64 * 1024 * 1024
# A Unix socket path must fit sun_path (108 bytes with its NUL); longer data directories (the
# tests' are) put sockets under a short per-data-directory directory instead.
MAX_SOCKET_PATH: Final = 100
SHORT_SOCKET_ROOT: Final = Path("/run/sandstorm")
ATTACH_TIMEOUT_S: Final = 5.0
STOP_SEND_S: Final = 1.0


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


@dataclass(frozen=True, slots=True)
class Handshake:
    """The shim's answer to ATTACH."""

    shim_pid: int
    runtime_pid: int
    first_offset: int  # the oldest journal byte still held
    start_offset: int  # where the stream that follows begins (the offset asked for)
    end_offset: int  # the journal's end when the shim answered
    exited: bool
    status: int  # the runtime's exit status when ``exited``

    @property
    def usable(self) -> bool:
        return self.first_offset <= self.start_offset <= self.end_offset


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


def _pidfd_of_child(pid: int, parent: int) -> int | None:
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
                    runtime = _pidfd_of_child(pids[1], pids[0])
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


# ------------------------------------------------------------------------ start and connect


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


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        # At most what is missing: bytes after the handshake belong to the agent channel.
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise RuntimeStartError("the shim closed the connection during the handshake")
        data += chunk
    return bytes(data)


async def attach(
    paths: ShimPaths, offset: int, *, just_started: bool = False
) -> tuple[trio.SocketStream, Handshake]:
    """Connect to a live shim and ask for its stream from ``offset``.

    Raises :class:`RuntimeStartError` with the reason when there is no live shim, it does not
    answer within :data:`ATTACH_TIMEOUT_S`, or the bytes from ``offset`` are not in its journal.
    A shim ``just_started`` has no such bound: its start-up (a Python process, seconds on a
    loaded host) is bounded by the caller's boot deadline instead.
    """
    try:
        stream = await trio.open_unix_socket(str(paths.socket))
    except OSError as exc:
        recorded = read_exit_status(paths)
        if recorded is not None:
            raise RuntimeStartError(f"the sandbox exited with status {recorded}") from None
        raise RuntimeStartError(f"no live shim at {paths.socket}: {exc.strerror}") from None
    try:
        with trio.move_on_after(math.inf if just_started else ATTACH_TIMEOUT_S) as scope:
            request = wire.OFFSET.pack(offset)
            await stream.send_all(HEADER.pack(wire.ATTACH, 0, len(request)) + request)
            header = await _receive_exactly(stream, HEADER.size)
            kind, _channel, length = HEADER.unpack(header)
            if kind != wire.ATTACHED_KIND or length != wire.ATTACHED.size:
                raise RuntimeStartError(f"unexpected shim handshake (kind {kind}, {length} bytes)")
            shim_pid, runtime_pid, first, start, end, exited, status = wire.ATTACHED.unpack(
                await _receive_exactly(stream, length)
            )
        if scope.cancelled_caught:
            raise RuntimeStartError(f"the shim did not answer within {ATTACH_TIMEOUT_S:.0f}s")
        handshake = Handshake(shim_pid, runtime_pid, first, start, end, bool(exited), status)
        if not handshake.usable:
            raise RuntimeStartError(
                f"offset {offset} is not in the shim's journal "
                f"(it holds {handshake.first_offset}..{handshake.end_offset})"
            )
    except (OSError, trio.BrokenResourceError) as exc:
        await stream.aclose()
        raise RuntimeStartError(f"the shim's connection failed: {exc}") from None
    except BaseException:
        await stream.aclose()
        raise
    return stream, handshake


# ------------------------------------------------------------------------ the channel


class ShimChannel(AgentChannel):
    """An :class:`AgentChannel` over a shim's socket, with the shim's own frames.

    ``auto_ack``: after every ``ack_every`` bytes received, tell the shim it may drop them
    (skipped while another send holds the lock; the next frame tries again). Turn it off to
    acknowledge only what is durable elsewhere, with :meth:`send_ack`.
    """

    def __init__(
        self, stream: trio.SocketStream, *, offset: int, ack_every: int, auto_ack: bool = True
    ) -> None:
        super().__init__(stream, stream, offset=offset)
        self._stream = stream
        self.acked = offset
        self.ack_every = ack_every
        self.auto_ack = auto_ack

    async def receive_frame(self) -> Frame | None:
        # Acknowledge before waiting for more, never after a frame was taken: a cancelled ack
        # must not lose a frame.
        if (
            self.auto_ack
            and self.offset - self.acked >= self.ack_every
            and not self._send_lock.locked()
        ):
            await self.send_ack(self.offset)
        return await super().receive_frame()

    async def _send_shim_frame(self, kind: int, payload: bytes = b"") -> None:
        async with self._send_lock:
            await self._send_locked(HEADER.pack(kind, 0, len(payload)) + payload)

    async def send_ack(self, offset: int) -> None:
        """Everything before ``offset`` is durable on the gateway's side: the shim may drop it."""
        await self._send_shim_frame(wire.ACK, wire.OFFSET.pack(offset))
        self.acked = max(self.acked, offset)

    async def send_kill(self) -> None:
        await self._send_shim_frame(wire.KILL)

    async def aclose(self) -> None:
        """Ask the sandbox to stop (the shim closes the agent's stdin after the frames sent
        before), then close the connection. Completes even if cancelled."""
        try:
            with trio.move_on_after(STOP_SEND_S):
                await self._send_shim_frame(wire.STOP)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await super().aclose()

    async def detach(self) -> None:
        """Close the connection and leave the sandbox running: the shim keeps journaling."""
        await super().aclose()

    def close_now(self) -> None:
        """Close the socket at once (the shim is gone); a task still using it gets
        :class:`trio.ClosedResourceError`."""
        self._stream.socket.close()


# ------------------------------------------------------------------------ the instance


class ShimInstance:
    """A sandbox held by a shim: the ``RuntimeInstance`` of the gVisor runtime.

    ``process`` is the shim when this gateway started it (it is reaped here); after a restart
    the shim is someone else's child and only its pidfd is watched.
    """

    def __init__(
        self,
        paths: ShimPaths,
        stream: trio.SocketStream,
        handshake: Handshake,
        log_path: Path,
        *,
        process: trio.Process | None = None,
        ack_every: int,
    ) -> None:
        self.paths = paths
        self.log_path = log_path
        self.process = process
        self.handshake = handshake
        self.shim_pid = handshake.shim_pid
        self.runtime_pid = handshake.runtime_pid
        self._channel = ShimChannel(stream, offset=handshake.start_offset, ack_every=ack_every)
        self._status: int | None = None
        self._wait_lock = trio.Lock()
        self._runtime_pidfd = _pidfd_of_child(handshake.runtime_pid, handshake.shim_pid)
        self._shim_pidfd: int | None = None
        if process is None:
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(handshake.shim_pid)
                if is_shim_process(handshake.shim_pid, paths):
                    self._shim_pidfd = fd
                else:
                    os.close(fd)

    @property
    def channel(self) -> ShimChannel:
        return self._channel

    @property
    def exited(self) -> bool:
        return self._status is not None

    async def wait(self) -> int:
        """Wait until the shim is gone; the runtime's exit status, as the shim recorded it
        (``-SIGKILL`` when the shim died without recording one)."""
        async with self._wait_lock:
            if self._status is not None:
                return self._status
            if self.process is not None:
                shim_status = await self.process.wait()
            else:
                if self._shim_pidfd is not None:
                    await trio.lowlevel.wait_readable(self._shim_pidfd)
                    # Our child after all (the gateway that started it is this process).
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(self.shim_pid, os.WNOHANG)  # noqa: ASYNC222 - it has exited
                shim_status = -signal.SIGKILL
            status = read_exit_status(self.paths)
            self._status = status if status is not None else min(shim_status, -1)
            self._close_pidfds()
            # The shim is gone, so is the other end: nothing more can come or go on it.
            self._channel.close_now()
            return self._status

    def kill(self) -> None:
        """SIGKILL the runtime, then the shim (the last resort of a teardown)."""
        if self._status is not None:
            return
        for fd in (self._runtime_pidfd, self._shim_pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def detach(self) -> None:
        """Let go of the sandbox without stopping it (a gateway that shuts down and keeps its
        sandboxes). The shim stays; a later :func:`attach` resumes from the channel's offset."""
        await self._channel.detach()
        self._close_pidfds()

    def _close_pidfds(self) -> None:
        for fd in (self._runtime_pidfd, self._shim_pidfd):
            if fd is not None:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
        self._runtime_pidfd = self._shim_pidfd = None

    def diagnostics(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2048))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
