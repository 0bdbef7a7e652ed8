"""The shim on its own: a real shim process around a small real runtime (sh, cat), no runsc.

The shim does not look at the runtime's stdout, so byte streams are enough to check the journal,
replay from an offset, acknowledgements, the bound, STOP, and exit recording.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandstorm.agent.client import HEADER, FrameKind
from sandstorm.runtimes.base import RuntimeStartError
from sandstorm.shim import main as wire
from sandstorm.shim.client import (
    ShimPaths,
    attach,
    read_exit_status,
    remove_socket,
    shim_paths,
    spawn_shim,
)

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
    doc = (Path(__file__).parents[2] / "protocol" / "shim.md").read_text()
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
        with pytest.raises(RuntimeStartError, match="not in the shim's journal"):
            await attach(paths, len(NUMBERS) + 1)
        await stream.aclose()
        # The refused attempt replaced the connection; acknowledge everything on a new one.
        stream, _ = await attach(paths, len(data))
        await trio.sleep(0.2)
        await stream.aclose()
        with pytest.raises(RuntimeStartError, match="not in the shim's journal"):
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
        with pytest.raises(RuntimeStartError, match="exited with status 3"):
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
