# mypy: ignore-errors
# ruff: noqa: SIM105, UP031  (contextlib would be one more import; the agent's style)
# Sandstorm python zygote (see "Python zygote" in protocol/agent.md). Standard library only, run
# by the agent as `python3 -c <this source>` so that its interpreter starts exactly like a user's
# `python3 -c CODE` / `python3 FILE` (same flags, site, sys.path, locale, std streams on pipes).
# It never runs user code itself: ahead of each exec it forks an intermediate, which forks the
# standby process that will become the exec and exits, so the exec is re-parented to the agent
# (PID 1) and reaped by it like any other exec (exit status and rusage from the agent's own wait4).
# fd 0 is a SOCK_SEQPACKET socket to the agent. Each standby is given to the agent once forked:
# "S<pid>" with the agent's end of a SOCK_SEQPACKET socket to the standby (SCM_RIGHTS). The agent
# passes an exec's pipes straight to the standby on it (one byte with SCM_RIGHTS [stdin_r,
# stdout_w, stderr_w, err_w]), with the exec's request (argv, env, cwd) already in its stdin, and
# tells this zygote "U" (the standby is used, or gone), and "R" when an exec it served is reaped.
import sys

_BASELINE = frozenset(sys.modules)  # what a fresh interpreter has; the exec gets exactly this

import _socket  # noqa: E402 - after the baseline on purpose
import gc  # noqa: E402
import os  # noqa: E402

_FDS = 4
_REFILL_AFTER_S = 0.05  # quiet time before the next standby is forked


def _read_exact(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            os._exit(0)  # the agent gave up on this exec (fallback or shutdown)
        data += chunk
    return data


def _fail(err_w, message):
    os.write(err_w, message.encode("utf-8", "replace"))
    os._exit(126)


def _execve(argv, env, err_w):
    # Anything this zygote does not reproduce exactly (a directory or zip to run, a .pyc, a
    # file it cannot read) is left to the real interpreter: the process is already set up like
    # a normal exec's, so an execve here is a normal exec. Python ignores SIGPIPE and SIGXFSZ;
    # an exec'd process must get them back at their defaults.
    import _signal

    for signum in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(signum, _signal.SIG_DFL)
    os.set_inheritable(err_w, False)  # received without O_CLOEXEC; EOF at execve = started
    try:
        os.execve(b"/usr/bin/python3", argv, env)
    except OSError as exc:
        _fail(err_w, "python3: %s" % (exc.strerror,))


def _compile(source, filename, err_w):
    try:
        return compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        os.close(err_w)  # started, as python would have been
        # As python reports it: the error's location, no traceback (of this zygote's frames).
        sys.excepthook(type(exc), exc.with_traceback(None), None)
        raise SystemExit(1) from None


def _prepare(fds):
    """In the exec's process: become it, then return (code, globals) for the top level."""
    stdin_r, stdout_w, stderr_w, err_w = fds
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    os.dup2(stdin_r, 0)  # also replaces the agent socket, which was fd 0
    os.dup2(stdout_w, 1)
    os.dup2(stderr_w, 2)
    for fd in (stdin_r, stdout_w, stderr_w):
        if fd > 2:
            os.close(fd)
    size = int.from_bytes(_read_exact(0, 4), "big")
    fields = _read_exact(0, size).split(b"\0")
    cwd, argc = fields[0], int(fields[1])
    argv = fields[2 : 2 + argc]
    env = dict(item.split(b"=", 1) for item in fields[2 + argc :])
    try:
        os.chdir(cwd)
    except OSError as exc:
        _fail(err_w, "cannot change directory to %s: %s" % (os.fsdecode(cwd), exc.strerror))
    os.environb.clear()
    os.environb.update(env)
    main = type(sys)("__main__")
    names = main.__dict__
    names["__annotations__"] = {}
    names["__builtins__"] = sys.modules["builtins"]
    args = [os.fsdecode(a) for a in argv]
    bootstrap = sys.modules["_frozen_importlib"]
    if args[1] == "-c":
        names["__loader__"] = bootstrap.BuiltinImporter
        sys.argv = ["-c", *args[3:]]
        code = _compile(args[2], "<string>", err_w)
    else:
        # As CPython 3.11: __file__ is cwd + name (not normalised), sys.path[0] the directory
        # of the script with symlinks resolved.
        path = args[1] if args[1].startswith("/") else os.getcwd() + "/" + args[1]
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError:
            _execve(argv, env, err_w)
        magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER
        if path.endswith(".pyc") or source[:4] == magic or b"PK\x05\x06" in source:
            _execve(argv, env, err_w)  # compiled code or a zip archive: not source
        if b"\0" in source:
            _execve(argv, env, err_w)  # python's own message for it
        external = sys.modules["_frozen_importlib_external"]
        names["__file__"] = path
        names["__cached__"] = None
        names["__loader__"] = external.SourceFileLoader("__main__", path)
        sys.argv = args[1:]
        sys.path[0] = os.path.dirname(os.path.realpath(path))
        code = _compile(source, path, err_w)
    sys.orig_argv = args
    sys.modules["__main__"] = main
    for name in [n for n in sys.modules if n not in _BASELINE]:
        del sys.modules[name]  # this zygote's own imports: the exec starts with a fresh set
    if "random" in sys.modules:  # not imported at start-up; re-seeded should it ever be
        sys.modules["random"].seed()
    os.close(err_w)  # EOF: the agent reports STARTED
    return code, names


def _fork_standby():
    """Fork, ahead of time, the process that will run the next exec: the forks (the dear part
    of a zygote exec in gVisor) then happen while the sandbox is otherwise idle, not on the
    exec's path. An intermediate forks it and exits, so it is re-parented to the agent (PID 1)
    and reaped by the agent like any other exec. In the zygote returns (pid, the agent's end of
    a socket to it) or (-errno, None); in the standby process returns (0, its own end)."""
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    report_r, report_w = os.pipe()
    # Every object the exec inherits moves to the collector's permanent generation, which no
    # collection walks: the exec's collections (the full ones at its exit included) then leave
    # the inherited pages alone instead of copying each one they touch (a fault each in
    # gVisor). These objects are the interpreter's start-up state, alive until exit.
    gc.freeze()
    try:
        middle = os.fork()
    except OSError as exc:
        for fd in (report_r, report_w):
            os.close(fd)
        ours.close()
        theirs.close()
        return -exc.errno, None
    if middle == 0:
        try:
            child = os.fork()
        except OSError as exc:
            os.write(report_w, b"-%d" % exc.errno)
            os._exit(0)
        if child == 0:
            os.close(report_r)
            os.close(report_w)
            ours.close()
            return 0, theirs
        try:
            os.setpgid(child, child)  # as the agent does: no window without the group
        except OSError:
            pass
        os.write(report_w, b"%d" % child)
        os._exit(0)
    os.close(report_w)
    theirs.close()
    os.waitpid(middle, 0)
    reply = os.read(report_r, 32)
    os.close(report_r)
    pid = int(reply) if reply else -5  # EIO: the intermediate died silently
    if pid <= 0:
        ours.close()
        return pid, None
    return pid, ours


# Compiled, never run, by each standby while it waits: the compiler's first use in a process
# writes to pages it shares with the zygote (each copied on that write, a fault in gVisor) and to
# fresh ones; here that happens off the exec's path.
_WARM_UP = (
    "import sys\n"
    "def f(a, *b, c=1, **d):\n"
    "    return [x for x in b if x], {c: d}, f'{a!r:>4}', lambda: a\n"
    "class C:\n"
    "    pass\n"
    "for i in range(3):\n"
    "    print(f(i), i + 1.5, 'text', b'bytes')\n"
)


def _stand_by(zygote, agent):
    """In the standby process: wait for an exec's pipes from the agent, then become it."""
    zygote.detach()
    os.close(0)  # the zygote's socket to the agent: only the zygote talks on it
    compile(_WARM_UP, "<string>", "exec", dont_inherit=True)
    try:
        _message, fds = _receive(agent)
    except BaseException:
        os._exit(0)
    if len(fds) != _FDS:
        os._exit(0)  # EOF: the agent let this standby go (its zygote is being replaced)
    agent.close()
    return _prepare(fds)


def _receive(sock):
    """One message and the fds that came with it (SCM_RIGHTS)."""
    message, ancillary, _flags, _addr = sock.recvmsg(16, _socket.CMSG_SPACE(_FDS * 4))
    fds = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    return message, fds


def _give(sock, pid, standby):
    """Give the agent a new standby: "S<pid>" with the agent's end of the socket to it. This
    zygote keeps no end (the next standby must not inherit one). True if there was one."""
    if pid <= 0:
        return False
    try:
        array = standby.fileno().to_bytes(4, sys.byteorder)
        sock.sendmsg([b"S%d" % pid], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array)])
    finally:
        standby.close()
    return True


def _serve():
    sock = _socket.socket(fileno=0)
    pid, standby = _fork_standby()
    if pid == 0:
        return _stand_by(sock, standby)
    ready = _give(sock, pid, standby)
    while True:
        # The next standby is forked once the agent has been quiet for a moment after taking
        # one: forking while an exec runs would compete with it for the sandbox's CPU (a fork is
        # the dearest thing gVisor does, with every page it shares copied on the next write).
        sock.settimeout(_REFILL_AFTER_S if not ready else None)
        try:
            message = sock.recv(16)
        except InterruptedError:
            continue
        except TimeoutError:
            message = None  # (forked outside the handler: no exception context for the exec)
        if message == b"":
            os._exit(0)  # the agent is gone
        if message == b"U":
            ready = False  # taken by an exec, or gone
        elif (message is None or message == b"R") and not ready:
            # Quiet for a moment, or "R": the agent reaped an exec a standby served, which no
            # longer competes with the fork.
            pid, standby = _fork_standby()
            if pid == 0:
                return _stand_by(sock, standby)
            ready = _give(sock, pid, standby)


def _uncaught(exc):
    """Report an exception that ended the program as python would, without this frame."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)
    if type(exc) is KeyboardInterrupt:  # exactly: python tests the type, not a subclass
        # CPython exits by SIGINT after finalising, so the parent sees the signal.
        import _signal
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGINT)
    raise SystemExit(1)


# The exec ends through python's own exit, never by os._exit after emulating what a program can
# see of it: no emulation reaches what python's teardown and C's exit() finish for a program
# (C atexit handlers such as HDF5 closing its files, buffered C streams, objects held only by
# interpreter state such as signal handlers and hooks), and a user's data must not be lost.
#
# The names below belong to this zygote's own module, which is frozen with everything else and
# so never collected: it must not keep the exec's globals alive, or python's exit would never
# release them (no __del__, no flush of a file left open).
_code, _globals = _serve()
try:
    exec(_code, _globals)
except SystemExit:
    raise
except BaseException as _exc:
    _uncaught(_exc)
finally:
    _code = _globals = None
