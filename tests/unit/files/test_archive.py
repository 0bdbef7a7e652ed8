"""Tar archives of a sandbox's files, both ways, over a fake of the agent's file requests:
trees made by Python's tarfile and GNU tar (gnu and pax formats, plain and gzip) extract
faithfully, and archives made here extract with GNU tar to the same tree; a download streams
in bounded chunks and fails before its first byte for a path it cannot archive."""

from __future__ import annotations

import gzip as gz
import io
import random
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio

from sandstorm.agent.files import FileError
from sandstorm.errors import FileNotFound, PermissionDenied, UnsafeArchive, WrongFileType
from sandstorm.files import extract_archive, open_archive
from sandstorm.files._stream import OUT_CHUNK
from tests.unit.agent.test_fs import agent_files
from tests.unit.files.fakefs import (
    READ_CHUNK,
    TARGET,
    FakeFiles,
    Node,
    body_of,
    member,
    tar_of,
    with_target,
)
from tests.unit.files.trees import (
    MAKERS,
    build_tree,
    describe_fake,
    describe_host,
    expected_counts,
    gnu_extract,
    make_tar,
    staging_left,
)

TIMEOUT = 60


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "src")


async def download(files: Any, path: str, *, gzip: bool = False) -> bytes:
    async with open_archive(files, path, gzip=gzip) as chunks:
        return b"".join([chunk async for chunk in chunks])


def members_of(archive: bytes) -> dict[str, tuple[bytes, int, bytes | str]]:
    """Each member: its type, mode, and data (a file) or link target."""
    found: dict[str, tuple[bytes, int, bytes | str]] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for info in tar:
            reader = tar.extractfile(info) if info.isreg() else None
            content = reader.read() if reader is not None else info.linkname
            found[info.name] = (info.type, info.mode, content)
    return found


@pytest.mark.parametrize("maker", MAKERS)
async def test_extract_gives_the_tree_tar_archived(tree: Path, maker: str) -> None:
    fake = with_target()
    with trio.fail_after(TIMEOUT):
        counts = await extract_archive(fake, body_of(make_tar(tree, maker)), TARGET)
    assert counts == expected_counts(tree)
    assert describe_fake(fake, f"{TARGET}/tree") == describe_host(tree)
    assert fake.node(f"{TARGET}/existing.txt").data == b"kept"
    assert staging_left(fake) == []


@pytest.mark.parametrize("gzip", [False, True], ids=["tar", "tar.gz"])
async def test_archive_extracts_with_gnu_tar_to_the_same_tree(
    tree: Path, tmp_path: Path, gzip: bool
) -> None:
    fake = with_target()
    with trio.fail_after(TIMEOUT):
        await extract_archive(fake, body_of(make_tar(tree, "pax")), TARGET)
        archive = await download(fake, f"{TARGET}/tree", gzip=gzip)
    assert archive.startswith(b"\x1f\x8b") == gzip
    gnu_extract(archive, tmp_path / "out")
    # Hard links come out as files of their own: the agent's entries carry no inode.
    got = describe_host(tmp_path / "out" / "tree", hard_links=False)
    assert got == describe_host(tree, hard_links=False)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        infos = tar.getmembers()
    assert {(i.uid, i.gid, i.uname, i.gname) for i in infos} == {(1000, 1000, "", "")}
    assert {i.name.partition("/")[0] for i in infos} == {"tree"}

    # And back in: the same tree again.
    again = FakeFiles()
    with trio.fail_after(TIMEOUT):
        await extract_archive(again, body_of(archive), "/again")
    assert describe_fake(again, "/again/tree", hard_links=False) == describe_host(
        tree, hard_links=False
    )


async def test_archive_of_a_file_a_symlink_and_the_root() -> None:
    fake = FakeFiles()
    fake.add("/work/notes.txt", Node("file", mode=0o600, data=b"notes"))
    fake.add("/work/link", Node("symlink", mode=0o777, target="notes.txt"))
    with trio.fail_after(TIMEOUT):
        one = members_of(await download(fake, "/work/notes.txt"))
        link = members_of(await download(fake, "/work/link"))
        root = members_of(await download(fake, "/"))
    assert one == {"notes.txt": (tarfile.REGTYPE, 0o600, b"notes")}
    assert link == {"link": (tarfile.SYMTYPE, 0o777, "notes.txt")}
    assert list(root) == [".", "./work", "./work/notes.txt", "./work/link"]
    assert root["./work/notes.txt"] == one["notes.txt"]


async def test_archive_fails_before_its_first_byte_for_a_path_it_cannot_archive() -> None:
    fake = FakeFiles()
    fake.add("/dev/null", Node("other"))
    fake.add("/secret", Node("file", data=b"x"))
    fake.unreadable.add("/secret")
    with trio.fail_after(TIMEOUT):
        for path, error in [("/missing", FileNotFound), ("/dev/null", WrongFileType)]:
            with pytest.raises(error):
                async with open_archive(fake, path, gzip=False):
                    pytest.fail("entered the archive of a path it cannot archive")
        with pytest.raises(PermissionDenied):
            async with open_archive(fake, "/secret", gzip=True):
                pytest.fail("entered the archive of an unreadable file")


async def test_member_sizes_hold_when_files_shrink_or_grow_under_the_read() -> None:
    fake = FakeFiles()
    fake.add("/d/shrinks", Node("file", data=b"x" * 1000))
    fake.resize["/d/shrinks"] = b"y" * 10
    fake.add("/d/grows", Node("file", data=b"abc"))
    fake.resize["/d/grows"] = b"abcdef" * 100_000
    fake.add("/d/after", Node("file", data=b"after"))
    with trio.fail_after(TIMEOUT):
        found = members_of(await download(fake, "/d"))
    assert found["d/shrinks"][2] == b"y" * 10 + bytes(990)
    assert found["d/grows"][2] == b"abc"
    assert found["d/after"][2] == b"after"


async def test_files_unreadable_during_the_walk_are_left_out() -> None:
    fake = FakeFiles()
    fake.add("/d/a", Node("file", data=b"a"))
    fake.add("/d/secret", Node("file", data=b"s"))
    fake.add("/d/z", Node("file", data=b"z"))
    fake.add("/d/fifo", Node("other"))
    fake.unreadable.add("/d/secret")
    with trio.fail_after(TIMEOUT):
        found = members_of(await download(fake, "/d"))
    assert list(found) == ["d", "d/a", "d/z"]


async def test_a_walk_cut_at_its_limit_fails_the_stream_at_its_end() -> None:
    fake = FakeFiles()
    for n in range(5):
        fake.add(f"/d/f{n}", Node("file", data=b"x"))
    fake.max_entries = 3
    got = 0
    with trio.fail_after(TIMEOUT), pytest.raises(FileError, match="incomplete"):
        async with open_archive(fake, "/d", gzip=False) as chunks:
            async for chunk in chunks:
                got += len(chunk)
    assert got == 0  # the first members are still under one chunk


@pytest.mark.parametrize("gzip", [False, True], ids=["tar", "tar.gz"])
async def test_download_streams_in_bounded_chunks(gzip: bool) -> None:
    fake = FakeFiles()
    data = random.Random(7).randbytes(20 * 1024 * 1024)  # gzip cannot shrink it
    fake.add("/d/big.bin", Node("file", data=data))
    sizes: list[int] = []
    served_at_first = -1
    with trio.fail_after(TIMEOUT):
        async with open_archive(fake, "/d/big.bin", gzip=gzip) as chunks:
            async for chunk in chunks:
                if not sizes:
                    served_at_first = fake.served
                sizes.append(len(chunk))
    assert max(sizes) <= OUT_CHUNK
    # The first chunk leaves before the file has been read: nothing holds it whole.
    assert 0 < served_at_first < len(data) // 4
    if not gzip:
        assert served_at_first <= OUT_CHUNK + READ_CHUNK
        assert sum(sizes) % (20 * 512) == 0

    # Leaving early ends the reads it opened.
    with trio.fail_after(TIMEOUT):
        async with open_archive(fake, "/d", gzip=gzip) as chunks:
            async for _ in chunks:
                break


async def test_extract_merges_into_the_target_and_makes_a_missing_one() -> None:
    fake = with_target()
    fake.add(f"{TARGET}/sub/old.txt", Node("file", data=b"old"))
    fake.add(f"{TARGET}/sub/same.txt", Node("file", data=b"before"))
    archive = tar_of(
        [
            (member("./sub//same.txt/", mtime=1_600_000_000.5), b"after"),
            (member("./sub/new.txt"), b"new"),
            (member("sub/ln", tarfile.SYMTYPE, linkname="new.txt"), b""),
            (member("sub/hard-to-ln", tarfile.LNKTYPE, linkname="sub/ln"), b""),
        ]
    )
    with trio.fail_after(TIMEOUT):
        counts = await extract_archive(fake, body_of(archive), TARGET)
        assert await extract_archive(fake, body_of(archive), "/made/here") == (4, 8)
    assert counts == (4, 8)
    sub = describe_fake(fake, f"{TARGET}/sub", hard_links=False)
    assert sub["same.txt"] == ("file", 0o644, b"after", 1_600_000_000)
    assert fake.node(f"{TARGET}/sub/same.txt").mtime == 1_600_000_000.5
    assert sub["old.txt"][2] == b"old" and sub["new.txt"][2] == b"new"
    assert sub["ln"] == sub["hard-to-ln"] == ("symlink", "new.txt")
    assert fake.node(f"{TARGET}/sub/ln") is fake.node(f"{TARGET}/sub/hard-to-ln")
    assert fake.node(f"{TARGET}/existing.txt").data == b"kept"
    made = describe_fake(fake, "/made/here", hard_links=False)
    assert set(made) == {".", "sub", "sub/same.txt", "sub/new.txt", "sub/ln", "sub/hard-to-ln"}
    assert staging_left(fake) == []


async def test_extract_refuses_a_target_that_is_a_file() -> None:
    fake = with_target()
    before = fake.snapshot()
    with trio.fail_after(TIMEOUT), pytest.raises(WrongFileType):
        await extract_archive(fake, body_of(tar_of([])), f"{TARGET}/existing.txt")
    assert fake.snapshot() == before


async def test_extract_reads_concatenated_gzip_members() -> None:
    whole = tar_of([(member("a.txt"), b"a" * 100_000), (member("b.txt"), b"b")])
    body = gz.compress(whole[:70_000]) + gz.compress(whole[70_000:])
    fake = FakeFiles()
    with trio.fail_after(TIMEOUT):
        assert await extract_archive(fake, body_of(body, 1000), "/t") == (2, 100_001)
    assert fake.node("/t/a.txt").data == b"a" * 100_000


async def test_links_alone_get_the_directories_they_go_in() -> None:
    archive = tar_of(
        [
            (member("f.txt"), b"f"),
            (member("x/y/link", tarfile.SYMTYPE, linkname="../../f.txt"), b""),
            (member("p/q/hard", tarfile.LNKTYPE, linkname="f.txt"), b""),
            (member("r/hard-to-link", tarfile.LNKTYPE, linkname="x/y/link"), b""),
        ]
    )
    fake = FakeFiles()
    with trio.fail_after(TIMEOUT):
        assert await extract_archive(fake, body_of(archive), "/t") == (4, 1)
    assert fake.node("/t/x/y/link").target == "../../f.txt"
    assert fake.node("/t/p/q/hard") is fake.node("/t/f.txt")
    assert fake.node("/t/r/hard-to-link") is fake.node("/t/x/y/link")


# ---------------------------------------------------------------------- the real agent


@pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")
async def test_round_trip_through_the_real_agent(tree: Path, tmp_path: Path) -> None:
    target = tmp_path / "sandbox" / "dst"
    target.mkdir(parents=True)
    (target / "existing.txt").write_text("kept\n")
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            body = body_of(make_tar(tree, "gnu-gz"))
            assert await extract_archive(files, body, str(target)) == expected_counts(tree)
            archive = await download(files, str(target / "tree"), gzip=True)
    assert describe_host(target / "tree") == describe_host(tree)
    assert sorted(p.name for p in target.iterdir()) == ["existing.txt", "tree"]
    gnu_extract(archive, tmp_path / "out")
    got = describe_host(tmp_path / "out" / "tree", hard_links=False)
    assert got == describe_host(tree, hard_links=False)


@pytest.mark.skipif(sys.platform != "linux", reason="the agent targets Linux")
async def test_refusal_through_the_real_agent_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sandbox" / "dst"
    target.mkdir(parents=True)
    (target / "existing.txt").write_text("kept\n")
    archive = tar_of(
        [
            (member("ok/data.txt"), b"x" * 300_000),
            (member("ok/link", tarfile.SYMTYPE, linkname="data.txt"), b""),
            (member("s", tarfile.SYMTYPE, linkname="."), b""),
            (member("p", tarfile.SYMTYPE, linkname="s/.."), b""),
        ]
    )
    with trio.fail_after(TIMEOUT):
        async with agent_files(tmp_path) as files:
            with pytest.raises(UnsafeArchive) as caught:
                await extract_archive(files, body_of(archive), str(target / "new"))
    assert caught.value.details["member"] == "p"
    assert sorted(p.name for p in (tmp_path / "sandbox").rglob("*")) == ["dst", "existing.txt"]
