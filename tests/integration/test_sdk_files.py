"""The SDK's files of a running sandbox against a real gateway: every call, sync and async, the
error codes, whole trees both ways and watch."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from sandstorm.sdk import AsyncClient, AsyncFiles, Client, FsEvent, SandstormError
from tests.file_trees import BLOB, make_tree, sandbox, tree_of
from tests.harness import RunningGateway


async def _chunks() -> AsyncIterator[bytes]:
    yield b"async "
    yield b"chunks"


async def test_async_files_every_call(gw: RunningGateway, tmp_path: Path) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(120):
        async with AsyncClient(gw.url) as client:
            files = client.files(sid)
            made = await files.mkdir("/workspace/a/b", parents=True)
            assert (made.type, made.path) == ("dir", "/workspace/a/b")

            entry = await files.write("/workspace/a/blob.bin", BLOB, mode=0o600)
            assert (entry.type, entry.size, entry.mode) == ("file", len(BLOB), "0600")
            assert await files.read("/workspace/a/blob.bin") == BLOB
            await files.write("/workspace/a/text.txt", "é text")
            assert await files.read("/workspace/a/text.txt") == "é text".encode()
            await files.write("/workspace/a/b/gen.txt", _chunks())
            assert await files.read("/workspace/a/b/gen.txt") == b"async chunks"
            await files.write("/workspace/a/b/list.txt", [b"one ", b"two"])
            (tmp_path / "local.bin").write_bytes(BLOB)
            with (tmp_path / "local.bin").open("rb") as f:
                await files.write("/workspace/a/b/from-file.bin", f)
            async with files.read_stream("/workspace/a/b/from-file.bin") as chunks:
                streamed = b"".join([chunk async for chunk in chunks])
            assert streamed == BLOB
            sink = io.BytesIO()
            assert await files.read_to("/workspace/a/b/list.txt", sink) == len(b"one two")
            assert sink.getvalue() == b"one two"

            stat = await files.stat("/workspace/a/b")
            assert (stat.name, stat.type) == ("b", "dir")
            assert await files.exists("/workspace/a/text.txt")
            assert not await files.exists("/workspace/a/none")
            names = sorted(e.name for e in await files.list("/workspace/a"))
            assert names == ["b", "blob.bin", "text.txt"]
            deep = await files.listing("/workspace/a", depth=2)
            assert "/workspace/a/b/gen.txt" in {e.path for e in deep.entries}
            assert not deep.truncated

            moved = await files.move("/workspace/a/text.txt", "/workspace/a/b/moved.txt")
            assert moved.path == "/workspace/a/b/moved.txt"
            assert not await files.exists("/workspace/a/text.txt")
            await files.remove("/workspace/a/blob.bin")
            await files.remove("/workspace/a", recursive=True)
            assert not await files.exists("/workspace/a")


def _sync_calls(url: str, sid: str, tmp: Path) -> None:
    with Client(url) as client:
        files = client.files(sid)
        assert files.mkdir("/workspace/s").type == "dir"
        assert files.write("/workspace/s/blob.bin", BLOB).size == len(BLOB)
        assert files.read("/workspace/s/blob.bin") == BLOB
        (tmp / "up.bin").write_bytes(BLOB[:5000])
        with (tmp / "up.bin").open("rb") as f:
            files.write("/workspace/s/up.bin", f, mode="0640")
        assert files.stat("/workspace/s/up.bin").mode == "0640"
        files.write("/workspace/s/gen.txt", iter([b"sync ", b"chunks"]))
        with files.read_stream("/workspace/s/gen.txt") as chunks:
            assert b"".join(chunks) == b"sync chunks"
        sink = io.BytesIO()
        assert files.read_to("/workspace/s/up.bin", sink) == 5000
        assert sink.getvalue() == BLOB[:5000]
        assert sorted(e.name for e in files.list("/workspace/s")) == [
            "blob.bin",
            "gen.txt",
            "up.bin",
        ]
        assert files.listing("/workspace", depth=2).entries
        files.move("/workspace/s/gen.txt", "/workspace/s/up.bin", overwrite=True)
        assert files.read("/workspace/s/up.bin") == b"sync chunks"
        assert files.exists("/workspace/s/up.bin") and not files.exists("/workspace/s/gen.txt")
        files.remove("/workspace/s", recursive=True)
        assert not files.exists("/workspace/s")


async def test_sync_files_every_call(gw: RunningGateway, tmp_path: Path) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(120):
        await trio.to_thread.run_sync(_sync_calls, gw.url, sid, tmp_path)


async def _raises(code: str, status: int, call: Any) -> SandstormError:
    with pytest.raises(SandstormError) as info:
        await call
    assert (info.value.code, info.value.status) == (code, status), info.value
    return info.value


async def test_errors_carry_the_gateways_codes(gw: RunningGateway, tmp_path: Path) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(120):
        async with AsyncClient(gw.url) as client:
            files: AsyncFiles = client.files(sid)
            await files.write("/workspace/e/file.txt", b"x")
            await _raises("file_not_found", 404, files.read("/workspace/e/none"))
            await _raises("wrong_file_type", 409, files.read("/workspace/e"))
            await _raises("wrong_file_type", 409, files.remove("/workspace/e"))
            await _raises("file_exists", 409, files.mkdir("/workspace/e", parents=False))
            await files.write("/workspace/e/other.txt", b"y")
            busy = files.move("/workspace/e/other.txt", "/workspace/e/file.txt")
            await _raises("file_exists", 409, busy)
            await _raises("permission_denied", 403, files.write("/etc/sandstorm-test", b"x"))
            bad = await _raises("invalid_request", 400, files.stat("relative/path"))
            assert bad.details.get("field") == "path"

            (tmp_path / "out").mkdir()
            os.symlink("/etc/passwd", tmp_path / "out" / "escape")
            escape = files.upload_dir(tmp_path / "out", "/workspace/hostile")
            refused = await _raises("unsafe_archive", 400, escape)
            assert "escape" in refused.message
            assert not await files.exists("/workspace/hostile/escape")

            unknown = AsyncFiles(client._http, gw.url, None, "sbx_" + "0" * 26)
            await _raises("not_found", 404, unknown.stat("/workspace"))


async def test_directories_round_trip_async(gw: RunningGateway, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    sid = await sandbox(gw)
    with trio.fail_after(120):
        async with AsyncClient(gw.url) as client:
            files = client.files(sid)
            sent = await files.upload_dir(tmp_path / "src", "/workspace/tree")
            assert sent.files >= 4 and sent.bytes >= len(BLOB)
            link = await files.stat("/workspace/tree/link")
            assert (link.type, link.target) == ("symlink", "sub/blob.bin")
            assert await files.read("/workspace/tree/link") == BLOB
            count = await files.download_dir("/workspace/tree", tmp_path / "back" / "tree")
    assert count >= 7
    assert tree_of(tmp_path / "back" / "tree") == tree_of(tmp_path / "src")


def _sync_round_trip(url: str, sid: str, tmp: Path) -> None:
    with Client(url) as client:
        files = client.files(sid)
        files.upload_dir(tmp / "src", "/workspace/tree", compress=False)
        files.download_dir("/workspace/tree", tmp / "back", compress=False)


async def test_directories_round_trip_sync(gw: RunningGateway, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    sid = await sandbox(gw)
    with trio.fail_after(120):
        await trio.to_thread.run_sync(_sync_round_trip, gw.url, sid, tmp_path)
    assert tree_of(tmp_path / "back") == tree_of(tmp_path / "src")


async def _keep_writing(files: AsyncFiles, path: str) -> None:
    """Write ``path`` again and again: a watch set up at any moment sees one of them."""
    while True:
        await files.write(path, b"tick")
        await trio.sleep(0.2)


async def test_async_watch_yields_fs_events(gw: RunningGateway) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(60):
        async with AsyncClient(gw.url) as client:
            files = client.files(sid)
            await files.mkdir("/workspace/watched")
            async with files.watch("/workspace/watched") as events, trio.open_nursery() as n:
                n.start_soon(_keep_writing, files, "/workspace/watched/deep/tick.txt")
                event = await events.__anext__()
                n.cancel_scope.cancel()
    assert event.op in ("create", "write")
    assert event.path.startswith("/workspace/watched/") and ".sandstorm" not in event.path


TICK = "/workspace/watched/tick.txt"


def _sync_watch(url: str, sid: str) -> Any:
    with Client(url) as client:
        files = client.files(sid)
        files.mkdir("/workspace/watched")
        stop = threading.Event()

        def writer() -> None:
            with Client(url) as other:
                while not stop.wait(0.2):
                    other.files(sid).write(TICK, b"tick")

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            events: Iterator[FsEvent] = files.watch("/workspace/watched", recursive=False)
            for event in events:
                # An upload shows as one write of its path (never its temporary file).
                assert ".sandstorm" not in event.path, event
                if event.path == TICK:
                    return event
        finally:
            stop.set()
            thread.join()
    return None


async def test_sync_watch_yields_fs_events(gw: RunningGateway) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(60):
        event = await trio.to_thread.run_sync(_sync_watch, gw.url, sid)
    assert event is not None and event.op == "write"
    assert not [t for t in threading.enumerate() if t.name == "sandstorm-watch"]


async def test_watching_a_missing_path_raises(gw: RunningGateway) -> None:
    sid = await sandbox(gw)
    with trio.fail_after(60):
        async with AsyncClient(gw.url) as client:
            with pytest.raises(SandstormError) as info:
                async with client.files(sid).watch("/workspace/none") as events:
                    await events.__anext__()
    assert info.value.code == "file_not_found"


def _sync_oversized(url: str, sid: str, local: Path) -> list[str]:
    codes = []
    with Client(url) as client, local.open("rb") as f:
        for data in (f, iter([b"x" * 65536] * 4)):
            with pytest.raises(SandstormError) as info:
                client.files(sid).write("/workspace/big", data)
            codes.append(info.value.code)
    return codes


async def test_an_upload_over_the_limit_is_refused(start_gateway: Any, tmp_path: Path) -> None:
    """413 whether the gateway refuses the declared length before reading, or counts a chunked
    body as it comes; the client stops sending and reports the answer."""
    local = tmp_path / "big"
    local.write_bytes(b"x" * 4_000_000)
    async with start_gateway(max_upload_bytes=65536) as gw:
        sid = await sandbox(gw)
        with trio.fail_after(60):
            async with AsyncClient(gw.url) as client:
                files = client.files(sid)
                with local.open("rb") as f:
                    for data in (b"x" * 100_000, f, _chunks_of(4, 65536)):
                        await _raises("payload_too_large", 413, files.write("/workspace/big", data))
                codes = await trio.to_thread.run_sync(_sync_oversized, gw.url, sid, local)
                assert codes == ["payload_too_large"] * 2
                assert not await files.exists("/workspace/big")


async def _chunks_of(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size
