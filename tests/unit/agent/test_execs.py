"""An exec's life in the real agent (``execs.c``), run as a host subprocess: exit codes, signals
and rusage, start errors, channel reuse, output streamed in bounded chunks, stdin, concurrent
execs and signals to the whole group."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from sandstorm.agent import (
    MAX_GATEWAY_FRAME,
    MAX_STDIN_BUFFER,
    Frame,
    FrameKind,
    decode_error,
)
from tests.unit.agent.running import (
    ENV,
    PYTHON,
    TIMEOUT,
    running_agent,
    wait_dead,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


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
