"""The agent's ``oom_killed`` on EXIT: a real kernel OOM kill (a test cgroup's memory limit)
against a plain SIGKILL. The agent runs as a host subprocess, so the counter it reads is the
host's /proc/vmstat: another OOM kill on this host in the same window would count too."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sandstorm.actors.execs import ExecTracker, OutputBuffer
from sandstorm.agent import ExitInfo
from sandstorm.api.types import MIB
from sandstorm.runtimes.cgroups import V1_ALL, Limits, SandboxCgroups
from tests.unit.agent.running import TIMEOUT, running_agent

HOG = "b = []\nwhile True:\n    b.append(bytearray(8 << 20))\n"


def _vmstat_has_oom_kill() -> bool:
    try:
        return b"\noom_kill " in Path("/proc/vmstat").read_bytes()
    except OSError:
        return False


@pytest.fixture
def cgroup() -> Iterator[tuple[SandboxCgroups, str]]:
    if os.geteuid() != 0:
        pytest.skip("a memory cgroup needs root")
    if not _vmstat_has_oom_kill():
        pytest.skip("this kernel counts no oom_kill in /proc/vmstat")
    cgroups = SandboxCgroups(f"sandstorm-test-{secrets.token_hex(4)}")
    sid = "agent-oom"
    cgroups.create(sid, Limits(cpu=1.0, memory_bytes=96 * MIB, pids=64))
    yield cgroups, sid
    cgroups.remove(sid)
    for d in cgroups._dirs("", V1_ALL):
        if d.is_dir():
            os.rmdir(d)


async def test_kernel_oom_kill_is_reported(
    tmp_path: Path, cgroup: tuple[SandboxCgroups, str]
) -> None:
    cgroups, sid = cgroup
    with trio.fail_after(60):
        async with running_agent(tmp_path) as agent:
            # The agent and what it forks from now on share the 96 MiB limit; the hog is by
            # far the largest process there, so the kernel's OOM killer picks it.
            cgroups.attach(sid, agent.process.pid)
            result = await agent.run(["python3", "-c", HOG])
            assert result.exit is not None
            assert (result.exit.exit_code, result.exit.signal) == (None, signal.SIGKILL)
            assert result.exit.oom_killed, result
            # The agent itself lives on and serves the next exec.
            after = await agent.run(["sh", "-c", "echo alive"])
            assert after.stdout == b"alive\n"
            assert after.exit is not None and not after.exit.oom_killed


async def test_plain_sigkill_is_not_oom(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            result = await agent.run(["sh", "-c", "kill -9 $$"])
            assert result.exit is not None
            assert result.exit.signal == signal.SIGKILL
            assert not result.exit.oom_killed


def _tracker() -> ExecTracker:
    return ExecTracker("exe_x", 1, ["x"], 10.0, OutputBuffer(1024), OutputBuffer(1024))


def test_verdict_follows_oom_killed() -> None:
    oom = ExitInfo(exit_code=None, signal=9, oom_killed=True)
    assert _tracker().finish(oom).verdict == "oom"
    assert _tracker().finish(ExitInfo(exit_code=None, signal=9)).verdict == "killed"
    # An older agent sends no oom_killed at all.
    assert ExitInfo(exit_code=0, signal=None).oom_killed is False
    # The gateway's own decision (a timeout, its own SIGKILL) comes first.
    tracker = _tracker()
    tracker.kill_verdict = "timeout"
    assert tracker.finish(oom).verdict == "timeout"
