"""Directory trees as tar streams: built on the fly from a local tree, extracted safely."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandstorm.sdk._archive import CHUNK, ArchiveError, ChunkReader, extract_stream, tar_stream
from tests.file_trees import make_tree, tree_of


def _reader(chunks: Iterator[bytes]) -> ChunkReader:
    return ChunkReader(lambda: next(chunks, b""))


@pytest.mark.parametrize("compress", [True, False])
def test_a_tree_round_trips_through_the_stream(tmp_path: Path, compress: bool) -> None:
    make_tree(tmp_path / "src")
    chunks = list(tar_stream(tmp_path / "src", compress=compress))
    assert all(len(c) <= 2 * CHUNK + tarfile.BLOCKSIZE * 4 for c in chunks)
    count = extract_stream(_reader(iter(chunks)), tmp_path / "out" / "made")
    assert count == 7
    assert tree_of(tmp_path / "out" / "made") == tree_of(tmp_path / "src")


def _archive_of(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of directories (names ending in ``/``) and files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            member = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                member.type = tarfile.DIRTYPE
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def test_a_named_top_directory_is_extracted_as_the_destination(tmp_path: Path) -> None:
    data = _archive_of([("data/", b""), ("data/sub/", b""), ("data/sub/f", b"x"), ("data/g", b"y")])
    count = extract_stream(_reader(iter([data])), tmp_path / "out", top="data")
    assert count == 3
    assert tree_of(tmp_path / "out") == {"g": (b"y", False), "sub": "dir", "sub/f": (b"x", False)}


@pytest.mark.parametrize("members", [[("data", b"a file")], [("data/", b""), ("other/f", b"x")]])
def test_anything_but_the_top_directory_is_refused(
    tmp_path: Path, members: list[tuple[str, bytes]]
) -> None:
    with pytest.raises(ArchiveError):
        extract_stream(_reader(iter([_archive_of(members)])), tmp_path, top="data")
    assert not (tmp_path / "other").exists()


def test_members_are_relative_and_parents_come_first(tmp_path: Path) -> None:
    make_tree(tmp_path)
    data = b"".join(tar_stream(tmp_path, compress=False))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
        link = archive.getmember("link")
    assert names == [
        "link", "readme.txt", "run.sh", "sub", "sub/blob.bin", "sub/deeper", "sub/deeper/empty"
    ]  # fmt: skip
    assert link.issym() and link.linkname == "sub/blob.bin"


def test_a_file_that_shrinks_while_sent_fails_the_stream(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (2 * CHUNK))
    chunks = tar_stream(tmp_path, compress=False)
    next(chunks)
    (tmp_path / "big").write_bytes(b"x")
    with pytest.raises(Exception, match="shrank"):
        list(chunks)


def test_a_missing_directory_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        tar_stream(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("name", "kind", "target"),
    [
        ("../escape.txt", tarfile.REGTYPE, ""),
        ("ok/link", tarfile.SYMTYPE, "/etc/passwd"),
        ("ok/link", tarfile.SYMTYPE, "../../outside"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
)
def test_a_hostile_member_is_refused(tmp_path: Path, name: str, kind: bytes, target: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo(name)
        member.type, member.linkname = kind, target
        archive.addfile(member, io.BytesIO(b""))
    with pytest.raises(tarfile.FilterError):
        extract_stream(_reader(iter([buffer.getvalue()])), tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_an_absolute_name_lands_inside_the_destination(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(tarfile.TarInfo(str(tmp_path / "absolute")), io.BytesIO(b""))
    extract_stream(_reader(iter([buffer.getvalue()])), tmp_path / "out")
    assert not (tmp_path / "absolute").exists()
    assert (tmp_path / "out" / tmp_path.relative_to("/") / "absolute").is_file()


def test_setuid_bits_are_dropped(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        member = tarfile.TarInfo("tool")
        member.mode, member.size = 0o4755, 2
        archive.addfile(member, io.BytesIO(b"hi"))
    extract_stream(_reader(iter([buffer.getvalue()])), tmp_path)
    assert (tmp_path / "tool").stat().st_mode & 0o7777 == 0o755


def test_the_reader_hands_out_exactly_what_is_asked() -> None:
    reader = _reader(iter([b"abc", b"", b"defgh"]))
    assert reader.read(2) == b"ab"
    assert reader.read(2) == b"c"  # b"" ends the stream
    assert reader.read() == b""
