"""The file routes' requests and the bodies a write sends."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandstorm.sdk import _file_calls as calls


def test_modes_are_sent_as_octal_text() -> None:
    assert calls.mode_text(0o644) == {"mode": "0644"}
    assert calls.mode_text("755") == {"mode": "0755"}
    assert calls.mode_text(None) == {}
    with pytest.raises(ValueError):
        calls.mode_text(0o17777)


def test_calls_name_the_routes_of_the_spec() -> None:
    sid = "sbx_X"
    assert calls.content("/a").url(sid) == "/v1/sandboxes/sbx_X/files/content"
    assert calls.remove("/a", True).url(sid) == "/v1/sandboxes/sbx_X/files"
    assert calls.remove("/a", True).params == {"path": "/a", "recursive": "true"}
    move = calls.move("/a", "/b", False)
    assert (move.method, move.json) == ("POST", {"from": "/a", "to": "/b", "overwrite": False})
    assert calls.archive("/d", True).params == {"path": "/d", "format": "tar.gz"}
    assert calls.listing("/d", 3).params == {"path": "/d", "depth": "3"}


def test_a_regular_file_is_sent_in_chunks_with_its_length(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * (calls.CHUNK + 5))
    with path.open("rb") as f:
        f.seek(5)
        body, headers = calls.upload_body(f)
        assert not isinstance(body, bytes)
        chunks = list(body)
    assert headers == {"Content-Length": str(calls.CHUNK)}
    assert [len(c) for c in chunks] == [calls.CHUNK]


def test_text_bytes_and_unsized_streams() -> None:
    assert calls.upload_body("é") == ("é".encode(), {})
    assert calls.upload_body(bytearray(b"ab")) == (b"ab", {})
    body, headers = calls.upload_body(io.BytesIO(b"abc"))
    assert headers == {} and not isinstance(body, bytes) and list(body) == [b"abc"]
    body, headers = calls.upload_body([b"a", b"b"])
    assert not isinstance(body, bytes) and list(body) == [b"a", b"b"]


async def test_async_bodies_read_files_in_a_thread(tmp_path: Path) -> None:
    async def produce() -> AsyncIterator[bytes]:
        yield b"1"
        yield b"2"

    async def collect(data: calls.AsyncWriteData) -> list[bytes]:
        body, _ = calls.async_upload_body(data)
        assert not isinstance(body, bytes)
        return [chunk async for chunk in body]

    (tmp_path / "f").write_bytes(b"abc")
    with trio.fail_after(10):
        assert await collect(produce()) == [b"1", b"2"]
        assert await collect([b"x", b"y"]) == [b"x", b"y"]
        with (tmp_path / "f").open("rb") as f:
            assert await collect(f) == [b"abc"]
