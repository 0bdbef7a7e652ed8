"""The real agent (built from its C sources as the gateway builds it), run as a host subprocess
and driven through the real client: the harness the agent's tests share. The agent is not PID 1
here (``test_main.py`` runs it as PID 1 where a user namespace allows it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from sandstorm.agent import (
    AgentChannel,
    ExitInfo,
    Frame,
    FrameKind,
    Hello,
    decode_error,
    decode_exit,
    decode_started,
)
from sandstorm.agent.build import ensure_agent_binary

# The test programs' interpreter: the host's equivalent of the image's python3 when there is one.
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
PATH = "/usr/local/bin:/usr/bin:/bin"
ENV = {"PATH": PATH, "LC_ALL": "C.UTF-8"}
TIMEOUT = 10
FS_KINDS = frozenset({FrameKind.FS_REPLY, FrameKind.FS_DATA, FrameKind.FS_END, FrameKind.FS_EVENT})


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
        # Where FS_* frames go instead of the queues, once a test sets it (an AgentFiles).
        self.fs_dispatch: Callable[[int, int, bytes], None] | None = None

    def _queue(self, number: int) -> Queue:
        if number not in self._queues:
            self._queues[number] = trio.open_memory_channel[Frame](10_000)
        return self._queues[number]

    async def reader(self) -> None:
        while (frame := await self.channel.receive_frame()) is not None:
            self.log.append(frame)
            if self.fs_dispatch is not None and frame.kind in FS_KINDS:
                self.fs_dispatch(frame.kind, frame.channel, frame.payload)
                continue
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
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path = "/",
        background: bool = False,
    ) -> int:
        number = self.new_channel()
        env = ENV if env is None else env
        await self.channel.send_exec(number, argv, env, str(cwd), background=background)
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


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the name (which can hold anything): state first."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper that is not the agent (host init may be slow)."""
    try:
        return proc_stat(pid)[0] == "Z"
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


async def stop(pid: int) -> None:
    """SIGSTOP, and wait until the process is stopped (the signal takes effect a moment later)."""
    os.kill(pid, signal.SIGSTOP)
    while proc_stat(pid)[0] != "T":
        await trio.sleep(0.001)
