"""The agent's main loop (``main.c``): HELLO first, every child reaped, EOF on its stdin ends
its execs and then the agent, and, as PID 1 where a user namespace allows it, orphans reaped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.unit.agent.running import (
    PYTHON,
    TIMEOUT,
    children_of,
    is_dead,
    running_agent,
    wait_dead,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


async def test_hello(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            assert agent.hello.protocol == 1
            assert agent.hello.pid == agent.process.pid
            assert agent.hello.agent == "c"


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
            number = await agent.start(["sh", "-c", "sleep 100 & echo $!"], background=True)
            result = await agent.finish(number)  # the sleep still holds stdout and stderr
            assert result.exit is not None
            assert result.exit.exit_code == 0
            background = int(result.stdout)
            assert not is_dead(background)
        # The agent killed the group on shutdown.
        await wait_dead(background)


async def test_what_an_exec_leaves_behind_is_killed_when_it_ends(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["sh", "-c", "sleep 100 & sleep 100 & echo $!"])
            result = await agent.finish(number)
            assert result.exit is not None and result.exit.exit_code == 0
            await wait_dead(int(result.stdout))
            # The agent goes on: the next exec runs.
            again = await agent.finish(await agent.start(["echo", "next"]))
            assert again.stdout == b"next\n"


async def test_orphans_the_exec_left_in_its_group_are_swept_away(tmp_path: Path) -> None:
    """Each sleep is orphaned at once (its subshell exits): re-parented to the agent, still in
    the exec's group, and killed with it when the shell ends."""
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            script = "for i in $(seq 40); do (sleep 100 &); done; echo $$"
            result = await agent.finish(await agent.start(["sh", "-c", script]))
            assert result.exit is not None and result.exit.exit_code == 0
            group = int(result.stdout)
            while True:  # the group empties within the deadline
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                await trio.sleep(0.05)


async def test_eof_kills_running_execs_and_exits(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_agent(tmp_path) as agent:
            number = await agent.start(["sleep", "100"])
            pid = await agent.wait_started(number)
        assert agent.process.returncode == 0
        await wait_dead(pid)


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
