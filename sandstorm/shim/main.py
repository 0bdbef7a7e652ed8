"""The per-sandbox shim: it holds one runtime process's stdio so the sandbox outlives the gateway.

Started by the gateway as ``python -I -S -c LAUNCHER main.py DIR JOURNAL_MAX FD -- RUNTIME_ARGV…``
(main.py imported as a module, from bytecode compiled once: ``sandstorm.bytecode``) in a session
of its own, with its listening Unix socket already bound as ``FD`` (so the gateway can connect at
once, and a gateway SIGKILL, of its process or its group, never reaches it). It spawns the
runtime with the environment and limits it inherited, appends every byte of the runtime's stdout
to a journal of segment files under DIR, and serves one gateway connection at a time: the
journal from the offset the gateway asks for (replay and live are one path), the gateway's agent
frames to the runtime's stdin verbatim. The wire format is ``protocol/shim.md``.

Standard library only and few imports (no json, socket, signal or subprocess: each costs
milliseconds on the cold path of every sandbox). Everything is bounded: at most one incoming
frame, at most ``STDIN_MAX`` bytes queued for the runtime, at most ``journal_max`` unacknowledged
journal bytes (then stdout is no longer read: back-pressure into the sandbox). It never blocks
on the gateway: one ``poll`` loop, every descriptor but the journal files non-blocking.
"""

from __future__ import annotations

import _socket
import os
import select
import struct
import sys
import time

HEADER = struct.Struct("!BII")
OFFSET = struct.Struct("!Q")
#: shim pid, runtime pid, first journal offset, stream start, journal end, exited, status.
ATTACHED = struct.Struct("!IIQQQBi")
# Frame kinds at or above RESERVED belong to the shim and never reach the agent.
RESERVED = 0xE0
ATTACH = 0xE0  # G→S, first frame of a connection: payload OFFSET, replay from there
ACK = 0xE1  # G→S: payload OFFSET, everything before it is durable on the gateway's side
STOP = 0xE2  # G→S: close the runtime's stdin after the frames before it (the agent exits)
KILL = 0xE3  # G→S: SIGKILL the runtime
ATTACHED_KIND = 0xF0  # S→G, the answer to ATTACH; raw journal bytes follow
MAX_FRAME = 1024 * 1024  # the agent's own limit for gateway frames (MAX_GATEWAY_FRAME)
STDIN_MAX = 16 * 1024 * 1024  # queued for the runtime's stdin before the socket is not read
READ_SIZE = 65536
SEND_SIZE = 1024 * 1024
EXIT_DRAIN_S = 5.0  # after the runtime exits, how long its stdout may stay open
LINGER_S = 10.0  # after the runtime exits, how long a connected gateway may stall delivery
ATTACH_WAIT_S = 10.0  # how long a connection may take to send ATTACH
SIGKILL = 9
# Reset to default in the runtime, as subprocess does (Python itself ignores SIGPIPE).
SIGPIPE, SIGXFSZ = 13, 25


def segment_name(start: int) -> str:
    return f"journal.{start:020d}"


def exit_path(directory: str) -> str:
    return os.path.join(directory, "exit")


class Segment:
    __slots__ = ("end", "fd", "path", "start")

    def __init__(self, directory: str, start: int) -> None:
        self.start = start
        self.end = start
        self.path = os.path.join(directory, segment_name(start))
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


class Shim:
    def __init__(self, directory: str, journal_max: int, listen_fd: int, argv: list[str]) -> None:
        self.dir = directory
        self.journal_max = journal_max
        self.segment_size = max(READ_SIZE, min(4 * 1024 * 1024, journal_max // 4))
        self.segments: list[Segment] = []
        self.written = 0  # stream offset of the journal's end
        # Read from the runtime but not journaled yet: the disk refused it (full, I/O error).
        # At most one read's worth; stdout is not read again until it is written.
        self.unwritten = b""
        self.disk_error: str | None = None
        self.acked = 0
        # Inherited from the gateway; the runtime must not inherit it in turn.
        os.set_inheritable(listen_fd, False)
        self.listener = _socket.socket(fileno=listen_fd)
        self.listener.setblocking(False)
        self.conn: _socket.socket | None = None
        self.conn_in = bytearray()
        self.conn_out = bytearray()
        self.attached = False
        self.conn_since = 0.0
        self.sent = 0
        self.progress = 0.0
        self.stdin_out = bytearray()
        self.stop_pending = False
        self.status: int | None = None
        self.exit_recorded = False
        self.drain_until = 0.0
        stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, stdout_w = os.pipe()
        # The runtime gets the pipes as fds 0 and 1 and the shim's own stderr (its log).
        self.pid = os.posix_spawn(
            argv[0],
            argv,
            os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, stdin_r, 0), (os.POSIX_SPAWN_DUP2, stdout_w, 1)],
            setsigdef=(SIGPIPE, SIGXFSZ),
        )
        os.close(stdin_r)
        os.close(stdout_w)
        self.pidfd = os.pidfd_open(self.pid)
        for fd in (self.stdin_w, self.stdout_r):
            os.set_blocking(fd, False)
        # Who holds this sandbox, for a later gateway (written whole, then renamed into place).
        tmp = os.path.join(directory, "pid.tmp")
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {self.pid}\n")
        os.rename(tmp, os.path.join(directory, "pid"))

    # ---------------------------------------------------------------- journal

    def first_offset(self) -> int:
        return self.segments[0].start if self.segments else self.written

    def read_stdout(self) -> None:
        try:
            data = os.read(self.stdout_r, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            os.close(self.stdout_r)
            self.stdout_r = -1
            return
        self.unwritten = data
        self.write_journal()

    def write_journal(self) -> None:
        """Append what was read to the journal. A disk that refuses it (ENOSPC, EIO) must not
        kill the sandbox: the bytes are kept, stdout is not read meanwhile (the sandbox waits,
        as on a full pipe), and the write is retried from the loop."""
        while self.unwritten:
            try:
                segment = self.segments[-1] if self.segments else None
                if segment is None or segment.end - segment.start >= self.segment_size:
                    segment = Segment(self.dir, self.written)
                    self.segments.append(segment)
                written = os.write(segment.fd, self.unwritten)
            except OSError as exc:
                if self.disk_error is None:
                    sys.stderr.write(f"sandstorm-shim: journal write failed, will retry: {exc}\n")
                self.disk_error = str(exc)
                return
            segment.end += written
            self.written += written
            self.unwritten = self.unwritten[written:]
        if self.disk_error is not None:
            sys.stderr.write("sandstorm-shim: journal writable again\n")
            self.disk_error = None

    def acknowledge(self, offset: int) -> None:
        # Nobody can hold more than it was sent: a larger offset is capped, never trusted.
        self.acked = max(self.acked, min(offset, self.sent if self.attached else self.written))
        # Whole segments only, and never the one being written.
        while len(self.segments) > 1 and self.segments[0].end <= self.acked:
            old = self.segments.pop(0)
            os.close(old.fd)
            os.unlink(old.path)

    def stdout_wanted(self) -> bool:
        if self.stdout_r < 0 or self.unwritten:
            return False
        unacked = self.written - self.acked
        if self.status is not None:
            # The runtime is gone: what is left in the pipe is bounded by its capacity.
            return unacked < self.journal_max + 4 * READ_SIZE
        return unacked < self.journal_max

    # ---------------------------------------------------------------- the gateway connection

    def accept(self) -> None:
        try:
            fd, _ = self.listener._accept()  # type: ignore[attr-defined]
        except OSError:
            return
        # A new connection replaces the old one: a restarted gateway reattaches.
        self.drop_conn()
        self.conn = _socket.socket(fileno=fd)
        self.conn.setblocking(False)
        self.conn_since = time.monotonic()
        self.progress = self.conn_since

    def drop_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.conn_in = bytearray()
        self.conn_out = bytearray()
        self.attached = False

    def read_conn(self) -> None:
        assert self.conn is not None
        try:
            data = self.conn.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop_conn()
            return
        self.conn_in += data

    def parse_frames(self) -> None:
        buffer = self.conn_in
        while self.conn is not None and len(buffer) >= HEADER.size:
            kind, _channel, length = HEADER.unpack_from(buffer)
            if length > MAX_FRAME:
                self.drop_conn()
                return
            end = HEADER.size + length
            if len(buffer) < end:
                return
            if kind < RESERVED and self.attached and len(self.stdin_out) >= STDIN_MAX:
                return  # wait for the runtime to take its stdin; the socket is not read meanwhile
            frame = bytes(buffer[:end])
            del buffer[:end]
            self.frame(kind, frame[HEADER.size :], frame)

    def frame(self, kind: int, payload: bytes, frame: bytes) -> None:
        if not self.attached:
            if kind == ATTACH and len(payload) == OFFSET.size:
                self.attach(OFFSET.unpack(payload)[0])
            else:
                self.drop_conn()
        elif kind == ACK and len(payload) == OFFSET.size:
            self.acknowledge(OFFSET.unpack(payload)[0])
        elif kind == STOP:
            self.stop_pending = True
        elif kind == KILL:
            self.kill()
        elif kind >= RESERVED:
            self.drop_conn()
        elif self.stdin_w >= 0 and not self.stop_pending:
            self.stdin_out += frame

    def attach(self, offset: int) -> None:
        first = self.first_offset()
        exited = self.exit_recorded
        status = self.status if exited and self.status is not None else 0
        reply = ATTACHED.pack(
            os.getpid(), self.pid, first, offset, self.written, int(exited), status
        )
        self.conn_out += HEADER.pack(ATTACHED_KIND, 0, len(reply)) + reply
        if not first <= offset <= self.written:
            # Gone already, or never written: the gateway reads the reason from the reply.
            self.flush_conn()
            self.drop_conn()
            return
        self.attached = True
        self.sent = offset
        # Asking from an offset says everything before it is durable on the gateway's side.
        self.acknowledge(offset)

    def flush_conn(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            while self.conn_out:
                del self.conn_out[: conn.send(self.conn_out)]
            while self.attached and self.sent < self.written:
                segment = next(s for s in self.segments if s.start <= self.sent < s.end)
                count = min(segment.end - self.sent, SEND_SIZE)
                sent = os.sendfile(conn.fileno(), segment.fd, self.sent - segment.start, count)
                if sent <= 0:
                    break
                self.sent += sent
                self.progress = time.monotonic()
        except BlockingIOError:
            pass
        except OSError:
            self.drop_conn()

    def close(self) -> None:
        """Close the connection after taking what the gateway sent (closing a Unix socket with
        unread data would turn the end of the stream into ECONNRESET on its side)."""
        conn = self.conn
        if conn is None:
            return
        try:
            for _ in range(64):  # bounded: a gateway that keeps sending is cut off anyway
                if not conn.recv(READ_SIZE):
                    break
        except OSError:
            pass
        self.drop_conn()

    def conn_wants_write(self) -> bool:
        return bool(self.conn_out) or (self.attached and self.sent < self.written)

    # ---------------------------------------------------------------- the runtime

    def flush_stdin(self) -> None:
        if self.stdin_w < 0:
            self.stdin_out.clear()
            return
        try:
            while self.stdin_out:
                del self.stdin_out[: os.write(self.stdin_w, self.stdin_out)]
        except BlockingIOError:
            return
        except OSError:
            self.stdin_out.clear()  # the runtime closed its stdin: nobody will read it
        if not self.stdin_out and (self.stop_pending or self.status is not None):
            os.close(self.stdin_w)
            self.stdin_w = -1

    def kill(self) -> None:
        if self.status is None:
            # (contextlib would be one more import on the cold path)
            try:  # noqa: SIM105
                os.kill(self.pid, SIGKILL)  # not reaped yet, so the pid is still ours
            except OSError:
                pass

    def reap(self) -> None:
        try:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, wait_status = self.pid, 255 << 8
        if pid == 0:
            return
        self.status = os.waitstatus_to_exitcode(wait_status)
        os.close(self.pidfd)
        self.pidfd = -1
        self.drain_until = time.monotonic() + EXIT_DRAIN_S

    def record_exit(self) -> bool:
        # Atomic: a reader sees no file or the whole status. A full disk: retried later.
        tmp = exit_path(self.dir) + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{self.status}\n")
            os.rename(tmp, exit_path(self.dir))
        except OSError as exc:
            sys.stderr.write(f"sandstorm-shim: cannot record the exit status yet: {exc}\n")
            return False
        self.exit_recorded = True
        if self.stdin_w >= 0:
            os.close(self.stdin_w)
            self.stdin_w = -1
        return True

    # ---------------------------------------------------------------- the loop

    def done(self, now: float) -> bool:
        if self.status is None:
            return False
        if not self.exit_recorded:
            if (self.stdout_r >= 0 or self.unwritten) and now < self.drain_until:
                return False
            if self.unwritten or not self.record_exit():
                return False  # the disk refuses it for now: the loop retries
            self.progress = now
        # Deliver the rest to a connected gateway; a stalled or silent one is not waited for.
        if self.conn is None or now - self.progress > LINGER_S:
            return True
        if not self.attached:
            return now - self.conn_since > ATTACH_WAIT_S
        return not self.conn_wants_write()

    def run(self) -> None:
        while True:
            now = time.monotonic()
            if self.unwritten:
                self.write_journal()
            if self.done(now):
                return
            poller = select.poll()
            poller.register(self.listener.fileno(), select.POLLIN)
            if self.stdout_wanted():
                poller.register(self.stdout_r, select.POLLIN)
            if self.pidfd >= 0:
                poller.register(self.pidfd, select.POLLIN)
            if self.stdin_w >= 0 and self.stdin_out:
                poller.register(self.stdin_w, select.POLLOUT)
            if self.conn is not None:
                events = select.POLLOUT if self.conn_wants_write() else 0
                if len(self.conn_in) < HEADER.size + MAX_FRAME:
                    events |= select.POLLIN
                poller.register(self.conn.fileno(), events)
            timeout = None
            if self.status is not None or (self.conn is not None and not self.attached):
                timeout = 200  # ms: re-check the exit deadlines
            if self.unwritten:
                timeout = 500  # ms: retry the journal write
            for fd, _events in poller.poll(timeout):
                if fd == self.pidfd:
                    self.reap()
                elif fd == self.stdout_r:
                    self.read_stdout()
                elif fd == self.stdin_w:
                    self.flush_stdin()
                elif fd == self.listener.fileno():
                    self.accept()
                elif self.conn is not None and fd == self.conn.fileno():
                    self.read_conn()
            if self.conn is not None:
                self.parse_frames()  # also frames held back while stdin was full
            if self.stdin_out or self.stop_pending:
                self.flush_stdin()
            silent = time.monotonic() - self.conn_since > ATTACH_WAIT_S
            if self.conn is not None and not self.attached and self.status is None and silent:
                self.drop_conn()
            self.flush_conn()


def main(args: list[str]) -> int:
    if len(args) < 5 or args[3] != "--":
        sys.stderr.write("usage: main.py DIR JOURNAL_MAX FD -- RUNTIME_ARGV...\n")
        return 2
    shim = Shim(args[0], int(args[1]), int(args[2]), args[4:])
    shim.run()
    shim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
