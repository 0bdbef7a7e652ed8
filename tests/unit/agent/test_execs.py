"""The real agent (built from its C sources as the gateway builds it), run as a host subprocess
and driven through the real client.

The agent is not PID 1 here, so orphan reaping is out of reach; everything else about execs,
streaming, signals, stdin, files and the protocol's error handling is exercised end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from sandstorm.agent import (
    HEADER,
    MAX_GATEWAY_FRAME,
    MAX_STDIN_BUFFER,
    AgentChannel,
    ExitInfo,
    Frame,
    FrameKind,
    Hello,
    decode_error,
    decode_exit,
    decode_file_written,
    decode_started,
)
from sandstorm.agent.build import ensure_agent_binary

# The test programs' interpreter: the host's equivalent of the image's python3 when there is one.
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
PATH = "/usr/local/bin:/usr/bin:/bin"
ENV = {"PATH": PATH, "LC_ALL": "C.UTF-8"}
TIMEOUT = 10

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


Queue = tuple[trio.MemorySendChannel[Frame], trio.MemoryReceiveChannel[Frame]]


@dataclass
class Result:
    pid: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    errors: list[str] = field(default_factory=list)
    exit: ExitInfo | None = None
    kinds: list[FrameKind] = field(default_factory=list)


class Agent:
    """A running agent: one reader task routes frames to per-channel queues."""

    def __init__(self, process: trio.Process, channel: AgentChannel, hello: Hello) -> None:
        self.process = process
        self.channel = channel
        self.hello = hello
        self.log: list[Frame] = []
        self._queues: dict[int, Queue] = {}
        self._next_channel = 1

    def _queue(self, number: int) -> Queue:
        if number not in self._queues:
            self._queues[number] = trio.open_memory_channel[Frame](10_000)
        return self._queues[number]

    async def reader(self) -> None:
        while (frame := await self.channel.receive_frame()) is not None:
            self.log.append(frame)
            self._queue(frame.channel)[0].send_nowait(frame)
        for send, _ in self._queues.values():
            send.close()

    async def next(self, number: int) -> Frame:
        return await self._queue(number)[1].receive()

    def new_channel(self) -> int:
        number = self._next_channel
        self._next_channel += 1
        return number

    async def start(
        self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | Path = "/"
    ) -> int:
        number = self.new_channel()
        await self.channel.send_exec(number, argv, ENV if env is None else env, str(cwd))
        return number

    async def wait_started(self, number: int) -> int:
        frame = await self.next(number)
        assert frame.kind is FrameKind.STARTED, frame
        return decode_started(frame.payload).pid

    async def read_stdout(self, number: int, expected: bytes) -> bytes:
        """Read STDOUT frames until ``expected`` bytes arrived (nothing else may come)."""
        data = b""
        while len(data) < len(expected):
            frame = await self.next(number)
            assert frame.kind is FrameKind.STDOUT, frame
            data += frame.payload
        assert data == expected
        return data

    async def finish(self, number: int) -> Result:
        """Collect frames of one exec until its EXIT."""
        result = Result()
        while result.exit is None:
            frame = await self.next(number)
            result.kinds.append(frame.kind)
            if frame.kind is FrameKind.STARTED:
                result.pid = decode_started(frame.payload).pid
            elif frame.kind is FrameKind.STDOUT:
                result.stdout += frame.payload
            elif frame.kind is FrameKind.STDERR:
                result.stderr += frame.payload
            elif frame.kind is FrameKind.ERROR:
                result.errors.append(decode_error(frame.payload).message)
            elif frame.kind is FrameKind.EXIT:
                result.exit = decode_exit(frame.payload)
            else:
                raise AssertionError(f"unexpected frame {frame}")
        return result

    async def run(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path = "/",
        stdin: bytes | None = None,
    ) -> Result:
        number = await self.start(argv, env=env, cwd=cwd)
        if stdin is not None:
            await self.channel.send_stdin(number, stdin)
        await self.channel.send_stdin_close(number)
        return await self.finish(number)

    async def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(data)

    def check_invariants(self) -> None:
        """Per channel: STARTED (if any) first, EXIT at most once and last."""
        by_channel: dict[int, list[FrameKind]] = {}
        for frame in self.log:
            by_channel.setdefault(frame.channel, []).append(frame.kind)
        for number, kinds in by_channel.items():
            if number == 0:
                continue
            if FrameKind.STARTED in kinds:
                assert kinds[0] is FrameKind.STARTED, (number, kinds)
            if FrameKind.EXIT in kinds:
                assert kinds.count(FrameKind.EXIT) == 1, (number, kinds)
                assert kinds[-1] is FrameKind.EXIT, (number, kinds)


@asynccontextmanager
async def running_agent(cwd: Path, *, prefix: tuple[str, ...] = ()) -> AsyncIterator[Agent]:
    process = await trio.lowlevel.open_process(
        [*prefix, str(ensure_agent_binary())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=cwd,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    channel = AgentChannel(process.stdin, process.stdout)
    try:
        hello = await channel.wait_hello()
        agent = Agent(process, channel, hello)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.reader)
            yield agent
            # EOF on the agent's stdin: it kills its execs and exits 0; the reader sees EOF.
            await process.stdin.aclose()
            assert await process.wait() == 0
        agent.check_invariants()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await channel.aclose()


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper that is not the agent (host init may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_dead(pid: int) -> None:
    while not is_dead(pid):
        await trio.sleep(0.01)


def children_of(pid: int) -> list[int] | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return None


# -- start-up ----------------------------------------------------------------------------------


async def test_hello(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            assert agent.hello.protocol == 1
            assert agent.hello.pid == agent.process.pid
            assert agent.hello.agent == "c"


async def test_ping(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            await agent.channel.send_ping(b"abc", channel=7)
            await agent.channel.send_ping()
            assert await agent.next(7) == Frame(FrameKind.PONG, 7, b"abc")
            assert await agent.next(0) == Frame(FrameKind.PONG, 0, b"")


# -- exec basics -------------------------------------------------------------------------------


async def test_exec_argv_env_cwd(tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            code = "import json, sys; print(json.dumps(sys.argv[1:]))"
            result = await agent.run([PYTHON, "-I", "-c", code, "a b", "ü", ""])
            assert result.exit is not None
            assert result.exit.exit_code == 0
            assert json.loads(result.stdout) == ["a b", "ü", ""]
            assert result.kinds[0] is FrameKind.STARTED
            assert result.kinds[-1] is FrameKind.EXIT

            # The env is exactly what the gateway sent: nothing of the agent's own is added.
            env = {"PATH": PATH, "FOO": "bar baz", "EMPTY": ""}
            result = await agent.run(["env"], env=env)
            assert sorted(result.stdout.decode().splitlines()) == sorted(
                f"{k}={v}" for k, v in env.items()
            )

            result = await agent.run(["pwd"], cwd=workdir)
            assert result.stdout.decode().strip() == str(workdir)

            # Relative argv[0] is looked up in the exec's PATH, not the agent's.
            bindir = tmp_path / "bin"
            bindir.mkdir()
            (bindir / "hello-tool").write_text("#!/bin/sh\necho from tool\n")
            (bindir / "hello-tool").chmod(0o755)
            result = await agent.run(["hello-tool"], env={"PATH": f"{bindir}:{PATH}"})
            assert result.stdout == b"from tool\n"
            result = await agent.run(["hello-tool"])
            assert result.exit is not None
            assert result.exit.exit_code == 127


async def test_child_sees_only_fds_0_to_2_and_default_signals(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            result = await agent.run(["ls", "/proc/self/fd"])
            # 3 is the directory ls itself is reading.
            assert result.stdout.split() == [b"0", b"1", b"2", b"3"]

            result = await agent.run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
            # Every signal at its default, none blocked: the agent blocks SIGTERM and others for
            # itself (and glibc's posix_spawn would leave 32 and 33 ignored); execs get neither.
            assert result.stdout.split() == [
                b"SigBlk:",
                b"0000000000000000",
                b"SigIgn:",
                b"0000000000000000",
            ]

            # Own process group, led by the exec's pid.
            result = await agent.run([PYTHON, "-I", "-c", "import os; print(os.getpgid(0))"])
            assert result.stdout.strip() == str(result.pid).encode()


async def test_exit_codes_signals_and_rusage(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            result = await agent.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
            assert result.exit is not None
            assert (result.exit.exit_code, result.exit.signal) == (3, None)
            assert result.exit.max_rss_bytes > 0
            assert result.exit.cpu_time_ms >= 0
            assert result.exit.duration_ms > 0
            assert not result.errors

            result = await agent.run(["sh", "-c", "kill -9 $$"])
            assert result.exit is not None
            assert (result.exit.exit_code, result.exit.signal) == (None, signal.SIGKILL)


async def test_exec_failures(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho no\n")
    script.chmod(0o644)
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            result = await agent.run(["definitely-not-a-command-xyz"])
            assert result.kinds[0] is FrameKind.ERROR  # no STARTED
            assert FrameKind.STARTED not in result.kinds
            assert result.errors == ["definitely-not-a-command-xyz: command not found"]
            assert result.exit is not None
            assert result.exit.exit_code == 127

            result = await agent.run([str(script)])
            assert FrameKind.STARTED not in result.kinds
            assert result.exit is not None
            assert result.exit.exit_code == 126
            assert "Permission denied" in result.errors[0]

            missing = tmp_path / "no-such-dir"
            result = await agent.run(["true"], cwd=missing)
            assert FrameKind.STARTED not in result.kinds
            assert result.exit is not None
            assert result.exit.exit_code == 126
            assert str(missing) in result.errors[0]

            # A request the agent cannot use still finishes its channel.
            number = agent.new_channel()
            await agent.channel.send_frame(
                FrameKind.EXEC, number, b'{"argv":[],"env":{},"cwd":"/"}'
            )
            result = await agent.finish(number)
            assert "argv must be non-empty" in result.errors[0]
            assert result.exit is not None
            assert result.exit.exit_code == 126


async def test_channel_reuse_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["cat"])
            await agent.wait_started(number)
            await agent.channel.send_exec(number, ["true"], ENV, "/")
            frame = await agent.next(number)
            assert frame.kind is FrameKind.ERROR
            assert "already in use" in decode_error(frame.payload).message
            await agent.channel.send_stdin(number, b"still cat\n")
            await agent.channel.send_stdin_close(number)
            result = await agent.finish(number)
            assert result.stdout == b"still cat\n"
            assert result.exit is not None
            assert result.exit.exit_code == 0
            # Finished channels are never written to again: the complaint goes to channel 0.
            await agent.channel.send_exec(number, ["true"], ENV, "/")
            frame = await agent.next(0)
            assert frame.kind is FrameKind.ERROR
            assert f"channel {number} was already used" in decode_error(frame.payload).message


# -- streaming and stdin -----------------------------------------------------------------------


async def test_output_streams_before_the_process_ends(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "sys.stdout.write('first\\n'); sys.stdout.flush()\n"
        "time.sleep(1)\n"
        "sys.stdout.write('second\\n')\n"
    )
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start([PYTHON, "-I", "-c", code])
            await agent.wait_started(number)
            await agent.read_stdout(number, b"first\n")
            first_at = trio.current_time()
            await agent.read_stdout(number, b"second\n")
            # The first chunk was forwarded while the child slept, not with the second.
            assert trio.current_time() - first_at >= 0.8
            result = await agent.finish(number)
            assert result.exit is not None
            assert result.exit.exit_code == 0


async def test_large_output_in_bounded_chunks(tmp_path: Path) -> None:
    size = 3_000_000
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["head", "-c", str(size), "/dev/zero"])
            result = await agent.finish(number)
            assert result.stdout == bytes(size)
            sizes = [len(f.payload) for f in agent.log if f.kind is FrameKind.STDOUT]
            assert max(sizes) <= 64 * 1024


async def test_stdin_interactive(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for line in sys.stdin:\n"
        "    sys.stdout.write('got ' + line.upper()); sys.stdout.flush()\n"
        "print('bye')\n"
    )
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start([PYTHON, "-I", "-c", code])
            await agent.wait_started(number)
            for word in ["alpha", "beta", "gamma"]:
                await agent.channel.send_stdin(number, f"{word}\n".encode())
                await agent.read_stdout(number, f"got {word.upper()}\n".encode())
            await agent.channel.send_stdin_close(number)
            result = await agent.finish(number)
            assert result.stdout == b"bye\n"
            assert result.exit is not None
            assert result.exit.exit_code == 0


async def test_stdin_larger_than_the_pipe(tmp_path: Path) -> None:
    data = os.urandom(900_000)
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            result = await agent.run(["sha256sum"], stdin=data)
            assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_stdin_buffer_full(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["sleep", "30"])  # never reads its stdin
            await agent.wait_started(number)
            await agent.channel.send_stdin(number, bytes(MAX_STDIN_BUFFER + MAX_GATEWAY_FRAME))
            frame = await agent.next(number)
            assert frame.kind is FrameKind.ERROR
            assert decode_error(frame.payload).message == "stdin buffer full"
            await agent.channel.send_signal(number, signal.SIGKILL)
            result = await agent.finish(number)
            assert result.exit is not None
            assert result.exit.signal == signal.SIGKILL


async def test_stdin_to_unknown_exec_is_ignored(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            await agent.channel.send_stdin(999, b"nobody")
            await agent.channel.send_stdin_close(999)
            await agent.channel.send_signal(999, signal.SIGTERM)
            await agent.channel.send_ping(b"after")
            assert await agent.next(0) == Frame(FrameKind.PONG, 0, b"after")
            assert not [f for f in agent.log if f.channel == 999]


async def test_concurrent_execs(tmp_path: Path) -> None:
    # Every exec blocks on stdin until all of them have started: only concurrency finishes this.
    count = 6
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            numbers = [
                await agent.start(["sh", "-c", f"read x; echo $x-{n}"]) for n in range(count)
            ]
            pids = {await agent.wait_started(number) for number in numbers}
            assert len(pids) == count
            for number in reversed(numbers):
                await agent.channel.send_stdin(number, b"go\n")
            results = [await agent.finish(number) for number in numbers]
            assert [r.stdout for r in results] == [f"go-{n}\n".encode() for n in range(count)]


# -- signals -----------------------------------------------------------------------------------


async def test_sigkill_kills_the_whole_group(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["sh", "-c", "sleep 100 & echo $!; exec sleep 100"])
            await agent.wait_started(number)
            frame = await agent.next(number)
            assert frame.kind is FrameKind.STDOUT
            background = int(frame.payload)
            await agent.channel.send_signal(number, signal.SIGKILL)
            result = await agent.finish(number)
            assert result.exit is not None
            assert (result.exit.exit_code, result.exit.signal) == (None, signal.SIGKILL)
            await wait_dead(background)


async def test_sigterm_ignored_then_sigkill(tmp_path: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(100)\n"
    )
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start([PYTHON, "-I", "-c", code])
            await agent.wait_started(number)
            await agent.read_stdout(number, b"ready\n")
            await agent.channel.send_signal(number, signal.SIGTERM)
            with trio.move_on_after(0.5):
                frame = await agent.next(number)
                raise AssertionError(f"SIGTERM should have been ignored, got {frame}")
            await agent.channel.send_signal(number, signal.SIGKILL)
            result = await agent.finish(number)
            assert result.exit is not None
            assert result.exit.signal == signal.SIGKILL


# -- reaping and shutdown ----------------------------------------------------------------------


async def test_children_are_reaped(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            pids = []
            for argv in (["true"], ["false"], ["sh", "-c", "kill -9 $$"], ["no-such-cmd"]):
                number = await agent.start(argv)
                result = await agent.finish(number)
                if result.pid is not None:
                    pids.append(result.pid)
            assert len(pids) == 3
            # EXIT comes after the reap: no zombie of ours is left.
            for pid in pids:
                assert not os.path.exists(f"/proc/{pid}")
            children = children_of(agent.process.pid)
            if children is not None:
                assert children == []


async def test_exit_does_not_wait_for_a_background_process_holding_the_pipes(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["sh", "-c", "sleep 100 & echo $!"])
            result = await agent.finish(number)  # the sleep still holds stdout and stderr
            assert result.exit is not None
            assert result.exit.exit_code == 0
            background = int(result.stdout)
            assert not is_dead(background)
        # The agent killed the group on shutdown.
        await wait_dead(background)


async def test_eof_kills_running_execs_and_exits(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["sleep", "100"])
            pid = await agent.wait_started(number)
        assert agent.process.returncode == 0
        await wait_dead(pid)


# -- files -------------------------------------------------------------------------------------


async def test_write_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "dir" / "file.bin"
    data = bytes(range(256)) * 10
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            await agent.channel.send_write_file(1, str(target), data, 0o640)
            frame = await agent.next(1)
            assert frame.kind is FrameKind.FILE_WRITTEN
            written = decode_file_written(frame.payload)
            assert (written.ok, written.error) == (True, None)
            assert target.read_bytes() == data
            assert stat.S_IMODE(target.stat().st_mode) == 0o640
            assert stat.S_IMODE(target.parent.stat().st_mode) & 0o700 == 0o700

            # Overwrite truncates, and the mode is applied to an existing file too.
            await agent.channel.send_write_file(2, str(target), b"short", 0o600)
            assert decode_file_written((await agent.next(2)).payload).ok
            assert target.read_bytes() == b"short"
            assert stat.S_IMODE(target.stat().st_mode) == 0o600

            # Symlinks are not followed.
            (tmp_path / "link").symlink_to(target)
            await agent.channel.send_write_file(3, str(tmp_path / "link"), b"x", 0o644)
            failed = decode_file_written((await agent.next(3)).payload)
            assert not failed.ok
            assert failed.error
            assert target.read_bytes() == b"short"

            bad = [
                b'{"path":"relative","data_b64":"","mode":420}',
                b'{"path":"/tmp/x","data_b64":"!!!!","mode":420}',
                b'{"path":"/tmp/x","data_b64":"","mode":-1}',
                b"not json",
            ]
            for number, payload in enumerate(bad, start=4):
                await agent.channel.send_frame(FrameKind.WRITE_FILE, number, payload)
                result = decode_file_written((await agent.next(number)).payload)
                assert not result.ok, payload
                assert result.error


async def test_write_file_appends_and_decodes_every_padding(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file"
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            expected = b""
            for number, piece in enumerate([b"", b"a", b"bc", b"def", bytes(range(256))], 1):
                await agent.channel.send_write_file(number, str(target), piece, 0o644, append=True)
                assert decode_file_written((await agent.next(number)).payload).ok
                expected += piece
            assert target.read_bytes() == expected
            # A file where a parent directory should be: refused, with the reason.
            await agent.channel.send_write_file(9, str(target / "below"), b"x", 0o644)
            failed = decode_file_written((await agent.next(9)).payload)
            assert not failed.ok and failed.error
            bad = [
                b'{"path":"/tmp/x","data_b64":"QQ=A","mode":420}',  # padding inside
                b'{"path":"/tmp/x","data_b64":"QQ==QQ==","mode":420}',  # padding mid-stream
                b'{"path":"/tmp/x","data_b64":"QQ=","mode":420}',  # not a multiple of 4
                b'{"path":"/tmp/x","data_b64":"","mode":4096}',
                b'{"path":"/tmp/x","data_b64":"","mode":true}',
                b'{"path":"/tmp/x","data_b64":"","append":1}',
                b'{"path":"/tm\\u0000p","data_b64":""}',
            ]
            for number, payload in enumerate(bad, start=10):
                await agent.channel.send_frame(FrameKind.WRITE_FILE, number, payload)
                result = decode_file_written((await agent.next(number)).payload)
                assert not result.ok, payload
                assert result.error


async def test_exec_payloads_are_parsed_as_strictly_as_python_json(tmp_path: Path) -> None:
    """The agent's own JSON parser: escapes, surrogate pairs, repeated names (the last wins, as
    in a Python dict), and every malformed payload finishes its channel with a reason."""
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:

            async def exec_raw(payload: bytes) -> Result:
                number = agent.new_channel()
                await agent.channel.send_frame(FrameKind.EXEC, number, payload)
                await agent.channel.send_stdin_close(number)
                return await agent.finish(number)

            argv = '["printf", "%s|%s", "\\u00fc\\ud83d\\ude00\\/\\t", "\\udc80"]'
            result = await exec_raw(
                b'{"argv": %s, "env": {"PATH": "%s", "A": "1", "A": "2"}, "cwd": "/"}'
                % (argv.encode(), PATH.encode())
            )
            assert result.errors == []
            assert result.stdout == "ü😀/\t|".encode() + b"\x80"

            result = await exec_raw(
                b'{"argv": ["env"], "env": {"PATH": "%s", "A": "1", "A": "2"}, "cwd": "/"}'
                % PATH.encode()
            )
            assert sorted(result.stdout.split()) == [b"A=2", b"PATH=" + PATH.encode()]

            nested = b"[" * 100 + b"]" * 100
            cases = {
                b'{"argv": ["a\\u0000b"], "env": {}, "cwd": "/"}': "NUL character",
                b'{"argv": ["\\ud800"], "env": {}, "cwd": "/"}': "must be encodable",
                b'{"argv": ["\xff"], "env": {}, "cwd": "/"}': "not UTF-8",
                b'{"argv": ["true"], "env": {}, "cwd": "/"} x': "Extra data",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": %s}' % nested: "nested",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "last": 1}': "last must be",
                b'{"argv": ["true"], "env": [], "cwd": "/"}': "env must be an object",
                b'{"argv": ["true"], "env": {"A=B": "1"}, "cwd": "/"}': "variable name",
                b'{"argv": ["true"], "env": {"A": 1}, "cwd": "/"}': "env values",
                b'{"argv": ["true"], "env": {}, "cwd": ""}': "cwd must be",
                b'{"argv": [1], "env": {}, "cwd": "/"}': "argv must be a list",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": "\x01"}': "control character",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": 01}': "delimiter",
                b'{"argv": ["true"], "env": {}, "cwd": "/", "x": NaN}': "Expecting value",
                b"[]": "must be a JSON object",
                b"": "Expecting value",
            }
            for payload, reason in cases.items():
                result = await exec_raw(payload)
                assert FrameKind.STARTED not in result.kinds, payload
                assert len(result.errors) == 1 and reason in result.errors[0], (payload, result)
                assert result.exit is not None and result.exit.exit_code == 126
            assert (await agent.run(["echo", "fine"])).stdout == b"fine\n"


# -- hostile or broken input from the gateway side ---------------------------------------------


async def test_bad_frames_get_error_on_channel_0_and_the_agent_continues(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:

            async def expect_error(fragment: str) -> None:
                frame = await agent.next(0)
                assert frame.kind is FrameKind.ERROR, frame
                assert fragment in decode_error(frame.payload).message

            await agent.send_raw(HEADER.pack(99, 0, 3) + b"abc")
            await expect_error("unknown frame kind 99")
            await agent.send_raw(HEADER.pack(FrameKind.SIGNAL, 1, 5) + b"{nope")
            await expect_error("malformed SIGNAL payload")
            await agent.send_raw(HEADER.pack(FrameKind.SIGNAL, 1, 13) + b'{"signal":99}')
            await expect_error("SIGNAL needs")
            await agent.send_raw(HEADER.pack(FrameKind.PING, 0, 65) + bytes(65))
            await expect_error("PING payload is 65 bytes")
            await agent.send_raw(HEADER.pack(FrameKind.EXEC, 0, 2) + b"{}")
            await expect_error("EXEC on channel 0")
            # An oversized frame is skipped whole; the framing stays in sync.
            size = MAX_GATEWAY_FRAME + 1
            await agent.send_raw(HEADER.pack(FrameKind.STDIN, 5, size) + bytes(size))
            await expect_error(f"is {size} bytes")
            await agent.channel.send_ping(b"alive")
            assert await agent.next(0) == Frame(FrameKind.PONG, 0, b"alive")
            result = await agent.run(["echo", "still works"])
            assert result.stdout == b"still works\n"


# -- as PID 1, where a user namespace allows it ------------------------------------------------

UNSHARE = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc")


def can_unshare() -> bool:
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user and pid namespaces")
async def test_orphans_are_reaped_as_pid_1(tmp_path: Path) -> None:
    probe = (
        "import os, sys\n"
        "pid = sys.argv[1]\n"
        "try:\n"
        "    print(open('/proc/%s/stat' % pid).read().rsplit(')', 1)[1].split()[0])\n"
        "except FileNotFoundError:\n"
        "    print('gone')\n"
    )
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path, prefix=UNSHARE) as agent:
            assert agent.hello.pid == 1
            # sh exits at once; its background child is re-parented to the agent (PID 1).
            result = await agent.run(["sh", "-c", "sleep 0.2 & echo $!"])
            orphan = result.stdout.strip().decode()
            while True:
                check = await agent.run([PYTHON, "-I", "-S", "-c", probe, orphan])
                state = check.stdout.strip().decode()
                if state == "gone":
                    break
                assert state in {"S", "R", "Z"}, state  # Z only until the SIGCHLD is handled
                await trio.sleep(0.05)
