# ruff: noqa: SIM105  (contextlib.suppress would import contextlib on the cold start-up path)
"""Sandstorm in-sandbox agent: PID 1 of every sandbox.

Standard library only, Python 3.9+ syntax (the sandbox image carries Debian's python3). Started as
``/usr/bin/python3 -I -S /.sandstorm/agent.py`` as an unprivileged user with cwd ``/workspace``.
It speaks the framed protocol described in ``protocol/agent.md`` over fd 0 (frames from the
gateway) and fd 1 (frames to the gateway), runs every exec in its own process group and reaps
every child, including orphans it inherits as PID 1.

Start-up is on the cold path of every sandbox, so the module imports as little as possible:
``_signal`` instead of ``signal`` (the latter pulls in ``enum`` and ``functools``), and the C JSON
scanner from ``_json`` instead of the ``json`` package (which pulls in ``re``). The full modules
are only imported as fall-backs, or on error paths.
"""

import errno
import os
import select
import stat  # already loaded by os: free
import struct
import sys
import time

try:  # the C module behind ``signal``: same functions, no enum import (~6 ms saved)
    import _signal as signal
except ImportError:  # pragma: no cover - every CPython has it
    import signal

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size

# Frame kinds (see protocol/agent.md).
HELLO = 1
EXEC = 2
STARTED = 3
STDOUT = 4
STDERR = 5
STDIN = 6
START = -1  # internal: the fd is an exec's start (error) pipe, not a frame kind
ZYGOTE = -2  # internal: the fd is the zygote's socket
STDIN_CLOSE = 7
SIGNAL = 8
EXIT = 9
PING = 10
PONG = 11
ERROR = 12
WRITE_FILE = 13
FILE_WRITTEN = 14
QUIESCE = 15

MAX_GATEWAY_FRAME = 1024 * 1024  # largest payload accepted from the gateway
MAX_PING_PAYLOAD = 64
READ_CHUNK = 64 * 1024  # child output is forwarded in chunks of at most this size
INPUT_CHUNK = 256 * 1024  # one read from fd 0
MAX_STDIN_PENDING = 16 * 1024 * 1024  # per exec; REST stdin is at most 8 MiB
# After the leader is reaped its pipes are drained without waiting for EOF (a background
# grandchild may hold them open forever); this bounds the drain when one keeps writing.
MAX_FINAL_DRAIN = 4 * 1024 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126

# The python zygote (see "Python zygote" in protocol/agent.md).
ZYGOTE_PYTHON = b"/usr/bin/python3"
# The start-up environment it runs with: what the gateway gives every exec (router BASE_ENV).
# A python exec is served by the zygote only if every variable that python reads at start-up
# (see _startup_env) has the same value; anything else falls back to a normal exec.
ZYGOTE_ENV = {
    b"PATH": DEFAULT_PATH.encode(),
    b"HOME": b"/workspace",
    b"LANG": b"C.UTF-8",
    b"PYTHONUNBUFFERED": b"1",
}
ZYGOTE_IDLE_S = 0.2  # started once the agent has been idle this long: never on the cold path
ZYGOTE_LATEST_S = 1.0  # ... or this long after it was wanted, for a sandbox never idle
ZYGOTE_REPLY_S = 2.0  # a zygote that does not report a pid by then (stopped?) is replaced
ZYGOTE_MAX_FAILURES = 5  # early deaths in a row before the agent stops restarting it
MAX_ORPHAN_STATUSES = 256

POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
POLL_EOF = select.POLLHUP | select.POLLERR | select.POLLNVAL

# Signals the agent ignores: code in the sandbox runs as the agent's user and could otherwise
# end PID 1 (and with it the sandbox) by a plain `kill 1`.
_IGNORED_SIGNALS = [
    getattr(signal, name)
    for name in (
        "SIGTERM",
        "SIGINT",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGVTALRM",
        "SIGPROF",
    )
    if hasattr(signal, name)
]
# Dispositions the interpreter or this agent changed; children get them back to the default.
_RESET_SIGNALS = _IGNORED_SIGNALS + [
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGCHLD") if hasattr(signal, name)
]


# --------------------------------------------------------------------------------------------
# JSON: the happy path uses the C scanner/encoder that ``json`` itself uses; anything unusual
# falls back to the real ``json`` module, imported on first need.
# --------------------------------------------------------------------------------------------

_scanner = None
_quote = None
_WS = " \t\n\r"


def _reject_constant(name):
    raise ValueError("non-finite number %s" % name)


def _init_json():
    global _scanner, _quote
    try:
        import _json
    except ImportError:  # pragma: no cover - fall back to the pure-Python package
        _scanner = False
        return

    class _Context(object):
        pass

    ctx = _Context()
    ctx.strict = True
    ctx.object_hook = None
    ctx.object_pairs_hook = None
    ctx.parse_float = float
    ctx.parse_int = int
    ctx.parse_constant = _reject_constant
    ctx.memo = {}
    _scanner = _json.make_scanner(ctx)
    _quote = _json.encode_basestring_ascii


def json_loads(data):
    """Decode a UTF-8 JSON document; raises ValueError (or a subclass) on bad input."""
    text = data.decode("utf-8")
    if _scanner is None:
        _init_json()
    if _scanner:
        try:
            start = len(text) - len(text.lstrip(_WS))
            value, end = _scanner(text, start)
            if text[end:].strip(_WS):
                raise ValueError("extra data")
            return value
        except Exception:
            pass  # let the real decoder produce the diagnostic (or disagree)
    import json

    return json.loads(text)


def _encode(value, out):
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_quote(value))
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("non-finite float")
        out.append(float.__repr__(value))
    elif isinstance(value, dict):
        out.append("{")
        first = True
        for key, item in value.items():
            if not first:
                out.append(",")
            first = False
            out.append(_quote(str(key)))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError("cannot encode %r" % (type(value),))


def json_dumps(value):
    """Encode a JSON document (ASCII only) to bytes."""
    if _scanner is None:
        _init_json()
    if not _scanner:  # pragma: no cover
        import json

        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")
    out = []
    _encode(value, out)
    return "".join(out).encode("ascii")


# --------------------------------------------------------------------------------------------
# Output to the gateway: blocking writes on fd 1 (this is the back-pressure towards children).
# --------------------------------------------------------------------------------------------


class GatewayGone(Exception):
    """fd 1 is closed: nobody is listening any more."""


def send(kind, channel, payload=b""):
    data = HEADER.pack(kind, channel, len(payload)) + payload
    view = memoryview(data)
    while view:
        try:
            written = os.write(1, view)
        except InterruptedError:  # pragma: no cover - PEP 475 retries already
            continue
        except BlockingIOError:
            # Somebody made fd 1 non-blocking (it can share a file description with fd 0):
            # wait for room instead of spinning.
            select.select([], [1], [])
            continue
        except OSError as exc:
            raise GatewayGone(str(exc)) from None
        view = view[written:]


def send_json(kind, channel, obj):
    send(kind, channel, json_dumps(obj))


def send_error(channel, message):
    send_json(ERROR, channel, {"message": message})


# --------------------------------------------------------------------------------------------
# Execs
# --------------------------------------------------------------------------------------------


def exec_pipes(fds):
    """An exec's four pipes (stdin, stdout, stderr, and the start-error pipe), as
    (r, w, r, w, ...). Each fd is added to ``fds`` as soon as it exists, so the caller can close
    them all whatever fails."""
    for _ in range(4):
        fds.extend(os.pipe())
    return fds[-8:]


class Exec(object):
    __slots__ = (
        "channel",
        "close_requested",
        "deadline",
        "held",
        "oom_kills",
        "pending",
        "pid",
        "request",
        "signals",
        "start_error",
        "start_fd",
        "started",
        "stderr_fd",
        "stdin_fd",
        "stdout_fd",
        "zygote",
    )

    def __init__(self, channel):
        self.channel = channel
        self.pid = 0
        self.started = 0.0
        self.stdin_fd = -1
        self.stdout_fd = -1
        self.stderr_fd = -1
        self.pending = bytearray()
        self.close_requested = False
        # The child's close-on-exec error pipe until execve is known to have succeeded or failed.
        self.start_fd = -1
        self.start_error = bytearray()
        # Zygote execs: no pid yet and stdin held back until the zygote reports one.
        self.held = False
        self.request = None  # (argv, env, cwd) to fall back to a normal exec
        self.deadline = 0.0
        self.signals = []  # signals asked for before the pid was known
        self.zygote = False
        # The kernel's OOM-kill count before the process exists (see oom_kill_count).
        self.oom_kills = oom_kill_count()


VMSTAT = "/proc/vmstat"
VMSTAT_MAX = 65536


def oom_kill_count():
    """The kernel's count of OOM kills (``oom_kill`` in /proc/vmstat), or None where there is
    none (gVisor, kernels before 4.13). In a VM it is the guest kernel's own; in a container it
    is the host's, so an OOM kill elsewhere on the host in the same window is counted too."""
    try:
        fd = os.open(VMSTAT, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, VMSTAT_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)
    start = data.find(b"\noom_kill ")
    if start < 0:
        return None
    end = data.find(b"\n", start + 1)
    try:
        return int(data[start + 10 : end if end >= 0 else len(data)])
    except ValueError:
        return None


class ExecRequestError(Exception):
    pass


def _str_list(value, what):
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ExecRequestError("%s must be a list of strings" % what)
    for item in value:
        if "\0" in item:
            raise ExecRequestError("%s contains a NUL character" % what)
    return value


def parse_exec(payload):
    request = json_loads(payload)
    if not isinstance(request, dict):
        raise ExecRequestError("EXEC payload must be a JSON object")
    argv = _str_list(request.get("argv"), "argv")
    if not argv or not argv[0]:
        raise ExecRequestError("argv must be non-empty")
    env = request.get("env")
    if not isinstance(env, dict):
        raise ExecRequestError("env must be an object of strings")
    for key, value in env.items():
        if not isinstance(value, str):
            raise ExecRequestError("env values must be strings")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ExecRequestError("invalid environment variable name %r" % (key,))
    cwd = request.get("cwd")
    if not isinstance(cwd, str) or not cwd or "\0" in cwd:
        raise ExecRequestError("cwd must be a non-empty string")
    last = request.get("last", False)
    if not isinstance(last, bool):
        raise ExecRequestError("last must be a boolean")
    # Encode once in the parent so the forked child does as little as possible.
    try:
        argv_b = [os.fsencode(arg) for arg in argv]
        env_b = dict((os.fsencode(k), os.fsencode(v)) for k, v in env.items())
        cwd_b = os.fsencode(cwd)
    except UnicodeError:
        raise ExecRequestError("argv, env and cwd must be encodable") from None
    return argv_b, env_b, cwd_b, last


def _candidates(file, env):
    if b"/" in file:
        return [file]
    path = env.get(b"PATH")
    if path is None:
        path = os.fsencode(DEFAULT_PATH)
    result = []
    for directory in path.split(b":"):
        result.append((directory or b".").rstrip(b"/") + b"/" + file)
    return result


def _runnable(path):
    """A regular file this process may execute (what execve needs, short of its format)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and os.access(path, os.X_OK)
    except (OSError, ValueError):
        return False


def _startup_env(env):
    """The variables python reads while starting (locale, user site via HOME, PYTHON*)."""
    return dict(
        (k, v)
        for k, v in env.items()
        if k in (b"HOME", b"LANG") or k.startswith(b"PYTHON") or k.startswith(b"LC_")
    )


_ZYGOTE_STARTUP = _startup_env(ZYGOTE_ENV)


def zygote_can_serve(argv, env):
    """True for exactly the python command lines the zygote reproduces: ``python3 -c CODE
    [args]`` and ``python3 FILE [args]`` resolving to the zygote's interpreter, with the
    zygote's start-up environment. Everything else is a normal exec."""
    if len(argv) < 2 or os.path.basename(argv[0]) != b"python3":
        return False
    if argv[1] == b"-c":
        if len(argv) < 3:
            return False
    elif not argv[1] or argv[1].startswith(b"-"):
        return False  # other flags, or "-" (stdin)
    if _startup_env(env) != _ZYGOTE_STARTUP:
        return False
    # The interpreter execvpe would run, and the sys.executable python would compute.
    for candidate in _candidates(argv[0], env):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate == ZYGOTE_PYTHON
    return False


def zygote_request(argv, env, cwd):
    """What a zygote exec reads from its stdin before anything else: length, then
    cwd, argc, argv and env NUL-separated (none of them can hold a NUL)."""
    fields = [cwd, b"%d" % len(argv)] + list(argv) + [k + b"=" + v for k, v in env.items()]
    body = b"\0".join(fields)
    return len(body).to_bytes(4, "big") + body


def _child(argv, env, cwd, stdin_r, stdout_w, stderr_w, err_w):
    """Runs in the forked child; never returns."""
    code = EXIT_CANNOT_EXECUTE
    try:
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass
        for signum in _RESET_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # dup2 makes fds 0-2 inheritable; every other fd of the agent is close-on-exec.
        os.dup2(stdin_r, 0)
        os.dup2(stdout_w, 1)
        os.dup2(stderr_w, 2)
        try:
            os.chdir(cwd)
        except OSError as exc:
            message = "cannot change directory to %s: %s" % (
                os.fsdecode(cwd),
                exc.strerror or exc,
            )
            os.write(err_w, message.encode("utf-8", "replace"))
            os._exit(EXIT_CANNOT_EXECUTE)
        saved = None
        last = None
        for candidate in _candidates(argv[0], env):
            try:
                os.execve(candidate, argv, env)
            except OSError as exc:
                last = exc
                if exc.errno == errno.EACCES and saved is None:
                    saved = exc
        failure = saved or last
        if failure is None or failure.errno in (errno.ENOENT, errno.ENOTDIR):
            code = EXIT_NOT_FOUND
            message = "%s: command not found" % os.fsdecode(argv[0])
        else:
            message = "%s: %s" % (os.fsdecode(argv[0]), failure.strerror or failure)
        os.write(err_w, message.encode("utf-8", "replace"))
    except BaseException as exc:  # never let the child fall back into the agent loop
        try:
            os.write(err_w, ("exec failed: %r" % (exc,)).encode("utf-8", "replace"))
        except BaseException:
            pass
    finally:
        os._exit(code)


class Agent(object):
    def __init__(self):
        self.execs = {}  # channel -> Exec, running only
        self.leaders = {}  # pid -> Exec
        self.used_channels = set()
        self.finished_pgids = set()  # groups that may still hold background processes
        self.fd_owner = {}  # fd -> (Exec, kind) for polled child pipes
        self.poller = select.poll()
        self.inbuf = bytearray()
        self.skip = 0  # bytes of an oversized frame still to discard
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # The python zygote: its pid and socket while it runs, execs waiting for its reply.
        self.zygote_enabled = os.environ.get("SANDSTORM_ZYGOTE", "1") != "0"
        self.zygote_pid = 0
        self.zygote_standby = 0  # the process it forked for the next exec, once it says so
        self.zygote_sock = None
        self.zygote_started = 0.0
        self.zygote_waiting = []  # Execs in the order they were sent (the zygote keeps it)
        self.zygote_failures = 0
        self.zygote_due = time.monotonic() + ZYGOTE_IDLE_S
        self.zygote_latest = time.monotonic() + ZYGOTE_LATEST_S
        self.zygote_source = None
        # Exit statuses of pids reaped before anyone claimed them, for a zygote exec whose pid
        # report comes after its death (only possible if something else killed it early).
        self.orphans = {}
        # The agent's own directory, to return to after starting an exec in its cwd (a path,
        # not a held fd: PID 1 keeps no descriptor of the filesystem).
        self.home = os.getcwd()

    # -- setup -------------------------------------------------------------------------------

    def install_signals(self):
        for signum in _IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, self._on_sigchld)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.poller.register(0, POLLIN)
        self.poller.register(self.wake_r, POLLIN)

    @staticmethod
    def _on_sigchld(signum, frame):
        # The wake-up fd carries the news; reaping happens in the main loop.
        pass

    # -- main loop ---------------------------------------------------------------------------

    def run(self):
        self.reap()  # children we inherited before the handler was installed
        while True:
            try:
                events = self.poller.poll(self.poll_timeout())
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue
            self.zygote_tick()
            for fd, _mask in events:
                if fd == 0:
                    if not self.read_gateway():
                        return
                elif fd == self.wake_r:
                    self.drain_wakeups()
                    self.reap()
                else:
                    owner = self.fd_owner.get(fd)
                    if owner is None:
                        continue  # closed earlier in this batch
                    ex, kind = owner
                    if kind == ZYGOTE:
                        self.zygote_reply()
                    elif ex.held:
                        # Waiting for the zygote's reply, which follows at once: an EOF here is
                        # the zygote closing its copies after an EAGAIN, not the exec's start.
                        continue
                    elif kind == STDIN:
                        self.flush_stdin(ex)
                    elif kind == START:
                        self.check_start(ex)
                    else:
                        if ex.start_fd >= 0:
                            # Output means the child has exec'd, so its start pipe is at EOF:
                            # settle STARTED first, keeping STARTED before any output.
                            self.check_start(ex)
                        self.forward_output(ex, fd, kind)

    def drain_wakeups(self):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- the python zygote -------------------------------------------------------------------

    def poll_timeout(self):
        """Milliseconds until the zygote needs attention (a start or a reply deadline)."""
        if self.zygote_waiting:
            due = self.zygote_waiting[0].deadline
        elif self.zygote_wanted() and not self.execs:
            due = self.zygote_due
        else:
            return None
        return max(0, int((due - time.monotonic()) * 1000) + 1)

    def zygote_wanted(self):
        return (
            self.zygote_enabled
            and self.zygote_sock is None
            and self.zygote_failures < ZYGOTE_MAX_FAILURES
        )

    def zygote_busy(self):
        """Activity postpones the zygote's start (it would compete for the CPU), up to a
        limit."""
        if self.zygote_sock is None:
            later = min(time.monotonic() + ZYGOTE_IDLE_S, self.zygote_latest)
            self.zygote_due = max(self.zygote_due, later)

    def zygote_tick(self):
        now = time.monotonic()
        if self.zygote_waiting and now >= self.zygote_waiting[0].deadline:
            self.zygote_gone()  # stopped or wedged: replace it; what waits falls back
        elif self.zygote_wanted() and not self.execs and now >= self.zygote_due:
            # Never while an exec runs: on a loaded host the zygote's start would take CPU
            # from that exec, for execs that may never come.
            self.start_zygote()

    def start_zygote(self):
        import _socket

        if self.zygote_source is None:
            if os.getpid() != 1:
                _become_subreaper()  # outside a sandbox (tests): orphans must still be ours
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote.py")
            try:
                with open(path, "rb") as f:
                    self.zygote_source = f.read()
            except OSError:
                self.zygote_enabled = False
                return
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        fds = []
        try:
            null_r, null_w = os.pipe()
            fds += [null_r, null_w]
            err_r, err_w = os.pipe()
            fds += [err_r, err_w]
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            argv = [ZYGOTE_PYTHON, b"-c", self.zygote_source]
            _child(argv, ZYGOTE_ENV, b"/", theirs.fileno(), null_w, null_w, err_w)
        theirs.close()
        for fd in fds:
            os.close(fd)  # its stdout/stderr lead nowhere: it never writes there
        if pid < 0:
            ours.close()
            self.zygote_failures += 1
            self.zygote_due = time.monotonic() + ZYGOTE_IDLE_S * (1 << self.zygote_failures)
            return
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        ours.setblocking(False)
        self.zygote_pid = pid
        self.zygote_sock = ours
        self.zygote_started = time.monotonic()
        self.fd_owner[ours.fileno()] = (None, ZYGOTE)
        self.poller.register(ours.fileno(), POLLIN)

    def zygote_gone(self, failed=True):
        """The zygote died, closed its socket or stopped answering (``failed``), or a checkpoint
        is coming (not failed): kill it and its standby, run what waited for it as normal
        execs, and start a new one later."""
        sock = self.zygote_sock
        if sock is not None:
            self.poller.unregister(sock.fileno())
            del self.fd_owner[sock.fileno()]
            sock.close()
            self.zygote_sock = None
        for pid in (self.zygote_pid, self.zygote_standby):
            if pid:
                try:
                    # Each leads its own group; both are our children, not reaped yet.
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.zygote_pid and failed:
            self.zygote_failures += 1  # reset by every exec it serves
        self.zygote_pid = self.zygote_standby = 0
        self.zygote_due = time.monotonic() + ZYGOTE_IDLE_S * (1 << self.zygote_failures)
        self.zygote_latest = self.zygote_due + ZYGOTE_LATEST_S
        waiting, self.zygote_waiting = self.zygote_waiting, []
        for ex in waiting:
            self.zygote_fallback(ex)

    def quiesce(self):
        """QUIESCE, before a checkpoint: the zygote and its standby are two python processes
        that would more than double the snapshot (and its time). The gateway follows with a
        PING, so its PONG says they are killed. The zygote starts again once idle, as always."""
        if self.zygote_sock is not None or self.zygote_pid:
            self.zygote_gone(failed=False)

    def zygote_reply(self):
        try:
            message = self.zygote_sock.recv(32)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if message[:1] == b"S":  # "S<pid>": the standby it forked for the next exec
            try:
                self.zygote_standby = max(0, int(message[1:]))
            except ValueError:
                self.zygote_gone()
            return
        if not message or not self.zygote_waiting:
            self.zygote_gone()  # EOF, or a reply nobody asked for
            return
        ex = self.zygote_waiting.pop(0)
        try:
            pid = int(message)
        except ValueError:
            pid = -1
        if pid == self.zygote_standby:
            self.zygote_standby = 0  # an exec now, not the zygote's
        if pid <= 0:
            self.zygote_fallback(ex)  # it could not fork: "-errno"
            return
        self.zygote_failures = 0
        ex.pid = pid
        ex.held = False
        ex.zygote = True
        self.leaders[pid] = ex
        # The process is waiting for its request on stdin: it goes ahead of any input.
        ex.pending[0:0] = zygote_request(*ex.request)
        ex.request = None
        self.deliver_signals(ex)
        early = self.orphans.pop(pid, None)
        if early is not None:  # killed before it could read its request
            del self.leaders[pid]
            self.finish(ex, early[0], early[1])
            return
        self.flush_stdin(ex)

    def zygote_fallback(self, ex):
        """Run an exec the zygote did not take as a normal exec: same channel and input."""
        argv, env, cwd = ex.request
        ex.request = None
        ex.held = False
        if ex.stdout_fd >= 0:
            self.close_output(ex, ex.stdout_fd, STDOUT)
        if ex.stderr_fd >= 0:
            self.close_output(ex, ex.stderr_fd, STDERR)
        for fd in (ex.start_fd, ex.stdin_fd):
            if fd >= 0:
                if fd in self.fd_owner:
                    del self.fd_owner[fd]
                    self.poller.unregister(fd)
                os.close(fd)
        ex.start_fd = ex.stdin_fd = -1
        self.spawn(ex.channel, argv, env, cwd, ex)

    def spawn_zygote(self, channel, argv, env, cwd):
        import _socket

        fds = []
        try:
            stdin_r, _, _, stdout_w, _, stderr_w, _, err_w = exec_pipes(fds)
            passed = b"".join(
                fd.to_bytes(4, sys.byteorder) for fd in (stdin_r, stdout_w, stderr_w, err_w)
            )
            self.zygote_sock.sendmsg([b"x"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, passed)])
        except OSError:
            for fd in fds:
                os.close(fd)
            self.zygote_gone()
            self.spawn(channel, argv, env, cwd)
            return
        ex = Exec(channel)
        ex.held = True
        ex.request = (argv, env, cwd)
        self.zygote_waiting.append(ex)
        self.track(ex, 0, time.monotonic(), fds)
        ex.deadline = ex.started + ZYGOTE_REPLY_S

    def deliver_signals(self, ex):
        signals, ex.signals = ex.signals, []
        for signum in signals:
            try:
                os.killpg(ex.pid, signum)
            except OSError:
                pass

    # -- frames from the gateway -------------------------------------------------------------

    def read_gateway(self):
        """Read what fd 0 has; dispatch complete frames. Returns False on EOF."""
        try:
            data = os.read(0, INPUT_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
        buf = self.inbuf
        buf += data
        offset = 0
        size = len(buf)
        while size - offset >= HEADER_SIZE:
            kind, channel, length = HEADER.unpack_from(buf, offset)
            if length > MAX_GATEWAY_FRAME:
                send_error(
                    0,
                    "frame of kind %d is %d bytes, limit is %d" % (kind, length, MAX_GATEWAY_FRAME),
                )
                offset += HEADER_SIZE
                available = min(length, size - offset)
                offset += available
                self.skip = length - available
                continue
            end = offset + HEADER_SIZE + length
            if end > size:
                break
            payload = bytes(buf[offset + HEADER_SIZE : end])
            offset = end
            try:
                self.dispatch(kind, channel, payload)
            except GatewayGone:
                raise
            except Exception as exc:  # one bad frame must never take PID 1 down
                send_error(0, "internal error handling frame of kind %d: %r" % (kind, exc))
        del buf[:offset]
        return True

    def dispatch(self, kind, channel, payload):
        if kind == STDIN:
            self.on_stdin(channel, payload)
        elif kind == EXEC:
            self.on_exec(channel, payload)
        elif kind == STDIN_CLOSE:
            self.on_stdin_close(channel)
        elif kind == SIGNAL:
            self.on_signal(channel, payload)
        elif kind == PING:
            if len(payload) > MAX_PING_PAYLOAD:
                send_error(
                    0, "PING payload is %d bytes, limit is %d" % (len(payload), MAX_PING_PAYLOAD)
                )
            else:
                send(PONG, channel, payload)
        elif kind == WRITE_FILE:
            self.on_write_file(channel, payload)
        elif kind == QUIESCE:
            self.quiesce()
        else:
            send_error(0, "unknown frame kind %d" % kind)

    def on_exec(self, channel, payload):
        if channel == 0:
            send_error(0, "EXEC on channel 0 is not allowed")
            return
        if channel in self.used_channels:
            if channel in self.execs:
                send_error(channel, "channel %d is already in use" % channel)
            else:
                send_error(0, "channel %d was already used" % channel)
            return
        self.used_channels.add(channel)
        try:
            argv, env, cwd, last = parse_exec(payload)
        except Exception as exc:  # malformed JSON or schema: finish the channel anyway
            send_error(channel, "invalid EXEC request: %s" % (exc,))
            self.send_exit_without_child(channel)
            return
        if last:
            # The gateway ends the sandbox after this exec: a zygote would serve nobody.
            self.zygote_enabled = False
        self.zygote_busy()
        if self.zygote_sock is not None and zygote_can_serve(argv, env):
            self.spawn_zygote(channel, argv, env, cwd)
        else:
            self.spawn(channel, argv, env, cwd)

    def send_exit_without_child(self, channel):
        send_json(
            EXIT,
            channel,
            {
                "exit_code": EXIT_CANNOT_EXECUTE,
                "signal": None,
                "cpu_time_ms": 0.0,
                "max_rss_bytes": 0,
                "duration_ms": 0.0,
            },
        )

    def spawn(self, channel, argv, env, cwd, ex=None):
        """A normal exec: fork and execve. ``ex`` is an exec the zygote did not take."""
        fresh = ex is None
        if fresh:
            ex = Exec(channel)  # before the fork: it reads the OOM-kill count
        fds = []
        try:
            stdin_r, _, _, stdout_w, _, stderr_w, _, err_w = exec_pipes(fds)
            started = time.monotonic()
            pid = self.spawn_direct(argv, env, cwd, stdin_r, stdout_w, stderr_w)
            if not pid:
                pid = os.fork()  # the exact error (or a program posix_spawn cannot start)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            if not fresh:
                self.execs.pop(channel, None)
            send_error(channel, "cannot start process: %s" % (exc.strerror or exc,))
            self.send_exit_without_child(channel)
            return
        if pid == 0:
            _child(argv, env, cwd, stdin_r, stdout_w, stderr_w, err_w)
        try:
            os.setpgid(pid, pid)  # also in the parent: no window where signals miss the group
        except OSError:
            pass  # already exec'd (EACCES) or already gone (ESRCH): the child did it
        if fresh:
            self.track(ex, pid, started, fds)
            return
        # A fallback from the zygote: its input and signals were held for it; its duration
        # counts from the request.
        self.track(ex, pid, ex.started, fds)
        self.deliver_signals(ex)
        self.flush_stdin(ex)
        if ex.close_requested and not ex.pending:
            self.close_stdin(ex)

    def spawn_direct(self, argv, env, cwd, stdin_r, stdout_w, stderr_w):
        """Start an exec with posix_spawn: vfork semantics, so no copy of the agent's address
        space (in gVisor a fork is the dearest part of an exec: here /bin/true costs 4 ms this
        way against 14-21 ms by fork + execve). The child is set up exactly as ``_child``
        does it. Returns its pid, or 0 when it did not start (cwd or every PATH candidate
        failed): the fork path then reproduces the failure and its exact message."""
        try:
            os.chdir(cwd)  # posix_spawn has no chdir; the agent is single-threaded
        except OSError:
            return 0
        try:
            # Only the candidate execvpe would run: in gVisor every failed attempt still costs
            # a vfork (about 3 ms), and a PATH search fails on most directories.
            for candidate in _candidates(argv[0], env):
                if not _runnable(candidate):
                    continue
                try:
                    return os.posix_spawn(
                        candidate,
                        argv,
                        env,
                        file_actions=[
                            (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                            (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                            (os.POSIX_SPAWN_DUP2, stderr_w, 2),
                        ],
                        setpgroup=0,
                        setsigmask=(),
                        setsigdef=_RESET_SIGNALS,
                    )
                except OSError:
                    return 0  # not a program it can start (ENOEXEC, ...): the fork path says why
            return 0
        finally:
            try:
                os.chdir(self.home)
            except OSError:
                os.chdir("/")  # code in the sandbox removed it; nothing relies on it

    def track(self, ex, pid, started, fds):
        """Keep the parent's ends of an exec's pipes (``fds`` as os.pipe() pairs: stdin,
        stdout, stderr, start) and close the child's."""
        stdin_r, stdin_w, stdout_r, stdout_w, stderr_r, stderr_w, err_r, err_w = fds
        for fd in (stdin_r, stdout_w, stderr_w, err_w):
            os.close(fd)
        ex.pid = pid
        ex.started = started
        self.execs[ex.channel] = ex
        if pid:
            self.leaders[pid] = ex
        for fd in (stdin_w, stdout_r, stderr_r, err_r):
            os.set_blocking(fd, False)
        ex.stdin_fd = stdin_w
        ex.stdout_fd = stdout_r
        ex.stderr_fd = stderr_r
        self.fd_owner[stdout_r] = (ex, STDOUT)
        self.fd_owner[stderr_r] = (ex, STDERR)
        self.poller.register(stdout_r, POLLIN)
        self.poller.register(stderr_r, POLLIN)
        # The error pipe is close-on-exec: EOF means execve succeeded, data means it failed.
        # It is watched by the main loop, never read blocking: code in the sandbox can stop the
        # child before it execs, and PID 1 must not wait on it.
        ex.start_fd = err_r
        self.fd_owner[err_r] = (ex, START)
        self.poller.register(err_r, POLLIN)

    def check_start(self, ex):
        """Read the error pipe; on EOF report STARTED, or the exec failure (ERROR)."""
        fd = ex.start_fd
        if fd < 0:
            return
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                return  # not decided yet
            except InterruptedError:  # pragma: no cover
                continue
            if not chunk:
                break
            ex.start_error += chunk
        self.poller.unregister(fd)
        del self.fd_owner[fd]
        os.close(fd)
        ex.start_fd = -1
        if ex.start_error:
            # Exec failed: no STARTED; the child exits 126/127 and is reaped like any other.
            self.close_stdin(ex)
            send_error(ex.channel, bytes(ex.start_error).decode("utf-8", "replace"))
        else:
            send_json(STARTED, ex.channel, {"pid": ex.pid, "zygote": ex.zygote})

    # -- stdin -------------------------------------------------------------------------------

    def on_stdin(self, channel, payload):
        ex = self.execs.get(channel)
        if ex is None or ex.stdin_fd < 0 or ex.close_requested or not payload:
            return  # unknown, finished or closed: ignored (the gateway validates)
        room = MAX_STDIN_PENDING - len(ex.pending)
        if len(payload) > room:
            payload = payload[:room]
            send_error(channel, "stdin buffer full")
        if not payload:
            return
        had_pending = bool(ex.pending)
        ex.pending += payload
        if not had_pending:
            self.flush_stdin(ex)

    def on_stdin_close(self, channel):
        ex = self.execs.get(channel)
        if ex is None or ex.stdin_fd < 0:
            return
        ex.close_requested = True
        if not ex.pending and not ex.held:
            self.close_stdin(ex)

    def flush_stdin(self, ex):
        """Write as much pending input as the pipe takes; poll for POLLOUT if some remains."""
        fd = ex.stdin_fd
        if fd < 0 or ex.held:
            return  # a zygote exec's input waits behind its request
        registered = fd in self.fd_owner
        while ex.pending:
            try:
                written = os.write(fd, ex.pending)
            except BlockingIOError:
                break
            except OSError:
                # EPIPE: the child closed its stdin (or exited); the input is undeliverable.
                del ex.pending[:]
                self.close_stdin(ex)
                return
            del ex.pending[:written]
        if ex.pending:
            if not registered:
                self.fd_owner[fd] = (ex, STDIN)
                self.poller.register(fd, POLLOUT)
            return
        if registered:
            del self.fd_owner[fd]
            self.poller.unregister(fd)
        if ex.close_requested:
            self.close_stdin(ex)

    def close_stdin(self, ex):
        fd = ex.stdin_fd
        if fd < 0:
            return
        if fd in self.fd_owner:
            del self.fd_owner[fd]
            self.poller.unregister(fd)
        ex.stdin_fd = -1
        del ex.pending[:]
        os.close(fd)

    # -- signals -----------------------------------------------------------------------------

    def on_signal(self, channel, payload):
        try:
            request = json_loads(payload)
        except ValueError as exc:
            send_error(0, "malformed SIGNAL payload: %s" % (exc,))
            return
        signum = request.get("signal") if isinstance(request, dict) else None
        if not isinstance(signum, int) or isinstance(signum, bool) or not 0 < signum < 65:
            send_error(0, 'SIGNAL needs {"signal": 1..64}, got %r' % (request,))
            return
        ex = self.execs.get(channel)
        if ex is None:
            return  # unknown or finished exec: ignored
        if not ex.pid:
            ex.signals.append(signum)  # the zygote has not reported its pid yet
            return
        try:
            os.killpg(ex.pid, signum)
        except ProcessLookupError:
            pass
        except OSError as exc:
            send_error(channel, "cannot send signal %d: %s" % (signum, exc.strerror or exc))

    # -- output ------------------------------------------------------------------------------

    def forward_output(self, ex, fd, kind):
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            send(kind, ex.channel, data)
        else:
            self.close_output(ex, fd, kind)

    def close_output(self, ex, fd, kind):
        if fd in self.fd_owner:
            del self.fd_owner[fd]
            self.poller.unregister(fd)
        if kind == STDOUT:
            ex.stdout_fd = -1
        else:
            ex.stderr_fd = -1
        os.close(fd)

    def drain_output(self, ex, fd, kind):
        """Forward what is buffered in a pipe now, without waiting for EOF."""
        budget = MAX_FINAL_DRAIN
        while budget > 0:
            try:
                data = os.read(fd, min(READ_CHUNK, budget))
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            budget -= len(data)
            send(kind, ex.channel, data)

    # -- reaping -----------------------------------------------------------------------------

    def reap(self):
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:  # pragma: no cover
                continue
            if pid == 0:
                return
            if pid == self.zygote_pid:
                self.zygote_gone()
                continue
            if pid == self.zygote_standby:
                self.zygote_standby = 0  # reaped: its pid may be reused, never to be killed
            ex = self.leaders.pop(pid, None)
            if ex is not None:
                self.finish(ex, status, usage)
            elif self.zygote_waiting:
                # Maybe a zygote exec killed before its pid report was read: keep the status.
                if len(self.orphans) >= MAX_ORPHAN_STATUSES:
                    del self.orphans[next(iter(self.orphans))]
                self.orphans[pid] = (status, usage)
            # any other pid is an orphan we inherited as PID 1: reaped, nothing else to do

    def finish(self, ex, status, usage):
        duration_ms = (time.monotonic() - ex.started) * 1000.0
        # The child is gone, so its error pipe is closed: settle STARTED / ERROR before EXIT.
        self.check_start(ex)
        if ex.stdout_fd >= 0:
            self.drain_output(ex, ex.stdout_fd, STDOUT)
        if ex.stderr_fd >= 0:
            self.drain_output(ex, ex.stderr_fd, STDERR)
        oom_killed = False
        if os.WIFSIGNALED(status):
            exit_code = None
            signum = os.WTERMSIG(status)
            # The kernel's OOM killer ends a process with SIGKILL: if the kernel counted an OOM
            # kill while this exec ran, the SIGKILL was (most likely) that one.
            if signum == signal.SIGKILL and ex.oom_kills is not None:
                now = oom_kill_count()
                oom_killed = now is not None and now > ex.oom_kills
        else:
            exit_code = os.WEXITSTATUS(status)
            signum = None
        send_json(
            EXIT,
            ex.channel,
            {
                "exit_code": exit_code,
                "signal": signum,
                "cpu_time_ms": round((usage.ru_utime + usage.ru_stime) * 1000.0, 3),
                "max_rss_bytes": max(0, int(usage.ru_maxrss)) * 1024,
                "duration_ms": round(duration_ms, 3),
                "oom_killed": oom_killed,
            },
        )
        self.execs.pop(ex.channel, None)
        self.zygote_busy()
        self.close_stdin(ex)
        if ex.stdout_fd >= 0:
            self.close_output(ex, ex.stdout_fd, STDOUT)
        if ex.stderr_fd >= 0:
            self.close_output(ex, ex.stderr_fd, STDERR)
        self.finished_pgids.add(ex.pid)

    # -- files -------------------------------------------------------------------------------

    def on_write_file(self, channel, payload):
        try:
            self.write_file(payload)
        except Exception as exc:
            error = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
            filename = getattr(exc, "filename", None)
            if filename:
                error = "%s: %s" % (error, filename)
            send_json(FILE_WRITTEN, channel, {"ok": False, "error": error})
        else:
            send_json(FILE_WRITTEN, channel, {"ok": True, "error": None})

    def write_file(self, payload):
        import binascii  # C module, only needed here (base64 would pull in more)

        request = json_loads(payload)
        if not isinstance(request, dict):
            raise ValueError("WRITE_FILE payload must be a JSON object")
        path = request.get("path")
        data_b64 = request.get("data_b64")
        mode = request.get("mode", 0o644)
        append = request.get("append", False)
        if not isinstance(append, bool):
            raise ValueError("append must be a boolean")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ValueError("path must be an absolute path")
        if not isinstance(data_b64, str):
            raise ValueError("data_b64 must be a string")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise ValueError("mode must be an integer in 0..0o7777")
        raw = data_b64.encode("ascii", "replace")
        if len(raw) % 4 or raw.translate(None, _B64_ALPHABET):
            raise ValueError("data_b64 is not valid base64")
        data = binascii.a2b_base64(raw)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, 0o755, exist_ok=True)
        # Large files arrive as a first frame then appended chunks (one frame is at most 1 MiB).
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_APPEND if append else os.O_TRUNC
        fd = os.open(path, flags, mode)
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask and ignored if it exists
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    # -- shutdown ----------------------------------------------------------------------------

    def shutdown(self):
        """Gateway gone: kill every exec's process group, reap briefly, return."""
        groups = set(self.finished_pgids)
        groups.update(ex.pid for ex in self.execs.values())
        groups.add(self.zygote_pid)
        groups.discard(0)  # an exec still waiting for the zygote; killpg(0) would be ours
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 0.5
        while self.leaders and time.monotonic() < deadline:
            try:
                pid, _status, _usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.005)
            else:
                self.leaders.pop(pid, None)
        try:  # whatever else already exited
            while os.wait4(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _become_subreaper():
    """Orphans (zygote execs, once their intermediate exits) come to us, not to init. PID 1
    gets them anyway; outside a sandbox (tests) this asks for the same."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def _close_inherited_on_exec():
    """Mark fds > 2 inherited from our parent close-on-exec so children only see 0-2."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        try:
            fd = int(name)
            if fd > 2:
                os.set_inheritable(fd, False)
        except (ValueError, OSError):
            pass  # includes the directory fd listdir used, already closed


def main():
    # Readiness first: the gateway waits for HELLO, so send it before anything slow.
    version = "%d.%d.%d" % sys.version_info[:3]
    try:
        send(
            HELLO,
            0,
            (
                '{"protocol":%d,"pid":%d,"python":"%s"}' % (PROTOCOL_VERSION, os.getpid(), version)
            ).encode("ascii"),
        )
    except GatewayGone:
        return 1
    _close_inherited_on_exec()
    _init_json()
    agent = Agent()
    agent.install_signals()
    try:
        agent.run()
    except GatewayGone:
        pass
    agent.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
