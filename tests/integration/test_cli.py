"""The ``sandstorm`` client commands, run as real subprocesses against a real gateway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import RunningGateway

REPO = Path(__file__).resolve().parents[2]
UNKNOWN_SANDBOX = "sbx_" + "0" * 26


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SANDSTORM_URL"}
    env.update(extra)
    return env


def _argv(gw: RunningGateway | None, *args: str) -> list[str]:
    url = ["--url", gw.url] if gw is not None else []
    return [sys.executable, "-m", "sandstorm", *url, *args]


async def cli(
    gw: RunningGateway | None, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``sandstorm [--url gw.url] ARGS`` to completion with ``stdin`` as its input."""
    result: subprocess.CompletedProcess[bytes] = await trio.run_process(
        _argv(gw, *args),
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO,
        env=env or _env(),
    )
    return result


class Live:
    """A running CLI process whose stdout is read incrementally, with arrival times."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.out = b""
        self.arrivals: list[tuple[float, bytes]] = []

    async def read_until(self, needle: bytes) -> float:
        """Read stdout until it holds ``needle``; returns when it arrived (trio.current_time)."""
        assert self.proc.stdout is not None
        while needle not in self.out:
            chunk = await self.proc.stdout.receive_some()
            assert chunk, f"stdout ended before {needle!r}: {self.out!r}"
            self.out += chunk
            self.arrivals.append((trio.current_time(), bytes(chunk)))
        return trio.current_time()

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(data)

    async def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()

    async def finish(self) -> tuple[int, bytes, bytes]:
        """Read the rest of stdout and stderr; the exit code and both outputs."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = b""
        async with trio.open_nursery() as nursery:

            async def read_err() -> None:
                nonlocal err
                assert self.proc.stderr is not None
                while chunk := await self.proc.stderr.receive_some():
                    err += chunk

            nursery.start_soon(read_err)
            while chunk := await self.proc.stdout.receive_some():
                self.out += chunk
        return await self.proc.wait(), self.out, err


async def start(gw: RunningGateway, *args: str) -> Live:
    proc = await trio.lowlevel.open_process(
        _argv(gw, *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=_env(),
    )
    return Live(proc)


def program(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def test_run_python_file(gw: RunningGateway, tmp_path: Path) -> None:
    with trio.fail_after(60):
        done = await cli(gw, "run", program(tmp_path, "hello.py", "print('Hello')\n"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"Hello\n"
    assert done.stderr == b""
    # keep_alive 0: the run's sandbox is gone once the command returns.
    sandboxes = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
    assert len(sandboxes) == 1
    with trio.fail_after(10):
        await gw.wait_state(sandboxes[0]["id"], "destroyed")


async def test_exit_code_and_stderr(gw: RunningGateway, tmp_path: Path) -> None:
    code = "import sys\nprint('out')\nprint('oops', file=sys.stderr)\nsys.exit(3)\n"
    with trio.fail_after(60):
        done = await cli(gw, "run", program(tmp_path, "fail.py", code))
    assert done.returncode == 3
    assert done.stdout == b"out\n"
    assert done.stderr == b"oops\n"


async def test_javascript_and_shell_by_extension(gw: RunningGateway, tmp_path: Path) -> None:
    with trio.fail_after(60):
        js = await cli(gw, "run", program(tmp_path, "a.mjs", "console.log(6 * 7)\n"))
        sh = await cli(gw, "run", program(tmp_path, "a.sh", "echo ${BASH_VERSION:+bash}\n"))
    assert (js.returncode, js.stdout) == (0, b"42\n"), js.stderr
    assert (sh.returncode, sh.stdout) == (0, b"bash\n"), sh.stderr


async def test_output_streams_live(gw: RunningGateway, tmp_path: Path) -> None:
    code = "import time\nprint('first')\ntime.sleep(2)\nprint('second')\n"
    with trio.fail_after(60):
        live = await start(gw, "run", "--no-stdin", program(tmp_path, "slow.py", code))
        first = await live.read_until(b"first\n")
        second = await live.read_until(b"second\n")
        rc, out, err = await live.finish()
    assert rc == 0, err
    assert out == b"first\nsecond\n"
    assert second - first > 1.5, live.arrivals  # the first line did not wait for the exit


async def test_stdin_is_forwarded_interactively(gw: RunningGateway, tmp_path: Path) -> None:
    code = (
        "import sys\nfor line in sys.stdin:\n    print('got', line.strip().upper())\nprint('bye')\n"
    )
    with trio.fail_after(60):
        live = await start(gw, "run", program(tmp_path, "echo.py", code))
        await live.send(b"hello\n")
        await live.read_until(b"got HELLO\n")
        await live.send(b"world\n")
        await live.read_until(b"got WORLD\n")
        assert b"bye" not in live.out  # still waiting for more input
        await live.close_stdin()
        rc, out, err = await live.finish()
    assert rc == 0, err
    assert out == b"got HELLO\ngot WORLD\nbye\n"


async def test_closed_stdout_stops_the_program(gw: RunningGateway, tmp_path: Path) -> None:
    """``sandstorm run yes.py | head -1``: the reader goes away, the program is killed."""
    code = "while True:\n    print('y' * 100)\n"
    with trio.fail_after(60):
        live = await start(gw, "run", "--no-stdin", program(tmp_path, "yes.py", code))
        await live.read_until(b"y\n")
        assert live.proc.stdout is not None
        await live.proc.stdout.aclose()
        assert live.proc.stderr is not None
        err = b""
        while chunk := await live.proc.stderr.receive_some():
            err += chunk
        rc = await live.proc.wait()
    assert rc == 128 + signal.SIGPIPE, err
    assert b"Traceback" not in err


async def test_on_a_terminal(gw: RunningGateway, tmp_path: Path) -> None:
    """stdin and stdout are a pseudo-terminal: lines go in as typed, Ctrl-D is EOF."""
    import pty

    code = "import sys\nfor line in sys.stdin:\n    print('got', line.strip())\nprint('eof')\n"
    master, slave = pty.openpty()
    try:
        proc = await trio.lowlevel.open_process(
            _argv(gw, "run", program(tmp_path, "tty.py", code)),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            env=_env(),
        )
        os.close(slave)
        seen = b""

        async def read_until(needle: bytes) -> None:
            nonlocal seen
            while needle not in seen:
                await trio.lowlevel.wait_readable(master)
                seen += os.read(master, 4096)

        with trio.fail_after(60):
            os.write(master, b"one\n")
            await read_until(b"got one")
            os.write(master, b"\x04")  # Ctrl-D at the start of a line: EOF
            await read_until(b"eof")
            assert await proc.wait() == 0, seen
    finally:
        os.close(master)


async def test_program_from_stdin(gw: RunningGateway) -> None:
    with trio.fail_after(60):
        done = await cli(gw, "run", "--language", "python", "-", stdin=b"print(2 + 2)\n")
        unnamed = await cli(gw, "run", "-", stdin=b"print(1)\n")
    assert (done.returncode, done.stdout) == (0, b"4\n"), done.stderr
    assert unnamed.returncode == 2
    assert b"--language" in unnamed.stderr


async def test_language_override_and_unknown_extension(gw: RunningGateway, tmp_path: Path) -> None:
    path = program(tmp_path, "prog.txt", "print('from txt')\n")
    with trio.fail_after(60):
        unknown = await cli(gw, "run", path)
        override = await cli(gw, "run", "-l", "python", path)
        tool = program(tmp_path, "tool", "#!/usr/bin/env python3\nprint(5)\n")
        shebang = await cli(gw, "run", tool)
    assert unknown.returncode == 2
    assert b"cannot tell the language" in unknown.stderr and unknown.stdout == b""
    assert (override.returncode, override.stdout) == (0, b"from txt\n"), override.stderr
    assert (shebang.returncode, shebang.stdout) == (0, b"5\n"), shebang.stderr


async def test_limits_and_env_are_passed(gw: RunningGateway, tmp_path: Path) -> None:
    code = "import os\nprint(os.environ['GREETING'], os.environ['EMPTY'] == '')\n"
    with trio.fail_after(60):
        done = await cli(
            gw, "run", "--memory", "256M", "--cpu", "0.5", "--isolation", "standard",
            "--runtime", "gvisor", "--env", "GREETING=hi there", "-e", "EMPTY=",
            program(tmp_path, "env.py", code),
        )  # fmt: skip
        bad_memory = await cli(gw, "run", "--memory", "lots", program(tmp_path, "x.py", ""))
        too_small = await cli(gw, "run", "--memory", "1M", program(tmp_path, "y.py", ""))
    assert (done.returncode, done.stdout) == (0, b"hi there True\n"), done.stderr
    assert bad_memory.returncode == 2 and b"not a size" in bad_memory.stderr
    # The gateway refuses it (400): a clean one-line message and exit 2.
    assert too_small.returncode == 2, too_small.stderr
    assert too_small.stderr.startswith(b"sandstorm: ") and b"Traceback" not in too_small.stderr


async def test_timeout_exits_124(gw: RunningGateway, tmp_path: Path) -> None:
    path = program(tmp_path, "hang.py", "import time\nprint('start')\ntime.sleep(30)\n")
    with trio.fail_after(60):
        done = await cli(gw, "run", "--timeout", "1", path)
    assert done.returncode == 124, done.stderr
    assert done.stdout == b"start\n"
    assert b"timeout" in done.stderr


async def test_sigint_interrupts_the_program(gw: RunningGateway, tmp_path: Path) -> None:
    with trio.fail_after(60):
        live = await start(gw, "run", program(tmp_path, "sleep.sh", "echo ready\nsleep 60\n"))
        await live.read_until(b"ready\n")
        started = trio.current_time()
        live.proc.send_signal(signal.SIGINT)
        rc, _, err = await live.finish()
    assert rc == 128 + signal.SIGINT, err
    assert trio.current_time() - started < 10
    assert b"Traceback" not in err


async def test_second_sigint_kills(gw: RunningGateway, tmp_path: Path) -> None:
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready')\n"
    code += "time.sleep(60)\n"
    with trio.fail_after(60):
        live = await start(gw, "run", program(tmp_path, "stubborn.py", code))
        await live.read_until(b"ready\n")
        live.proc.send_signal(signal.SIGINT)
        await trio.sleep(0.5)
        assert live.proc.poll() is None  # the program ignores SIGINT
        live.proc.send_signal(signal.SIGINT)
        rc, _, err = await live.finish()
    assert rc == 128 + signal.SIGKILL, err


async def test_sandbox_commands_round_trip(gw: RunningGateway) -> None:
    created = await gw.run_ok(code="print('up')", language="python", keep_alive=300)
    sid = created["id"]
    with trio.fail_after(120):
        done = await cli(gw, "exec", "--env", "X=1", sid, "--", "sh", "-c", "echo $X; exit 4")
        assert (done.returncode, done.stdout) == (4, b"1\n"), done.stderr

        cwd = await cli(gw, "exec", sid, "--cwd", "/tmp", "--", "pwd")
        assert (cwd.returncode, cwd.stdout) == (0, b"/tmp\n"), cwd.stderr

        piped = await cli(gw, "exec", sid, "--", "cat", stdin=b"through stdin\n")
        assert (piped.returncode, piped.stdout) == (0, b"through stdin\n"), piped.stderr

        listed = await cli(gw, "ls")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.decode().splitlines()
        assert header.split() == ["ID", "STATE", "RUNTIME", "CREATED", "EXPIRES"]
        assert any(row.split()[0] == sid and "gvisor" in row for row in rows), listed.stdout

        as_json = await cli(gw, "ls", "--json")
        assert sid in [s["id"] for s in json.loads(as_json.stdout)["sandboxes"]]

        status = await cli(gw, "status", sid)
        assert json.loads(status.stdout)["id"] == sid

        snap = await cli(gw, "snapshot", sid)
        assert snap.returncode == 0, snap.stderr
        snapshot_id = snap.stdout.decode().strip()
        assert snapshot_id.startswith("snp_")

        snaps = await cli(gw, "snapshots")
        assert snapshot_id in snaps.stdout.decode()

        resumed = await cli(gw, "resume", snapshot_id, "--keep-alive", "60")
        assert resumed.returncode == 0, resumed.stderr
        new_id = resumed.stdout.decode().strip()
        assert new_id.startswith("sbx_") and new_id != sid
        again = await cli(gw, "exec", new_id, "--", "echo", "resumed")
        assert (again.returncode, again.stdout) == (0, b"resumed\n"), again.stderr

        removed = await cli(gw, "rm", sid, new_id)
        assert removed.returncode == 0, removed.stderr
        lines = removed.stdout.decode().splitlines()
        assert len(lines) == 2 and all("destroyed" in line for line in lines), lines
        assert (await gw.status(sid))["state"] == "destroyed"

        gone = await cli(gw, "exec", sid, "--", "true")
        assert gone.returncode == 2
        assert gone.stderr == f"sandstorm: sandbox {sid} is destroyed\n".encode()

        listed = await cli(gw, "ls")
        assert sid not in listed.stdout.decode()
        assert sid in (await cli(gw, "ls", "--all")).stdout.decode()


async def test_run_keep_prints_the_sandbox(gw: RunningGateway, tmp_path: Path) -> None:
    with trio.fail_after(60):
        done = await cli(gw, "run", "--keep", program(tmp_path, "k.py", "print(1)"))
    assert done.returncode == 0, done.stderr
    sid = done.stderr.decode().split()[2]
    assert sid.startswith("sbx_")
    assert (await gw.status(sid))["state"] in ("idle", "running")


async def test_snapshot_stop(gw: RunningGateway) -> None:
    sid = (await gw.run_ok(code="print(1)", language="python", keep_alive=300))["id"]
    with trio.fail_after(60):
        snap = await cli(gw, "snapshot", "--stop", sid)
        assert snap.returncode == 0, snap.stderr
        # The answer comes once the snapshot is written; the teardown follows it (the
        # sandbox may still be "stopping" when the command returns).
        assert (await gw.wait_state(sid, "destroyed"))["state"] == "destroyed"


@pytest.mark.parametrize(
    "args",
    [
        ("exec", UNKNOWN_SANDBOX, "--", "true"),
        ("rm", UNKNOWN_SANDBOX),
        ("snapshot", UNKNOWN_SANDBOX),
        ("status", UNKNOWN_SANDBOX),
    ],
)
async def test_unknown_sandbox_is_a_clean_error(gw: RunningGateway, args: Any) -> None:
    with trio.fail_after(30):
        done = await cli(gw, *args)
    assert done.returncode == 2, done.stderr.decode()
    assert done.stderr.decode() == f"sandstorm: sandbox {UNKNOWN_SANDBOX!r} not found\n"
    assert done.stdout == b""


async def test_url_from_environment(gw: RunningGateway, tmp_path: Path) -> None:
    with trio.fail_after(60):
        listed = await cli(None, "ls", env=_env(SANDSTORM_URL=gw.url))
        ran = await cli(
            None, "run", program(tmp_path, "e.py", "print('env')"), env=_env(SANDSTORM_URL=gw.url)
        )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(b"ID")
    assert (ran.returncode, ran.stdout) == (0, b"env\n"), ran.stderr


async def test_unreachable_gateway(tmp_path: Path) -> None:
    with trio.fail_after(30):
        done = await cli(None, "ls", env=_env(SANDSTORM_URL="http://127.0.0.1:9"))
    assert done.returncode == 1
    assert done.stderr.startswith(b"sandstorm: cannot reach the gateway at http://127.0.0.1:9")
