"""Starting an exec (``spawn.c``): argv, env and cwd exactly as sent, argv[0] looked up in the
exec's PATH, and a child with only fds 0 to 2, every signal at its default, in its own process
group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from sandstorm.agent import (
    FrameKind,
)
from tests.unit.agent.running import (
    PATH,
    PYTHON,
    TIMEOUT,
    running_agent,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


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
