"""Local trees and a running sandbox for the tests of the SDK's and the CLI's file calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.harness import RunningGateway

BLOB = bytes(range(256)) * 4096 + b"\x00tail"  # 1 MiB of every byte value, and more


def make_tree(root: Path) -> None:
    """Nested directories, a binary file, an empty file, an executable and a symlink."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "readme.txt").write_text("hello tree\n")
    (root / "sub" / "blob.bin").write_bytes(BLOB)
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("sub/blob.bin", root / "link")


def tree_of(root: Path) -> dict[str, Any]:
    """What a tree holds: names, types, contents, symlink targets, the owner's exec bit."""
    seen: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            seen[name] = ("symlink", os.readlink(path))
        elif path.is_dir():
            seen[name] = "dir"
        else:
            seen[name] = (path.read_bytes(), bool(path.stat().st_mode & 0o100))
    return seen


async def sandbox(gw: RunningGateway) -> str:
    created = await gw.run_ok(code="print('up')", language="python", keep_alive=300)
    return str(created["id"])
