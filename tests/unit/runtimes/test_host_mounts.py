"""Host read-only binds (``runtimes/host_mounts.py``): real mounts, as root."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandstorm.runtimes.host_mounts import bind_read_only, mounts_under, unmount_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Path]:
    """A world-writable tree with a tmpfs mounted inside it (a submount of the source)."""
    tree = tmp_path / "source with space"
    (tree / "sub").mkdir(parents=True)
    (tree / "data.txt").write_text("original\n")
    os.chmod(tree / "data.txt", 0o666)
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tree / "sub")]
    subprocess.run(mount, check=True)
    (tree / "sub" / "inner.txt").write_text("inner\n")
    try:
        yield tree
    finally:
        unmount_all(tmp_path)


def _refused(action: object) -> int:
    try:
        action()  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_every_mount_of_the_tree_is_read_only_and_the_source_untouched(
    source: Path, tmp_path: Path
) -> None:
    guarded = tmp_path / "bundle" / "ro" / "0"
    guarded.parent.mkdir(parents=True)
    bind_read_only(source, guarded)
    assert mounts_under(guarded) == [guarded, guarded / "sub"]
    assert (guarded / "data.txt").read_text() == "original\n"
    erofs = errno.EROFS
    assert _refused(lambda: os.open(guarded / "data.txt", os.O_WRONLY | os.O_TRUNC)) == erofs
    assert _refused(lambda: os.truncate(guarded / "data.txt", 0)) == erofs
    assert _refused(lambda: (guarded / "new.txt").write_text("x")) == erofs
    assert _refused(lambda: (guarded / "sub" / "inner.txt").write_text("x")) == erofs
    assert _refused(lambda: os.chmod(guarded / "data.txt", 0o777)) == erofs
    assert (source / "data.txt").read_text() == "original\n"

    detached = unmount_all(tmp_path / "bundle")
    assert detached == [guarded, guarded / "sub"]
    assert mounts_under(tmp_path / "bundle") == []
    # With nothing mounted, deleting the bundle cannot reach the source.
    shutil.rmtree(tmp_path / "bundle")
    assert (source / "data.txt").read_text() == "original\n"
    assert (source / "sub" / "inner.txt").read_text() == "inner\n"


def test_a_file_source_and_a_failed_bind_leave_nothing_mounted(
    source: Path, tmp_path: Path
) -> None:
    target = tmp_path / "file-target"
    bind_read_only(source / "data.txt", target)
    assert target.read_text() == "original\n"
    assert _refused(lambda: target.write_text("x")) == errno.EROFS
    assert unmount_all(target) == [target]

    missing = tmp_path / "dir-target"
    with pytest.raises(OSError):
        bind_read_only(tmp_path / "does-not-exist", missing)
    assert mounts_under(missing) == []
    assert unmount_all(tmp_path / "nothing-here") == []
