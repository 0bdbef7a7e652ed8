"""FS requests (``fs.c``, ``transfer.c``, ``watch.c``) driven through the gateway's real client
(``AgentFiles``) against the real agent run on the host: every op, the byte ranges of reads,
credit, atomic writes, walks, merges and watches, and the errors each reports. Permissions as
the sandbox's user are checked in real sandboxes (tests/web/test_files.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from sandstorm.agent import AgentChannel
from sandstorm.agent.files import READ_WINDOW, AgentFiles
from sandstorm.agent.fs_wire import FsEvent
from sandstorm.errors import (
    FileExists,
    FileNotFound,
    InvalidRequest,
    WrongFileType,
)
from tests.unit.agent.running import TIMEOUT, running_agent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")


@asynccontextmanager
async def agent_files(cwd: Path) -> AsyncIterator[AgentFiles]:
    """The real agent with an ``AgentFiles`` on its channel; FS frames go to the client."""
    async with running_agent(cwd) as agent:
        counter = iter(range(1000, 10**6))

        async def send(op: Callable[[AgentChannel], Awaitable[None]]) -> None:
            await op(agent.channel)

        files = AgentFiles(send, lambda: next(counter))
        agent.fs_dispatch = files.dispatch
        yield files


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_stat_mkdir_move_remove(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            made = await files.mkdir(f"{tmp_path}/a/b", parents=True)
            assert (made.type, made.name, made.path) == ("dir", "b", f"{tmp_path}/a/b")
            again = await files.mkdir(f"{tmp_path}/a/b", parents=True)
            assert again.type == "dir"
            with pytest.raises(FileExists):
                await files.mkdir(f"{tmp_path}/a/b")
            with pytest.raises(FileNotFound):
                await files.mkdir(f"{tmp_path}/missing/x")
            (tmp_path / "a" / "f").write_bytes(b"hello")
            entry = await files.stat(f"{tmp_path}/a/f")
            assert (entry.type, entry.size) == ("file", 5)
            assert entry.mode == (tmp_path / "a" / "f").stat().st_mode & 0o7777
            os.symlink("f", tmp_path / "a" / "link")
            link = await files.stat(f"{tmp_path}/a/link")
            assert (link.type, link.target) == ("symlink", "f")
            moved = await files.move(f"{tmp_path}/a/f", f"{tmp_path}/a/g")
            assert moved.path == f"{tmp_path}/a/g" and not (tmp_path / "a" / "f").exists()
            (tmp_path / "a" / "h").write_bytes(b"")
            with pytest.raises(FileExists):
                await files.move(f"{tmp_path}/a/g", f"{tmp_path}/a/h")
            await files.move(f"{tmp_path}/a/g", f"{tmp_path}/a/h", overwrite=True)
            assert (tmp_path / "a" / "h").read_bytes() == b"hello"
            with pytest.raises(WrongFileType):
                await files.remove(f"{tmp_path}/a")
            await files.remove(f"{tmp_path}/a/link")
            assert (tmp_path / "a" / "h").exists()
            await files.remove(f"{tmp_path}/a", recursive=True)
            assert not (tmp_path / "a").exists()
            with pytest.raises(FileNotFound):
                await files.stat(f"{tmp_path}/a")
            with pytest.raises(FileNotFound):
                await files.remove(f"{tmp_path}/a")


async def test_recursive_remove_keeps_what_links_point_to(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    tree = tmp_path / "tree" / "deep" / "er"
    tree.mkdir(parents=True)
    os.symlink(outside, tmp_path / "tree" / "deep" / "to-outside")
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            await files.remove(f"{tmp_path}/tree", recursive=True)
    assert not (tmp_path / "tree").exists()
    assert (outside / "keep").read_bytes() == b"x"


async def test_read_ranges_and_credit(tmp_path: Path) -> None:
    data = os.urandom(3 * READ_WINDOW + 12345)
    (tmp_path / "big").write_bytes(data)
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            async with files.read(f"{tmp_path}/big") as download:
                assert (download.offset, download.length) == (0, len(data))
                assert download.entry.size == len(data)
                got = bytearray()
                async for chunk in download:
                    got += chunk
                    # Never more than the window is held here, however slowly it is taken.
                    assert files.statistics()["bytes_buffered"] <= READ_WINDOW
                    await trio.sleep(0.001)
            assert bytes(got) == data
            async with files.read(f"{tmp_path}/big", offset=10, length=20) as download:
                assert b"".join([c async for c in download]) == data[10:30]
            async with files.read(f"{tmp_path}/big", suffix=7) as download:
                assert download.offset == len(data) - 7
                assert b"".join([c async for c in download]) == data[-7:]
            async with files.read(f"{tmp_path}/big", offset=len(data) + 5) as download:
                assert download.length == 0
                assert [c async for c in download] == []
            # Left early: the agent stops, and the next request is served.
            async with files.read(f"{tmp_path}/big") as download:
                async for _ in download:
                    break
            assert (await files.stat(f"{tmp_path}/big")).size == len(data)
            assert files.statistics()["requests"] == 0


async def test_read_refuses_directories_fifos_and_missing_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            for path, error in (("", WrongFileType), ("/fifo", WrongFileType)):
                with pytest.raises(error):
                    async with files.read(f"{tmp_path}{path}"):
                        pass
            with pytest.raises(FileNotFound):
                async with files.read(f"{tmp_path}/nothing"):
                    pass


async def test_write_is_atomic_and_follows_links(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            big = os.urandom(2 * 1024 * 1024 + 3)
            entry = await files.write(
                f"{tmp_path}/new/dir/file", chunks(big[:1000], big[1000:]), mode=0o600
            )
            assert (entry.type, entry.size, entry.mode) == ("file", len(big), 0o600)
            assert (tmp_path / "new" / "dir" / "file").read_bytes() == big
            os.symlink("real", tmp_path / "link")
            (tmp_path / "real").write_bytes(b"old")
            entry = await files.write(f"{tmp_path}/link", chunks(b"new"), mtime=1_000_000.5)
            assert (tmp_path / "real").read_bytes() == b"new"
            assert (tmp_path / "link").is_symlink()
            assert (tmp_path / "real").stat().st_mtime == 1_000_000.5
            with pytest.raises(WrongFileType):
                await files.write(f"{tmp_path}/new", chunks(b"x"))
            with pytest.raises(FileNotFound):
                await files.write(f"{tmp_path}/nope/x", chunks(b"x"), parents=False)

            # Cancelled mid-way: the old file stays whole and no temporary file is left.
            async def endless() -> AsyncIterator[bytes]:
                yield b"partial"
                await trio.sleep_forever()

            with trio.move_on_after(0.5):
                await files.write(f"{tmp_path}/real", endless())
            await files.stat(f"{tmp_path}/real")  # a round trip: the abort was handled
            assert (tmp_path / "real").read_bytes() == b"new"
            assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "new", "real"]


async def test_walk_depth_limit_and_order(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / "d" / f"sub{i % 5}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / f"sub{i % 5}" / f"f{i}").write_bytes(b"x" * i)
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            async with files.walk(f"{tmp_path}/d", depth=1, max_entries=100) as walk:
                top = [e async for e in walk]
            assert walk.entry.type == "dir" and not walk.truncated
            assert sorted(e.name for e in top) == [f"sub{i}" for i in range(5)]
            async with files.walk(f"{tmp_path}/d", depth=2, max_entries=1000) as walk:
                every = [e async for e in walk]
            assert len(every) == 55 and not walk.truncated
            seen: set[str] = set()
            for entry in every:  # a directory comes before what it holds
                assert entry.path.rsplit("/", 1)[0] in seen | {f"{tmp_path}/d"}
                seen.add(entry.path)
            async with files.walk(f"{tmp_path}/d", depth=2, max_entries=10) as walk:
                cut = [e async for e in walk]
            assert len(cut) == 10 and walk.truncated
            with pytest.raises(WrongFileType):
                async with files.walk(f"{tmp_path}/d/sub0/f0", depth=1, max_entries=10):
                    pass


async def test_walk_of_many_entries_is_paced_by_credit(tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for i in range(12000):
        (many / f"entry-with-a-longish-name-{i:06d}").touch()
    with trio.fail_after(TIMEOUT * 3):
        async with agent_files(tmp_path) as files:
            async with files.walk(str(many), depth=1, max_entries=20000) as walk:
                count = 0
                async for _ in walk:
                    count += 1
                    assert files.statistics()["bytes_buffered"] <= 1024 * 1024
            assert count == 12000


async def test_links_and_merge(tmp_path: Path) -> None:
    (tmp_path / "dst" / "keep").mkdir(parents=True)
    (tmp_path / "dst" / "keep" / "old").write_bytes(b"old")
    (tmp_path / "dst" / "replaced").write_bytes(b"old")
    (tmp_path / "src" / "keep").mkdir(parents=True)
    (tmp_path / "src" / "keep" / "new").write_bytes(b"new")
    (tmp_path / "src" / "replaced").write_bytes(b"new")
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            await files.symlink(f"{tmp_path}/src/sym", "keep/new")
            await files.link(f"{tmp_path}/src/hard", f"{tmp_path}/src/replaced")
            await files.merge(f"{tmp_path}/src", f"{tmp_path}/dst")
    assert not (tmp_path / "src").exists()
    assert (tmp_path / "dst" / "keep" / "old").read_bytes() == b"old"
    assert (tmp_path / "dst" / "keep" / "new").read_bytes() == b"new"
    assert (tmp_path / "dst" / "replaced").read_bytes() == b"new"
    assert os.readlink(tmp_path / "dst" / "sym") == "keep/new"
    assert (tmp_path / "dst" / "hard").stat().st_nlink == 2


async def test_watch_reports_changes_coalesced(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    seen: list[FsEvent] = []
    arrived = trio.Event()

    def collect(events: list[FsEvent]) -> None:
        seen.extend(events)
        arrived.set()

    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            watch = await files.watch(f"{tmp_path}/w", recursive=True, on_events=collect)
            (tmp_path / "w" / "sub").mkdir()
            await trio.sleep(0.2)  # the new directory is watched once its create is seen
            fd = os.open(tmp_path / "w" / "sub" / "f", os.O_WRONLY | os.O_CREAT, 0o644)
            for _ in range(100):
                os.write(fd, b"x")
            os.close(fd)
            os.rename(tmp_path / "w" / "sub" / "f", tmp_path / "w" / "g")
            await files.write(f"{tmp_path}/w/up", chunks(b"uploaded"))
            os.unlink(tmp_path / "w" / "g")
            while not any(e.op == "remove" for e in seen):
                arrived = trio.Event()
                await arrived.wait()
            await watch.aclose()
            (tmp_path / "w" / "after").touch()
            await trio.sleep(0.2)
    ops = [(e.op, e.path.removeprefix(f"{tmp_path}/w"), e.to) for e in seen]
    assert ("create", "/sub", None) in ops
    assert ("create", "/sub/f", None) in ops
    assert 1 <= sum(op == ("write", "/sub/f", None) for op in ops) < 20
    assert ("rename", "/sub/f", f"{tmp_path}/w/g") in ops
    assert ("remove", "/g", None) in ops
    # An upload is one write of its path; the agent's own transient names never show.
    assert ("write", "/up", None) in ops
    assert not any(".sandstorm" in path + str(to) for _, path, to in ops), ops
    assert not any(path == "/after" for _, path, _ in ops)


async def test_bad_requests_name_the_problem(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            with pytest.raises(InvalidRequest):
                await files.stat("relative")
            with pytest.raises(FileNotFound):
                await files.watch("/no/such/dir", recursive=False, on_events=lambda _: None)
