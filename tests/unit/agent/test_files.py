"""WRITE_FILE (``files.c``): files written, overwritten and appended with their mode, parents
made, symlinks not followed, every base64 padding decoded, and bad requests refused with a
reason."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import trio

from sandstorm.agent import (
    FrameKind,
    decode_file_written,
)
from tests.unit.agent.running import (
    TIMEOUT,
    running_agent,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


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
