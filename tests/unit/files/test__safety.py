"""Hostile archives: every member that would land outside the target, make a device, or link
out is refused naming it, with nothing extracted (no staging directory left, the target as it
was); setuid, setgid and sticky bits are stripped from what is extracted."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import trio

from sandstorm.errors import UnsafeArchive
from sandstorm.files import extract_archive
from sandstorm.files._safety import member_name
from tests.unit.files.fakefs import TARGET, FakeFiles, Node, body_of, member, tar_of, with_target

TIMEOUT = 30
SYM, LNK, DIR = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE

# Extracted before the hostile member, so a refusal has something to take back.
GOOD = [
    (member("ok", DIR, mode=0o755), b""),
    (member("ok/data.txt"), b"x" * 300_000),
    (member("ok/inner", SYM, linkname="data.txt"), b""),
]

HOSTILE: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes]], str]] = {
    "absolute name": ([(member("/etc/cron.d/evil"), b"x")], "/etc/cron.d/evil"),
    "dotdot": ([(member("../x"), b"x")], "../x"),
    "inner dotdot": ([(member("a/../../x"), b"x")], "a/../../x"),
    "dotdot directory": ([(member("ok/../..", DIR), b"")], "ok/../.."),
    "file over the target": ([(member("./"), b"x")], "./"),
    "symlink to an absolute path": ([(member("evil", SYM, linkname="/etc"), b"")], "evil"),
    "symlink up": ([(member("evil", SYM, linkname="../.."), b"")], "evil"),
    "nested symlink up": ([(member("ok/evil", SYM, linkname="../../x"), b"")], "ok/evil"),
    "symlink up through a symlink": (
        [(member("s", SYM, linkname="."), b""), (member("p", SYM, linkname="s/.."), b"")],
        "p",
    ),
    "symlink made up by a later symlink": (
        [(member("p", SYM, linkname="s/.."), b""), (member("s", SYM, linkname="."), b"")],
        "p",
    ),
    "symlink loop": (
        [(member("a", SYM, linkname="b"), b""), (member("b", SYM, linkname="a"), b"")],
        "a",
    ),
    "file through a symlink": (
        [(member("l", SYM, linkname="ok"), b""), (member("l/x"), b"x")],
        "l/x",
    ),
    "symlink over a directory": (
        [(member("d/x"), b"x"), (member("d", SYM, linkname="ok"), b"")],
        "d",
    ),
    "hard link up": ([(member("h", LNK, linkname="../outside"), b"")], "h"),
    "hard link to an absolute path": ([(member("h", LNK, linkname="/etc/passwd"), b"")], "h"),
    "hard link to a later member": (
        [(member("h", LNK, linkname="later.txt"), b""), (member("later.txt"), b"x")],
        "h",
    ),
    "hard link to a directory": ([(member("h", LNK, linkname="ok"), b"")], "h"),
    "character device": ([(member("tty", tarfile.CHRTYPE, devmajor=5), b"")], "tty"),
    "block device": ([(member("ok/sda", tarfile.BLKTYPE, devmajor=8), b"")], "ok/sda"),
    "fifo": ([(member("pipe", tarfile.FIFOTYPE), b"")], "pipe"),
}


async def refused(fake: FakeFiles, archive: bytes, target: str = TARGET) -> UnsafeArchive:
    before = fake.snapshot()
    with trio.fail_after(TIMEOUT), pytest.raises(UnsafeArchive) as caught:
        await extract_archive(fake, body_of(archive), target)
    assert fake.snapshot() == before, "something was extracted"
    return caught.value


@pytest.mark.parametrize("gzip", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_member_is_refused_by_name_with_nothing_extracted(
    case: str, gzip: bool
) -> None:
    members, culprit = HOSTILE[case]
    error = await refused(with_target(), tar_of(GOOD + members, gzip=gzip))
    assert error.details["member"] == culprit
    assert repr(culprit) in error.message


async def test_refusal_into_a_missing_target_leaves_no_target() -> None:
    fake = FakeFiles()
    fake.add("/workspace/keep", Node("file"))
    members, culprit = HOSTILE["symlink up"]
    error = await refused(fake, tar_of(GOOD + members), "/workspace/new/dir")
    assert error.details["member"] == culprit
    assert not fake.exists("/workspace/new")


async def test_gnu_tar_archives_of_hostile_trees_are_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "plain.txt").write_text("plain\n")
    os.mkfifo(tree / "fifo")
    (tree / "etc").symlink_to("/etc")
    (tmp_path / "outside.txt").write_text("outside\n")
    cases = [
        (["tree/plain.txt", "tree/fifo"], "tree/fifo"),
        (["tree/plain.txt", "tree/etc"], "tree/etc"),
        (["-P", "tree/plain.txt", "tree/../outside.txt"], "tree/../outside.txt"),
        (["-P", str(tmp_path / "outside.txt")], str(tmp_path / "outside.txt")),
    ]
    for names, culprit in cases:
        with trio.fail_after(TIMEOUT):
            command = ["tar", "--format=gnu", "-C", str(tmp_path), "-cf", "-", *names]
            archive = (await trio.run_process(command, capture_stdout=True)).stdout
        error = await refused(with_target(), archive)
        assert error.details["member"] == culprit


async def test_setuid_setgid_and_sticky_bits_are_stripped() -> None:
    fake = FakeFiles()
    archive = tar_of(
        [
            (member("setuid", mode=0o4755), b"#!/bin/sh\n"),
            (member("setgid", mode=0o2640), b"x"),
            (member("sticky", DIR, mode=0o1777), b""),
            (member("closed", DIR, mode=0o555), b""),
            (member("closed/inside", mode=0o400), b"y"),
        ]
    )
    with trio.fail_after(TIMEOUT):
        await extract_archive(fake, body_of(archive), TARGET)
    modes = {name: fake.node(f"{TARGET}/{name}").mode for name in ["setuid", "setgid", "sticky"]}
    assert modes == {"setuid": 0o755, "setgid": 0o640, "sticky": 0o777}
    assert fake.node(f"{TARGET}/closed").mode == 0o755  # its owner can still fill it
    assert fake.node(f"{TARGET}/closed/inside").data == b"y"


def test_member_names_are_normalised_or_refused() -> None:
    assert member_name("./a//b/./c/") == "a/b/c"
    assert member_name(".") == member_name("./") == ""
    assert member_name("a..b/..c") == "a..b/..c"
    for bad in ["/a", "//a", "..", "a/..", "a/../b", "./../a"]:
        with pytest.raises(UnsafeArchive):
            member_name(bad)
