"""The python zygote in the real agent, run as a host subprocess: a python exec it serves must be
indistinguishable from a normal one (compared side by side), and anything it cannot reproduce
exactly falls back to a normal exec without the caller noticing."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import trio

from sandstorm.agent import FrameKind, decode_started
from tests.unit.agent.running import Agent, Result, proc_stat, running_agent, stop

ZYGOTE_PYTHON = "/usr/bin/python3"
# The start-up environment the zygote runs with (the gateway's BASE_ENV), plus a variable
# python does not read at start-up: it must reach the exec all the same.
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/workspace",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "USER": "sandbox",
    "GREETING": "hi",
}
TIMEOUT = 20

pytestmark = pytest.mark.skipif(
    not os.access(ZYGOTE_PYTHON, os.X_OK), reason="the zygote runs the image's /usr/bin/python3"
)

# Everything about the interpreter state an exec could observe.
PROBE = r"""
import os, sys, json, signal
print(json.dumps({
    "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0], "path": sys.path,
    "executable": sys.executable, "name": __name__, "file": globals().get("__file__"),
    "globals": sorted(globals()), "loader": type(__loader__).__name__ if __loader__ else None,
    "modules": sorted(m for m in sys.modules if m not in ("json", "json.decoder",
        "json.scanner", "json.encoder", "re", "enum", "functools", "signal")),
    "env": dict(os.environ), "cwd": os.getcwd(), "flags": list(sys.flags),
    "pgid_is_pid": os.getpgrp() == os.getpid(), "ppid": os.getppid(),
    "fds": sorted(os.listdir("/proc/self/fd")), "umask": os.umask(0o22),
    "mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "handlers": {s.name: str(signal.getsignal(s)) for s in
                 (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGCHLD)},
    "encoding": [sys.stdin.encoding, sys.stdout.encoding, sys.getfilesystemencoding()],
    "buffered": [sys.stdout.line_buffering, sys.stdout.write_through],
    "limits": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE),
    "uid": [os.getuid(), os.getgid()], "stdin": sys.stdin.read(),
}, sort_keys=True))
"""


async def run(agent: Agent, argv: list[str], *, cwd: str | Path = "/", stdin: bytes = b"",
              env: dict[str, str] | None = None) -> tuple[Result, bool]:  # fmt: skip
    """Run an exec; returns its result and whether the zygote served it."""
    number = await agent.start(argv, env=ENV if env is None else env, cwd=cwd)
    await agent.channel.send_stdin(number, stdin) if stdin else None
    await agent.channel.send_stdin_close(number)
    result = await agent.finish(number)
    started = [f for f in agent.log if f.channel == number and f.kind is FrameKind.STARTED]
    zygote = bool(started) and json.loads(started[0].payload).get("zygote", False)
    return result, zygote


REFILLED_S = 0.3  # the zygote forks its next standby after 50 ms without requests


async def wait_for_zygote(agent: Agent) -> None:
    """Until a python exec is served by the zygote (it starts once the agent is idle), and
    the zygote has forked the standby for the next one."""
    while not (await run(agent, ["python3", "-c", "pass"]))[1]:
        await trio.sleep(0.1)
    await trio.sleep(REFILLED_S)


async def both(tmp_path: Path, argv: list[str], **kw: object) -> tuple[Result, Result]:
    """The same exec through the zygote and as a normal exec (zygote disabled)."""
    results = []
    for enabled in ("1", "0"):
        os.environ["SANDSTORM_ZYGOTE"] = enabled
        try:
            async with running_agent(tmp_path) as agent:
                if enabled == "1":
                    await wait_for_zygote(agent)
                result, zygote = await run(agent, argv, **kw)  # type: ignore[arg-type]
                assert zygote == (enabled == "1"), argv
                results.append(result)
        finally:
            del os.environ["SANDSTORM_ZYGOTE"]
    return results[0], results[1]


def probe_view(result: Result) -> dict[str, object]:
    data: dict[str, object] = json.loads(result.stdout)
    data.pop("ppid")  # the agent's pid: differs between the two agents, checked separately
    return data


async def test_dash_c_is_equivalent(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        z, n = await both(tmp_path, ["python3", "-c", PROBE, "a", "b c"], stdin=b"input\n")
    assert z.exit is not None and n.exit is not None
    assert z.stderr == n.stderr == b""
    assert probe_view(z) == probe_view(n)
    view = probe_view(z)
    assert view["argv"] == ["-c", "a", "b c"] and view["path0"] == ""
    assert view["env"] == ENV and view["stdin"] == "input\n"
    assert view["fds"] == ["0", "1", "2", "3"]  # 3: the directory listdir itself opened
    assert z.exit.exit_code == n.exit.exit_code == 0
    assert z.exit.max_rss_bytes > 0 and z.exit.cpu_time_ms >= 0  # rusage from the agent's wait4


async def test_file_is_equivalent(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "probe.py").write_text(PROBE)
    (tmp_path / "link.py").symlink_to(tmp_path / "d" / "probe.py")
    for name in ("d/probe.py", "link.py", str(tmp_path / "d" / "../d/probe.py")):
        with trio.fail_after(TIMEOUT):
            z, n = await both(tmp_path, ["python3", name, "x"], cwd=tmp_path)
        assert z.stderr == n.stderr == b"", name
        assert probe_view(z) == probe_view(n), name
    # sys.path[0] is the script's real directory, __file__ the path as given made absolute.
    assert probe_view(z)["path0"] == str(tmp_path / "d")


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["python3", "-c", "import sys; sys.exit(3)"], 3),
        (["python3", "-c", "raise SystemExit('bye')"], 1),
        (["python3", "-c", "def f():\n    1/0\nf()"], 1),
        (["python3", "-c", "if x"], 1),  # a syntax error
        (["python3", "-c", "raise ValueError('x') from KeyError('y')"], 1),
        (["python3", "-c", "import atexit; atexit.register(print, 'bye'); print('hi', end='')"], 0),
        (["python3", "-c", "raise KeyboardInterrupt"], None),
        (["python3", "-c", "import os; os.kill(os.getpid(), 15)"], None),
        (["python3", "/nonexistent.py"], 2),  # python's own message (fallback by execve)
    ],
)
async def test_exits_and_errors_are_equivalent(
    tmp_path: Path, argv: list[str], code: int | None
) -> None:
    with trio.fail_after(TIMEOUT):
        z, n = await both(tmp_path, argv)
    assert z.exit is not None and n.exit is not None
    assert (z.exit.exit_code, z.exit.signal) == (n.exit.exit_code, n.exit.signal)
    assert z.exit.exit_code == code
    assert z.stdout == n.stdout
    assert z.stderr == n.stderr


# What python's exit does that a program can see. A zygote exec must end exactly as a normal
# one does (it goes through python's own exit: see the end of sandstorm/agent/guest/zygote.py).
EXIT_PROGRAMS = {
    "unclosed file": "f = open('out.txt', 'w'); f.write('data')",
    "stdout replaced by a file": "import sys; sys.stdout = open('out.txt', 'w'); print('hi')",
    "a file kept in builtins": "import builtins; builtins.kept = open('out.txt', 'w')\n"
    "builtins.kept.write('kept')",
    "stderr replaced by an object without closed": "import sys\nclass E:\n"
    "    def __init__(self):\n        self.held = []\n"
    "    def write(self, s):\n        self.held.append(s)\n"
    "    def flush(self):\n        sys.__stdout__.write('flushed ' + ''.join(self.held))\n"
    "sys.stderr = E(); sys.stderr.write('x')",
    "a file kept in os": "import os; os.kept = open('out.txt', 'w'); os.kept.write('in os')",
    "a file kept in sys": "import sys; sys.kept = open('out.txt', 'w'); sys.kept.write('in sys')",
    "a file in an imported module": "import json; json.kept = open('out.txt', 'w'); "
    "json.kept.write('in json')",
    "__del__ at exit": "class A:\n    def __del__(self):\n        print('del', flush=True)\n"
    "a = A()",
    "__del__ in a cycle": "class A:\n    def __del__(self):\n        print('cycle')\n"
    "a = A(); a.me = a",
    "a suspended generator's finally": "def g():\n    try:\n        yield 1\n    finally:\n"
    "        print('finally')\nx = g(); next(x)",
    "weakref.finalize": "import weakref\nclass A: pass\na = A()\n"
    "weakref.finalize(a, print, 'finalized')",
    "a non-daemon thread": "import threading, time\ndef f():\n    time.sleep(0.2)\n"
    "    print('thread')\nthreading.Thread(target=f).start()",
    "atexit order and a failing handler": "import atexit\natexit.register(print, 'first')\n"
    "atexit.register(lambda: 1/0)\natexit.register(print, 'last')",
    "an exception and __del__": "class A:\n    def __del__(self):\n        print('del')\n"
    "a = A()\nraise ValueError('x')",
    "stdout closed before exit": "import os; print('lost', end=''); os.close(1)",
    "a __del__ that uses a module": "import os\nopen('out.txt', 'w').write('x')\n"
    "class T:\n    def __del__(self):\n        os.remove('out.txt')\nt = T()",
    "a file held by a signal handler": "import signal\nf = open('out.txt', 'w')\n"
    "f.write('important')\nsignal.signal(signal.SIGTERM, lambda *a, f=f: None)\ndel f",
    "a subclass of KeyboardInterrupt": "class K(KeyboardInterrupt): pass\nraise K",
    "exit(256)": "import sys; sys.exit(256)",
    "exit(-1)": "import sys; sys.exit(-1)",
    "exit(2**70)": "import sys; sys.exit(2**70)",
    "exit(True)": "import sys; sys.exit(True)",
    "exit with a list": "import sys; sys.exit([1, 2])",
    "exit('bye') with stderr gone": "import sys; sys.stderr = None; sys.exit('bye')",
}


@pytest.mark.parametrize("code", EXIT_PROGRAMS.values(), ids=EXIT_PROGRAMS.keys())
async def test_what_python_does_at_exit_is_equivalent(tmp_path: Path, code: str) -> None:
    """Output, files left behind and exit status, through the zygote and a normal exec."""
    seen = []
    for enabled in ("1", "0"):
        cwd = tmp_path / f"zygote-{enabled}"
        cwd.mkdir()
        os.environ["SANDSTORM_ZYGOTE"] = enabled
        try:
            with trio.fail_after(TIMEOUT):
                async with running_agent(cwd) as agent:
                    if enabled == "1":
                        await wait_for_zygote(agent)
                    result, zygote = await run(agent, ["python3", "-c", code], cwd=cwd)
        finally:
            del os.environ["SANDSTORM_ZYGOTE"]
        assert zygote == (enabled == "1")
        assert result.exit is not None
        out = cwd / "out.txt"
        seen.append(
            (
                result.stdout,
                re.sub(rb"0x[0-9a-f]+", b"0x?", result.stderr),  # a function's address
                result.exit.exit_code,
                result.exit.signal,
                out.read_text() if out.exists() else None,
            )
        )
    assert seen[0] == seen[1]


async def test_syntax_error_in_file_is_equivalent(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("x = (\n")
    with trio.fail_after(TIMEOUT):
        z, n = await both(tmp_path, ["python3", "bad.py"], cwd=tmp_path)
    assert z.exit is not None and n.exit is not None
    assert z.exit.exit_code == n.exit.exit_code == 1
    assert z.stderr == n.stderr and b"SyntaxError" in z.stderr


async def test_execs_get_their_own_process_and_clean_state(tmp_path: Path) -> None:
    """Two execs from one zygote: different pids, the agent as parent, no state carried over,
    and a different `random` stream (the hash secret is shared: documented). What they
    inherit is frozen (the collector never walks, so never copies, those pages); their own
    cycles are collected as usual."""
    code = (
        "import gc, os, random, sys, weakref\n"
        "class A: pass\n"
        "a = A(); a.me = a; ref = weakref.ref(a); del a; gc.collect()\n"
        "print(os.getpid(), os.getppid(), random.random(), 'leak' in globals(),"
        " gc.get_freeze_count() > 0, ref() is None); leak = 1"
    )
    async with running_agent(tmp_path) as agent:
        with trio.fail_after(TIMEOUT):
            await wait_for_zygote(agent)
            first, z1 = await run(agent, ["python3", "-c", code])
            await trio.sleep(REFILLED_S)
            second, z2 = await run(agent, ["python3", "-c", code])
    assert z1 and z2
    pid1, ppid1, random1, *rest1 = first.stdout.split()
    pid2, ppid2, random2, *rest2 = second.stdout.split()
    assert pid1 != pid2 and random1 != random2
    assert int(ppid1) == int(ppid2) == agent.process.pid
    assert rest1 == rest2 == [b"False", b"True", b"True"]  # no leak, frozen, collected
    assert first.pid == int(pid1)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["python3", "-I", "-c", "pass"], ENV),  # another flag
        (["python3", "-"], ENV),  # program on stdin
        (["python3"], ENV),
        (["python3.11", "-c", "pass"], ENV),  # not the zygote's interpreter name
        (["python3", "-c", "pass"], {**ENV, "PYTHONHASHSEED": "0"}),
        (["python3", "-c", "pass"], {**ENV, "PYTHONPATH": "/tmp"}),
        (["python3", "-c", "pass"], {**ENV, "LC_ALL": "C"}),
        (["python3", "-c", "pass"], {**ENV, "HOME": "/root"}),
        (["python3", "-c", "pass"], {**ENV, "PATH": "/nowhere:/usr/bin"}),  # same python3
    ],
)
async def test_fallback_for_what_the_zygote_does_not_reproduce(
    tmp_path: Path, argv: list[str], env: dict[str, str]
) -> None:
    async with running_agent(tmp_path) as agent:
        with trio.fail_after(TIMEOUT):
            await wait_for_zygote(agent)
            result, zygote = await run(agent, argv, env=env)
    served = argv[0] == "python3" and env["PATH"] != ENV["PATH"]
    assert zygote == served, (argv, env)
    assert result.exit is not None and result.exit.exit_code == 0, result


async def test_killed_zygote_restarts_and_hostile_execs_cannot_break_later_ones(
    tmp_path: Path,
) -> None:
    async with running_agent(tmp_path) as agent:
        with trio.fail_after(TIMEOUT):
            await wait_for_zygote(agent)
            # A hostile exec kills its parent's group's zygote and standby (it can find them
            # as the same user): the next exec still works (a normal exec), then the zygote is back.
            # Only the zygote of this agent (a sibling: same parent), never another test's.
            hostile = (
                "import os, signal\n"
                "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
                "    try:\n"
                "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
                "        stat = open(f'/proc/{pid}/stat').read()\n"
                "        ppid = int(stat.rsplit(')', 1)[1].split()[1])\n"
                "    except (OSError, ValueError):\n"
                "        continue\n"
                "    if b'Sandstorm python zygote' in cmd and int(pid) != os.getpid() and "
                "ppid == os.getppid():\n"
                "        os.kill(int(pid), signal.SIGKILL); print('killed')\n"
            )
            result, _ = await run(agent, ["python3", "-c", hostile])
            # The zygote, and its standby process if it had forked the next one yet.
            assert result.stdout.split() in ([b"killed"], [b"killed", b"killed"]), result.stdout
            after, _ = await run(agent, ["python3", "-c", "print('still fine')"])
            assert after.stdout == b"still fine\n"
            await wait_for_zygote(agent)
            # Stopping it: a request gets no reply, and falls back after the reply deadline.
            stop = hostile.replace("SIGKILL", "SIGSTOP")
            await run(agent, ["python3", "-c", stop])
            late, zygote = await run(agent, ["python3", "-c", "print('late')"])
            assert late.stdout == b"late\n" and not zygote
            await wait_for_zygote(agent)


async def test_stdin_signals_and_duration_through_the_zygote(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        with trio.fail_after(TIMEOUT):
            await wait_for_zygote(agent)
            number = await agent.start(
                ["python3", "-c", "import sys; print(sys.stdin.readline(), end=''); input()"],
                env=ENV,
            )
            await agent.channel.send_stdin(number, b"line\n")
            frame = await agent.next(number)
            assert frame.kind is FrameKind.STARTED
            assert decode_started(frame.payload).pid > 0
            await agent.read_stdout(number, b"line\n")
            await agent.channel.send_signal(number, signal.SIGTERM)
            result = await agent.finish(number)
    assert result.exit is not None and result.exit.signal == signal.SIGTERM
    assert result.exit.duration_ms > 0


async def test_execs_close_together_find_a_standby_and_a_burst_falls_back(tmp_path: Path) -> None:
    """Python execs 5 ms apart are served by standbys: the agent tells the zygote when an exec a
    standby served has ended ("R"), and it forks the next one then. Without "R" it waits for 50
    ms without messages after a standby is taken, which these execs seldom leave (with the
    agent's "R" disabled, 3 of 12 were served; with it, 12 of 12). Execs started together
    outrun the one standby: the rest run as normal execs. Every one gets its output, and a
    STARTED with its real pid."""
    async with running_agent(tmp_path) as agent:
        with trio.fail_after(TIMEOUT * 2):
            await wait_for_zygote(agent)
            served = 0
            for i in range(12):
                await trio.sleep(0.005)
                result, zygote = await run(agent, ["python3", "-c", f"print({i})"])
                assert result.stdout == f"{i}\n".encode(), (i, result)
                served += zygote
            # A fork and a warm-up take a few ms here: a loaded host may miss a few.
            assert served >= 9, served
            await trio.sleep(REFILLED_S)
            together = [
                await agent.start(["python3", "-c", f"print({i})"], env=ENV, cwd="/")
                for i in range(6)
            ]
            for number in together:
                await agent.channel.send_stdin_close(number)
            by_zygote = []
            for i, number in enumerate(together):
                result = await agent.finish(number)
                assert result.stdout == f"{i}\n".encode(), (i, result)
                assert result.pid is not None and result.pid > 0
                started = [
                    f for f in agent.log if f.channel == number and f.kind is FrameKind.STARTED
                ]
                by_zygote.append(json.loads(started[0].payload)["zygote"])
    assert by_zygote[0] and not all(by_zygote), by_zygote


def children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(child) for child in f.read().split()}


async def test_the_zygote_waits_for_running_execs_and_never_follows_a_last_one(
    tmp_path: Path,
) -> None:
    """Speculative work never takes CPU from an exec: while one runs (past the 1 s at which an
    always-busy agent starts it anyway) the agent's only child is that exec. Once it ends, the
    zygote comes. After an EXEC marked ``last`` (a run with keep_alive 0) it never comes."""
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["sleep", "1.5"])
            await agent.channel.send_stdin_close(number)
            pid = await agent.wait_started(number)
            for _ in range(13):
                assert children_of(agent.process.pid) == {pid}
                await trio.sleep(0.1)
            assert (await agent.finish(number)).exit is not None
            await wait_for_zygote(agent)

        async with running_agent(tmp_path) as agent:
            number = agent.new_channel()
            await agent.channel.send_exec(number, ["sleep", "0.3"], ENV, "/", last=True)
            await agent.channel.send_stdin_close(number)
            await agent.finish(number)
            await trio.sleep(1.5)
            assert children_of(agent.process.pid) == set()
            result, zygote = await run(agent, ["python3", "-c", "print('still served')"])
            assert (result.stdout, zygote) == (b"still served\n", False)


def _started_at(pid: int) -> int:
    return int(proc_stat(pid)[19])


def zygote_and_standby(agent: Agent) -> tuple[int, int]:
    """The agent's two children once the zygote has forked its standby, the zygote first."""
    zygote, standby = sorted(children_of(agent.process.pid), key=_started_at)
    return zygote, standby


async def test_quiesce_kills_the_zygote_and_its_standby_and_both_come_back(
    tmp_path: Path,
) -> None:
    """QUIESCE (sent before a checkpoint) kills the zygote and the standby it forked, so the
    snapshot holds neither; the PING that follows is answered once both are killed. The standby
    is stopped first, so it cannot leave by itself when its zygote dies: only the agent's kill
    ends it. Once idle again, the zygote comes back and serves."""
    async with running_agent(tmp_path) as agent:
        with trio.fail_after(TIMEOUT):
            await wait_for_zygote(agent)
            zygote, standby = zygote_and_standby(agent)
            os.kill(standby, signal.SIGSTOP)
            await agent.channel.send_quiesce()
            await agent.channel.send_ping(b"quiesced")
            pong = await agent.next(0)
            assert (pong.kind, pong.payload) == (FrameKind.PONG, b"quiesced"), pong
            while children_of(agent.process.pid):  # killed, then reaped by the agent
                await trio.sleep(0.01)
            assert not [f for f in agent.log if f.kind is FrameKind.ERROR], agent.log
            result, _ = await run(agent, ["python3", "-c", "print('after')"])
            assert result.stdout == b"after\n"
            await wait_for_zygote(agent)
            assert zygote not in children_of(agent.process.pid)


async def test_an_exec_on_a_stopped_standby_runs_as_a_normal_exec_with_its_input_and_signals(
    tmp_path: Path,
) -> None:
    """Code in the sandbox can stop the standby before an exec takes it: the exec has not
    started after 2 s, its standby is found stopped, so none of the user's code ran there. It
    is killed and the exec runs as a normal one, with the input and the signals it was sent."""
    async with running_agent(tmp_path) as agent:
        with trio.fail_after(TIMEOUT):
            await wait_for_zygote(agent)
            _zygote, standby = zygote_and_standby(agent)
            await stop(standby)
            echo = ["python3", "-c", "import sys; print(sys.stdin.read(), end='')"]
            result, zygote = await run(agent, echo, stdin=b"kept\n")
            assert (result.stdout, zygote) == (b"kept\n", False), result
            assert result.exit is not None and result.exit.duration_ms >= 2000
            assert result.pid != standby

            await wait_for_zygote(agent)  # the zygote, never stopped, forked the next standby
            _zygote, standby = zygote_and_standby(agent)
            await stop(standby)  # stopped before the signal comes, or the signal ends it at once
            number = await agent.start(["python3", "-c", "import time; time.sleep(30)"], env=ENV)
            await agent.channel.send_signal(number, signal.SIGTERM)
            result = await agent.finish(number)
            assert result.exit is not None and result.exit.signal == signal.SIGTERM, result
            assert result.pid != standby
            while standby in children_of(agent.process.pid):  # killed, then reaped
                await trio.sleep(0.01)


async def test_last_must_be_a_boolean(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = agent.new_channel()
            payload = json.dumps({"argv": ["true"], "env": ENV, "cwd": "/", "last": "yes"})
            await agent.channel.send_frame(FrameKind.EXEC, number, payload.encode())
            result = await agent.finish(number)
            assert result.exit is not None and result.exit.exit_code == 126
            assert any("last must be a boolean" in e for e in result.errors), result
