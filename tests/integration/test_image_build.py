"""The default image as built by scripts/install.sh.

A full build (mmdebstrap) is exercised by the install script, not here. These tests need
``SANDSTORM_TEST_DATA_DIR`` to name a data dir that already holds the default image, and check
that image and that ``build_image`` on it is a no-op.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from sandstorm.images import (
    DEFAULT_IMAGE,
    STATX_SHIM,
    STATX_SHIM_PATH,
    build_image,
    image_rootfs,
    load_manifest,
    load_recipe,
)
from sandstorm.images.languages import probe_languages

_DATA_DIR = os.environ.get("SANDSTORM_TEST_DATA_DIR", "/var/lib/sandstorm")

pytestmark = pytest.mark.skipif(
    not _DATA_DIR or load_manifest(Path(_DATA_DIR)) is None,
    reason="SANDSTORM_TEST_DATA_DIR does not name a data dir with the default image built",
)


@pytest.fixture
def data_dir() -> Path:
    assert _DATA_DIR
    return Path(_DATA_DIR)


async def test_build_is_a_no_op_when_the_image_exists(data_dir: Path) -> None:
    before = load_manifest(data_dir)
    rootfs = image_rootfs(data_dir, DEFAULT_IMAGE)
    inode = rootfs.stat().st_ino
    messages: list[str] = []
    started = time.monotonic()
    with trio.fail_after(5):
        manifest = await build_image(data_dir, log=messages.append)
    assert time.monotonic() - started < 1.0
    assert manifest == before
    assert messages == []
    assert rootfs.stat().st_ino == inode  # not rebuilt, not replaced
    assert not [p for p in (data_dir / "images").iterdir() if p.name.startswith(".tmp-")]


async def test_manifest_lists_the_languages(data_dir: Path) -> None:
    manifest = load_manifest(data_dir)
    assert manifest is not None
    assert manifest.name == DEFAULT_IMAGE
    assert manifest.debian_suite == "bookworm"
    assert manifest.size_bytes > 50_000_000
    versions = {lang.name: lang.version for lang in manifest.languages}
    assert set(versions) >= {"python", "javascript", "bash", "sh"}
    for name, version in versions.items():
        assert version and version[0].isdigit(), (name, version)
    rootfs = image_rootfs(data_dir, DEFAULT_IMAGE)
    for lang in manifest.languages:
        binary = rootfs / lang.argv_prefix[0].lstrip("/")
        assert os.path.lexists(binary), binary


async def test_rootfs_layout_and_no_setuid(data_dir: Path) -> None:
    rootfs = image_rootfs(data_dir, DEFAULT_IMAGE)
    workspace = rootfs / "workspace"
    st = workspace.stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert (rootfs / ".sandstorm").is_dir()
    passwd = (rootfs / "etc/passwd").read_text()
    assert "sandbox:x:1000:1000:" in passwd
    assert ":/workspace:/bin/bash" in passwd
    assert "sandbox:x:1000:" in (rootfs / "etc/group").read_text()
    assert list((rootfs / "var/cache/apt").iterdir()) == []

    def privileged_files() -> list[str]:
        found = []
        root_dev = rootfs.stat().st_dev
        for dirpath, dirnames, filenames in os.walk(rootfs):
            # Stay on the image's file system, like `find -xdev`.
            dirnames[:] = [
                d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == root_dev
            ]
            for filename in filenames:
                mode = os.lstat(os.path.join(dirpath, filename)).st_mode
                if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                    found.append(os.path.join(dirpath, filename))
        return found

    with trio.fail_after(60):
        found = await trio.to_thread.run_sync(privileged_files)
    assert found == []


async def test_statx_shim_is_preloaded(data_dir: Path) -> None:
    # Debian's runsc rejects statx(AT_NO_AUTOMOUNT), which bookworm's ls/stat pass; the image
    # preloads a shim that drops the flag (sandstorm/images/statx_shim.c).
    manifest = load_manifest(data_dir)
    assert manifest is not None
    assert STATX_SHIM in manifest.compat
    rootfs = image_rootfs(data_dir, DEFAULT_IMAGE)
    shim = rootfs / STATX_SHIM_PATH.lstrip("/")
    assert shim.is_file()
    assert shim.read_bytes()[:4] == b"\x7fELF"
    preload = (rootfs / "etc/ld.so.preload").read_text().split()
    assert preload == [STATX_SHIM_PATH]


async def test_the_default_recipes_version_commands_read_the_images_versions(
    data_dir: Path,
) -> None:
    manifest = load_manifest(data_dir)
    assert manifest is not None
    with trio.fail_after(60):
        probed = await probe_languages(
            image_rootfs(data_dir, DEFAULT_IMAGE), load_recipe(DEFAULT_IMAGE).languages
        )
    assert probed == manifest.languages


async def _sandstorm(*args: str) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] = await trio.run_process(
        [sys.executable, "-m", "sandstorm", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    return result


async def test_image_ls_lists_the_built_images(data_dir: Path) -> None:
    with trio.fail_after(60):
        listed = await _sandstorm("image", "ls", "--json", "--data-dir", str(data_dir))
        text = await _sandstorm("image", "ls", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    images = {image["name"]: image for image in json.loads(listed.stdout)}
    manifest = load_manifest(data_dir)
    assert manifest is not None
    default = images[DEFAULT_IMAGE]
    assert default["size_bytes"] == manifest.size_bytes
    assert default["languages"] == [
        {"name": lang.name, "version": lang.version} for lang in manifest.languages
    ]
    assert text.stdout.decode().startswith(DEFAULT_IMAGE)


async def test_building_an_image_without_a_recipe_names_the_recipes(data_dir: Path) -> None:
    with trio.fail_after(60):
        result = await _sandstorm("image", "build", "nothing", "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert b"no recipe for image 'nothing' (recipes: " in result.stderr
    assert not (data_dir / "images" / "nothing").exists()
