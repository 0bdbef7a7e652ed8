"""Build an image from its recipe (:mod:`sandstorm.images.recipe`): a Debian rootfs made by
mmdebstrap, its compatibility shims, and the ``image.json`` that records it
(:mod:`sandstorm.images.manifest`).

Building is atomic and locked (:mod:`sandstorm.images.staging`): the image is made inside a
temporary directory next to its final one and renamed into place.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Final

import trio

from sandstorm.images.debian import DEBIAN_SUITE, find_apt_mirror
from sandstorm.images.languages import probe_languages
from sandstorm.images.manifest import (
    DEFAULT_IMAGE,
    IMAGE_COMPAT,
    MANIFEST_NAME,
    ROOTFS_NAME,
    ImageBuildError,
    ImageError,
    ImageManifest,
    encode_manifest,
    image_dir,
    images_root,
    load_manifest,
)
from sandstorm.images.recipe import Recipe, load_recipe
from sandstorm.images.staging import (
    CLEANUP_GRACE_S,
    build_lock,
    install_tree,
    remove_leftovers,
    remove_tree_or_warn,
    tree_size,
)
from sandstorm.images.statx_shim import install_statx_shim

__all__ = [
    "SANDBOX_GID",
    "SANDBOX_UID",
    "build_image",
    "mmdebstrap_command",
]

SANDBOX_UID: Final = 1000
SANDBOX_GID: Final = 1000

_log = logging.getLogger(__name__)

# How much of mmdebstrap's stderr an ImageBuildError carries.
_STDERR_TAIL_LINES: Final = 40


def _customize_hooks(steps: list[str]) -> list[str]:
    """mmdebstrap ``--customize-hook`` shell snippets; mmdebstrap passes the rootfs as ``$1``.
    The recipe's ``steps`` run chrooted in the image before the last checks and clean-up."""
    uid, gid = SANDBOX_UID, SANDBOX_GID
    passwd = f"sandbox:x:{uid}:{gid}:Sandstorm sandbox:/workspace:/bin/bash"
    return [
        # The sandbox's working directory and $HOME, writable by the sandbox user only.
        f'mkdir -p "$1/workspace" && chown {uid}:{gid} "$1/workspace" && chmod 0755 "$1/workspace"',
        # The sandbox user. Appended (not useradd) because the apt variant has no passwd package.
        f"grep -q '^sandbox:' \"$1/etc/passwd\" || echo '{passwd}' >> \"$1/etc/passwd\"",
        f"grep -q '^sandbox:' \"$1/etc/group\" || echo 'sandbox:x:{gid}:' >> \"$1/etc/group\"",
        'if [ -f "$1/etc/shadow" ] && ! grep -q \'^sandbox:\' "$1/etc/shadow"; then'
        " echo 'sandbox:!:19000:0:99999:7:::' >> \"$1/etc/shadow\"; fi",
        'if [ -f "$1/etc/gshadow" ] && ! grep -q \'^sandbox:\' "$1/etc/gshadow"; then'
        " echo 'sandbox:!::' >> \"$1/etc/gshadow\"; fi",
        # Mount point for the agent, which the runtime bind-mounts read-only.
        'mkdir -p "$1/.sandstorm" && chmod 0755 "$1/.sandstorm"',
        *(f'chroot "$1" /bin/sh -c {shlex.quote(step)}' for step in steps),
        # No setuid/setgid programs: nothing in a sandbox may regain privileges.
        'find "$1" -xdev -perm /6000 -type f -exec chmod ug-s {} +',
        # Package caches and lists are dead weight in a read-only image.
        'rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*',
    ]


def mmdebstrap_command(
    rootfs: Path, mirror: str, recipe: Recipe, suite: str = DEBIAN_SUITE
) -> list[str]:
    """The argv that builds the rootfs of *recipe* at *rootfs*."""
    argv = [
        "mmdebstrap",
        "--variant=apt",
        "--mode=root",
        "--include=" + ",".join(recipe.packages),
        '--aptopt=Acquire::Retries "3"',
    ]
    argv += [f"--customize-hook={hook}" for hook in _customize_hooks(recipe.steps)]
    argv += [suite, str(rootfs), mirror]
    return argv


async def build_image(
    data_dir: Path,
    *,
    name: str = DEFAULT_IMAGE,
    force: bool = False,
    mirror: str | None = None,
    log: Callable[[str], object] = _log.info,
) -> ImageManifest:
    """Build the image *name* under *data_dir* from its recipe and return its manifest.

    Idempotent: when the image is already there (manifest and rootfs) and *force* is false this
    returns its manifest and does nothing else, unless it was built from another version of its
    recipe or lacks one of the compatibility shims in :data:`IMAGE_COMPAT` (it was built by an
    older version), which counts as missing.
    Otherwise it runs mmdebstrap (as root) into a temporary directory inside
    ``<data_dir>/images``, reads the language versions from the new image's own binaries, writes
    ``image.json`` and renames the directory into place. With *force*, an existing image is
    renamed away first and deleted afterwards. *mirror* defaults to the Debian mirror in this
    machine's apt sources (:func:`find_apt_mirror`). *log* receives short progress lines.

    Raises :class:`ImageBuildError` (with the tail of mmdebstrap's stderr when it failed, or
    the recipe's file and line when the recipe is wrong).
    Cancellation is safe at any point: the temporary directory is removed under a shielded,
    bounded cleanup, and the final name holds either the old image or the new one.
    """
    data_dir = Path(data_dir)
    final = image_dir(data_dir, name)
    try:
        recipe = load_recipe(name)
    except ValueError as exc:  # RecipeError
        raise ImageBuildError(str(exc)) from None
    if not force:
        existing = _load_current(data_dir, recipe, log)
        if existing is not None:
            return existing
    if os.geteuid() != 0:
        raise ImageBuildError("building an image needs root (mmdebstrap --mode=root and chroot)")
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap not found on PATH (apt-get install mmdebstrap)")
    if shutil.which("gcc") is None:
        raise ImageBuildError(
            "gcc not found on PATH: it compiles the image's statx shim"
            " (apt-get install gcc libc6-dev)"
        )

    root = images_root(data_dir)
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    async with build_lock(root / ".lock", log):
        # Someone else may have built it while we waited for the lock.
        if not force:
            existing = _load_current(data_dir, recipe, log)
            if existing is not None:
                return existing
        await remove_leftovers(root, name, log)

        tmp = root / f".tmp-{name}-{secrets.token_hex(4)}"
        await trio.Path(tmp).mkdir(mode=0o755)
        try:
            manifest = await _build_into(tmp, recipe=recipe, mirror=mirror, log=log)
            await install_tree(tmp, final, name, log)
        except BaseException:
            with trio.move_on_after(CLEANUP_GRACE_S) as cleanup_scope:
                cleanup_scope.shield = True
                await remove_tree_or_warn(tmp, log)
            raise
    log(f"image {name!r} ready at {final} ({manifest.size_bytes / 1e6:.0f} MB)")
    return manifest


def _load_quietly(data_dir: Path, name: str) -> ImageManifest | None:
    """Like load_manifest, but a corrupt manifest means "not built" (so it gets rebuilt)."""
    try:
        return load_manifest(data_dir, name)
    except ImageError as exc:
        _log.warning("ignoring unusable image %r: %s", name, exc)
        return None


def _load_current(
    data_dir: Path, recipe: Recipe, log: Callable[[str], object]
) -> ImageManifest | None:
    """Like _load_quietly, but an image that lacks a compatibility shim, or was built from
    another version of its recipe, means "not built"."""
    name = recipe.name
    existing = _load_quietly(data_dir, name)
    if existing is None:
        return None
    if not existing.is_current():
        missing = ", ".join(c for c in IMAGE_COMPAT if c not in existing.compat)
        log(f"image {name!r} lacks {missing}; rebuilding it")
        return None
    if not existing.built_from(recipe):
        log(f"the recipe of image {name!r} changed; rebuilding it")
        return None
    return existing


async def _build_into(
    tmp: Path, *, recipe: Recipe, mirror: str | None, log: Callable[[str], object]
) -> ImageManifest:
    name = recipe.name
    rootfs = tmp / ROOTFS_NAME
    if mirror is None:
        mirror = find_apt_mirror(DEBIAN_SUITE)
    log(f"building image {name!r}: mmdebstrap {DEBIAN_SUITE} from {mirror}")
    started = trio.current_time()
    await _run_mmdebstrap(mmdebstrap_command(rootfs, mirror, recipe), log)
    log(f"mmdebstrap finished in {trio.current_time() - started:.1f} s; reading versions")

    # Before the probes, so that they (run with the shim preloaded) also check that it loads.
    await install_statx_shim(rootfs)
    languages = await probe_languages(rootfs, recipe.languages)
    size = await trio.to_thread.run_sync(tree_size, rootfs)
    manifest = ImageManifest(
        name=name,
        created_at=_rfc3339_now(),
        debian_suite=DEBIAN_SUITE,
        packages=tuple(recipe.packages),
        languages=languages,
        size_bytes=size,
        compat=IMAGE_COMPAT,
        recipe_sha256=recipe.sha256,
    )
    await trio.Path(tmp / MANIFEST_NAME).write_bytes(encode_manifest(manifest))
    return manifest


async def _run_mmdebstrap(argv: list[str], log: Callable[[str], object]) -> None:
    tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
    async with trio.open_nursery() as nursery:
        # nursery.start hands us the Process while run_process keeps ownership of it: on
        # cancellation it terminates mmdebstrap (SIGTERM, then SIGKILL) and reaps it.
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                argv,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
        assert proc.stderr is not None
        async for line in _lines(proc.stderr):
            tail.append(line)
            # mmdebstrap's own progress is "I: ..."; apt's chatter stays in the tail only.
            if line.startswith(("I: ", "E: ", "W: ")):
                log(line)
    if proc.returncode != 0:
        raise ImageBuildError(
            f"mmdebstrap exited with status {proc.returncode}:\n" + "\n".join(tail)
        )


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buf = b""
    async for chunk in stream:
        buf += chunk
        *complete, buf = buf.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace").rstrip("\r")
    if buf:
        yield buf.decode("utf-8", "replace")


def _rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
