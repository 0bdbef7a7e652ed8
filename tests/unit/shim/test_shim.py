"""The shim on its own: a real shim process around a small real runtime (sh, cat), no runsc.

The shim does not look at the runtime's stdout, so byte streams are enough to check the journal,
replay from an offset, acknowledgements, the bound, STOP, and exit recording.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandstorm.agent import HEADER, FrameKind
from sandstorm.agent.build import ensure_agent_binary
from sandstorm.cli import main as cli
from sandstorm.shim import (
    ShimAttachError,
    ShimPaths,
    attach,
    build,
    read_exit_status,
    remove_socket,
    shim_argv_directory,
    shim_paths,
    spawn_shim,
    wire,
)
from tests.harness import c_number_defines

ENV = {"PATH": "/usr/bin:/bin"}
NUMBERS = b"".join(b"%d\n" % i for i in range(20000))  # about 109 KiB


@pytest.fixture
async def paths(tmp_path: Path) -> AsyncIterator[ShimPaths]:
    p = shim_paths(tmp_path, "sbx_TEST")
    yield p
    remove_socket(p)


async def start(paths: ShimPaths, script: str, *, journal_max: int = 1 << 20) -> trio.Process:
    return await spawn_shim(
        paths,
        ["/bin/sh", "-c", script],
        env=ENV,
        journal_max=journal_max,
        log_path=paths.directory.parent / "log",
    )


async def read_until(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_socket_paths_fit_sun_path(tmp_path: Path) -> None:
    short = shim_paths(Path("/var/lib/sandstorm"), "sbx_" + "A" * 26)
    assert short.socket == short.directory / "sock"
    long_dir = Path("/tmp") / ("x" * 120)
    far = shim_paths(long_dir, "sbx_" + "A" * 26)
    assert far.directory == long_dir / "shims" / ("sbx_" + "A" * 26)
    assert str(far.socket).startswith("/run/sandstorm/")
    assert len(str(far.socket)) <= 100
    assert far.socket != shim_paths(Path("/tmp") / ("y" * 120), "sbx_" + "A" * 26).socket


def test_protocol_document_matches_the_shim() -> None:
    doc = (Path(__file__).parents[3] / "protocol" / "shim.md").read_text()
    table = dict(re.findall(r"^\| `0x([0-9A-F]{2})` \| `(\w+)`", doc, re.M))
    assert table == {
        f"{wire.ATTACH:02X}": "ATTACH",
        f"{wire.ACK:02X}": "ACK",
        f"{wire.STOP:02X}": "STOP",
        f"{wire.KILL:02X}": "KILL",
        f"{wire.ATTACHED_KIND:02X}": "ATTACHED",
    }
    assert f"`{wire.ATTACHED.format}`" in doc
    # Reserved kinds never collide with the agent's.
    assert max(FrameKind) < wire.RESERVED


async def test_replay_from_an_offset_then_live(paths: ShimPaths) -> None:
    with trio.fail_after(20):
        process = await start(paths, f"printf '%s' '{NUMBERS.decode()}'; exec cat")
        stream, handshake = await attach(paths, 0)
        assert handshake.first_offset == 0 and handshake.start_offset == 0
        assert not handshake.exited
        first = await read_until(stream, 1000)
        # The gateway goes away; a new one asks from where it got to.
        await stream.aclose()
        await trio.sleep(0.2)
        stream, handshake = await attach(paths, len(first))
        assert handshake.end_offset == len(NUMBERS)
        rest = await read_until(stream, len(NUMBERS) - len(first))
        assert first + rest == NUMBERS
        # Agent frames go to the runtime's stdin whole (cat echoes them into the journal).
        frame = HEADER.pack(FrameKind.STDIN, 7, 5) + b"hello"
        await stream.send_all(frame)
        assert await read_until(stream, len(frame)) == frame
        # A second connection replaces the first.
        other, _ = await attach(paths, len(NUMBERS))
        assert await stream.receive_some(10) == b""
        await stream.aclose()
        # STOP closes the runtime's stdin: cat exits 0, the shim records it and leaves.
        await other.send_all(HEADER.pack(wire.STOP, 0, 0))
        assert await read_until(other, 100) == frame
        assert await process.wait() == 0
        assert read_exit_status(paths) == 0
        await other.aclose()


async def test_offsets_outside_the_journal_are_refused(paths: ShimPaths) -> None:
    with trio.fail_after(20):
        process = await start(
            paths, f"printf '%s' '{NUMBERS.decode()}'; exec cat", journal_max=1 << 18
        )
        stream, _ = await attach(paths, 0)
        data = await read_until(stream, len(NUMBERS))
        with pytest.raises(ShimAttachError, match="not in the shim's journal"):
            await attach(paths, len(NUMBERS) + 1)
        await stream.aclose()
        # The refused attempt replaced the connection; acknowledge everything on a new one.
        stream, _ = await attach(paths, len(data))
        await trio.sleep(0.2)
        await stream.aclose()
        with pytest.raises(ShimAttachError, match="not in the shim's journal"):
            await attach(paths, 0)  # the first segments were dropped after the acknowledgement
        stream, handshake = await attach(paths, len(data))
        assert handshake.first_offset > 0
        await stream.send_all(HEADER.pack(wire.KILL, 0, 0))
        assert await process.wait() == 0  # the shim itself exits cleanly
        assert read_exit_status(paths) == -9
        await stream.aclose()


async def test_exit_without_a_gateway_keeps_the_journal(paths: ShimPaths) -> None:
    with trio.fail_after(20):
        process = await start(paths, "echo bye; exit 3")
        assert await process.wait() == 0
        assert read_exit_status(paths) == 3
        assert b"".join(p.read_bytes() for p in sorted(paths.directory.glob("journal.*"))) == (
            b"bye\n"
        )
        with pytest.raises(ShimAttachError, match="exited with status 3"):
            await attach(paths, 0)


async def test_a_connection_must_attach_first(paths: ShimPaths) -> None:
    with trio.fail_after(20):
        process = await start(paths, "exec cat")
        stream = await trio.open_unix_socket(str(paths.socket))
        await stream.send_all(HEADER.pack(FrameKind.STDIN, 1, 1) + b"x")
        assert await stream.receive_some(10) == b""  # closed, nothing forwarded
        await stream.aclose()
        stream, handshake = await attach(paths, 0)
        assert handshake.end_offset == 0
        # A reserved kind the shim does not know closes the connection.
        await stream.send_all(HEADER.pack(0xEF, 0, 0))
        assert await stream.receive_some(10) == b""
        await stream.aclose()
        stream, _ = await attach(paths, 0)
        await stream.send_all(HEADER.pack(wire.STOP, 0, 0))
        assert await process.wait() == 0
        await stream.aclose()


def test_the_c_shim_is_built_with_the_wire_numbers() -> None:
    """shim.c and wire.py (which the gateway and protocol/shim.md use) state every number
    once each: they must agree."""
    assert c_number_defines(build.SHIM_SOURCE.read_text()) == {
        "HEADER_SIZE": wire.HEADER.size,
        "OFFSET_SIZE": wire.OFFSET.size,
        "ATTACHED_SIZE": wire.ATTACHED.size,
        "RESERVED": wire.RESERVED,
        "ATTACH": wire.ATTACH,
        "ACK": wire.ACK,
        "STOP": wire.STOP,
        "KILL": wire.KILL,
        "ATTACHED_KIND": wire.ATTACHED_KIND,
        "MAX_FRAME": wire.MAX_FRAME,
        "STDIN_MAX": wire.STDIN_MAX,
        "READ_SIZE": wire.READ_SIZE,
        "PIPE_SIZE": wire.PIPE_SIZE,
        "SEND_SIZE": wire.SEND_SIZE,
        "EXIT_DRAIN_S": wire.EXIT_DRAIN_S,
        "LINGER_S": wire.LINGER_S,
        "ATTACH_WAIT_S": wire.ATTACH_WAIT_S,
    }


def test_shims_are_told_from_other_processes_by_their_command_line() -> None:
    binary = os.fsencode(build.SHIM_BIN_DIR / f"{build.SHIM_PREFIX}0123456789abcdef")
    state = b"/var/lib/sandstorm/shims/sbx_A"
    assert shim_argv_directory([binary, state, b"64", b"3", b"--", b"runsc"]) == state
    # A shim of an older binary (the source changed since) is still a shim.
    older = os.fsencode(build.SHIM_BIN_DIR / f"{build.SHIM_PREFIX}fedcba9876543210")
    assert shim_argv_directory([older, state, b"64", b"3", b"--", b"runsc"]) == state
    # The same name elsewhere, runsc itself (whose arguments name the state), a Python process
    # naming a script beside the shim's source, anything else.
    python_main = os.fsencode(Path(build.SHIM_SOURCE).with_name("main.py"))
    script = [b"/usr/bin/python3", b"-I", b"-S", b"-c", b"import sys", python_main, state, b"64"]
    assert shim_argv_directory(script) is None
    assert shim_argv_directory([b"/tmp/" + binary.rpartition(b"/")[2], state]) is None
    assert shim_argv_directory([b"runsc", b"--root", state, b"run"]) is None
    assert shim_argv_directory([b""]) is None
    assert shim_argv_directory([]) is None


def test_a_shim_that_cannot_be_built_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "shim.c"
    broken.write_text("int main(void) { return undeclared; }\n")
    monkeypatch.setattr(build, "SHIM_SOURCE", broken)
    monkeypatch.setattr(build, "SHIM_BIN_DIR", tmp_path / "bin")
    monkeypatch.setattr(build, "_built", None)
    with pytest.raises(build.ShimBuildError, match="undeclared"):
        build.ensure_shim_binary()
    assert list((tmp_path / "bin").iterdir()) == []  # no half-written binary
    broken.write_text("int main(void) { return 0; }\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc on it
    with pytest.raises(build.ShimBuildError, match="apt-get install gcc"):
        build.ensure_shim_binary()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    built = build.ensure_shim_binary()
    assert built.parent == tmp_path / "bin" and built.name.startswith(build.SHIM_PREFIX)
    assert os.access(built, os.X_OK)
    assert build.ensure_shim_binary() == built


async def test_a_frame_over_the_limit_closes_the_connection(paths: ShimPaths) -> None:
    with trio.fail_after(20):
        process = await start(paths, "exec cat")
        stream, _ = await attach(paths, 0)
        await stream.send_all(HEADER.pack(FrameKind.STDIN, 1, wire.MAX_FRAME + 1) + b"x" * 10)
        assert await stream.receive_some(10) == b""
        await stream.aclose()
        stream, handshake = await attach(paths, 0)
        assert handshake.end_offset == 0  # nothing of it reached the runtime
        await stream.send_all(HEADER.pack(wire.STOP, 0, 0))
        assert await process.wait() == 0
        await stream.aclose()


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


async def test_a_runtime_that_does_not_read_stdin_bounds_what_the_shim_holds(
    paths: ShimPaths,
) -> None:
    """16 MiB of frames queue for the runtime's stdin, then the socket is not read: the
    gateway's sends block instead of the shim's memory growing."""
    with trio.fail_after(30):
        process = await start(paths, "exec sleep 60")
        stream, handshake = await attach(paths, 0)
        frame = HEADER.pack(FrameKind.STDIN, 1, wire.MAX_FRAME) + b"y" * wire.MAX_FRAME
        sent = 0
        with trio.move_on_after(3):
            while sent < 64 * wire.MAX_FRAME:
                await stream.send_all(frame)
                sent += len(frame)
        assert wire.STDIN_MAX <= sent < 48 * wire.MAX_FRAME
        assert _rss_kib(process.pid) < (wire.STDIN_MAX + 8 * wire.MAX_FRAME) // 1024
        os.kill(handshake.runtime_pid, signal.SIGKILL)
        assert await process.wait() == 0
        assert read_exit_status(paths) == -signal.SIGKILL
        await stream.aclose()


def test_a_gateway_that_cannot_build_its_shim_says_why(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_logging: None,
) -> None:
    """No shim binary and no gcc: `sandstorm serve` stops at once with what to install, not a
    traceback, before it serves anything."""
    ensure_agent_binary()  # built while gcc is there: this is about the shim
    monkeypatch.setattr(build, "SHIM_BIN_DIR", tmp_path / "bin")
    monkeypatch.setattr(build, "_built", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "sandstorm: cannot start: cannot run gcc to build the shim" in err
    assert "apt-get install gcc libc6-dev" in err
    assert "Traceback" not in err


def test_a_missing_shim_source_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "SHIM_SOURCE", tmp_path / "shim.c")
    monkeypatch.setattr(build, "SHIM_BIN_DIR", tmp_path / "bin")
    monkeypatch.setattr(build, "_built", None)
    with pytest.raises(build.ShimBuildError, match="cannot read the shim's source"):
        build.ensure_shim_binary()
