"""A tree of every kind of thing an archive carries, archives of it as Python's tarfile and GNU
tar make them, and descriptions of a tree (on the host or in the fake) to compare."""

from __future__ import annotations

import io
import os
import posixpath
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests.unit.files.fakefs import FakeFiles, Node

BIG = 5 * 1024 * 1024
LONG_DIR = "d" * 150
LONG_FILE = "f" * 120 + ".txt"
UNICODE_DIR = "données"
UNICODE_FILE = "ünïcødé-ファイル.txt"
#: Who makes the archive: tarfile or GNU tar, in which format, gzipped or not.
MAKERS = ["tarfile", "tarfile-gz", "gnu", "gnu-gz", "pax", "pax-gz"]
MTIME = 1_700_000_123


def build_tree(root: Path) -> Path:
    """``root/tree``: nested, empty and long-named directories, a 5 MiB file, an empty file,
    a unicode name, symlinks (to a directory, up, across, with a long target) and hard links
    (one to a long name)."""
    tree = root / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (tree / "empty").mkdir()
    (tree / "private").mkdir(mode=0o750)
    (tree / "private").chmod(0o750)
    (tree / "big.bin").write_bytes(bytes(range(256)) * (BIG // 256))
    (tree / "empty.txt").write_bytes(b"")
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    (tree / LONG_DIR).mkdir()
    (tree / LONG_DIR / LONG_FILE).write_text("long\n")
    (tree / UNICODE_DIR).mkdir()
    (tree / UNICODE_DIR / UNICODE_FILE).write_text("ünïcødé\n")
    (tree / "link").symlink_to("a/b")
    (tree / "long-link").symlink_to(f"{LONG_DIR}/{LONG_FILE}")  # a target past 100 bytes
    os.link(tree / LONG_DIR / LONG_FILE, tree / "a" / "hard-to-long")
    (tree / "a" / "b" / "up").symlink_to("../../big.bin")
    (tree / "hard1").write_text("shared\n")
    os.link(tree / "hard1", tree / "a" / "hard2")
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return tree


def make_tar(tree: Path, maker: str) -> bytes:
    gzip = maker.endswith("-gz")
    if maker.startswith("tarfile"):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as tar:
            tar.add(tree, arcname=tree.name)
        return out.getvalue()
    command = ["tar", f"--format={maker.removesuffix('-gz')}", "-C", str(tree.parent), "-c"]
    command += ["-z"] if gzip else []
    done = subprocess.run(
        [*command, "-f", "-", tree.name], capture_output=True, check=True, timeout=60
    )
    return done.stdout


def gnu_extract(archive: bytes, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    gzip = ["-z"] if archive.startswith(b"\x1f\x8b") else []
    command = ["tar", "-x", *gzip, "-f", "-", "-C", str(into)]
    subprocess.run(command, input=archive, check=True, timeout=60)


def describe_host(root: Path, *, hard_links: bool = True) -> dict[str, Any]:
    """Every entry under ``root``: type, permissions, data or target, mtime of files; and,
    with ``hard_links``, which names share an inode."""
    found: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for path in sorted([root, *root.rglob("*")]):
        rel = path.relative_to(root).as_posix()
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[rel] = ("symlink", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[rel] = ("dir", stat.S_IMODE(info.st_mode))
        else:
            found[rel] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes(), int(info.st_mtime))
            inodes.setdefault(info.st_ino, []).append(rel)
    if hard_links:
        found["<hard links>"] = sorted(sorted(names) for names in inodes.values() if len(names) > 1)
    return found


def describe_fake(fake: FakeFiles, root: str, *, hard_links: bool = True) -> dict[str, Any]:
    """As :func:`describe_host`, for the fake's tree under ``root``."""
    found: dict[str, Any] = {}
    nodes: dict[int, list[str]] = {}

    def visit(node: Node, rel: str) -> None:
        if node.type == "symlink":
            found[rel] = ("symlink", node.target)
        elif node.type == "dir":
            found[rel] = ("dir", node.mode)
            for name, child in node.children.items():
                visit(child, name if rel == "." else posixpath.join(rel, name))
        else:
            found[rel] = ("file", node.mode, node.data, int(node.mtime))
            nodes.setdefault(id(node), []).append(rel)

    visit(fake.node(root), ".")
    found = dict(sorted(found.items()))
    if hard_links:
        found["<hard links>"] = sorted(sorted(names) for names in nodes.values() if len(names) > 1)
    return found


def expected_counts(tree: Path) -> tuple[int, int]:
    """The files (non-directories, hard links included) and bytes of data an extraction of
    ``tree`` reports: each inode's data counted once."""
    files, inodes = 0, {}
    for path in tree.rglob("*"):
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            files += 1
            if stat.S_ISREG(info.st_mode):
                inodes[info.st_ino] = info.st_size
    return files, sum(inodes.values())


def staging_left(fake: FakeFiles) -> list[str]:
    return [path for path in fake.snapshot() if ".sandstorm-extract-" in path]
