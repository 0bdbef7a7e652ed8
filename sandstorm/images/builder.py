"""Build and catalogue the Debian root filesystems that sandboxes boot from.

An image lives at ``<data_dir>/images/<name>/`` as two entries:

``rootfs/``
    A Debian tree made by ``mmdebstrap``. Runtimes mount it read-only (gVisor puts a private,
    memory-backed overlay on top), so one copy backs every sandbox.
``image.json``
    An :class:`ImageManifest`: what was built, when, and the language versions *read from the
    image's own binaries*, which ``GET /v1/languages`` reports.

The rootfs also carries compatibility shims (:data:`IMAGE_COMPAT`) that the image needs under
some gVisor builds (Debian 12's own runsc); the manifest lists them, and an image built without
one of them counts as out of date.

Building is atomic: everything is made inside a temporary directory next to the final one and
renamed into place, so a crash or a cancellation never leaves a half-built image under its final
name. A build holds an exclusive lock on ``<data_dir>/images/.lock`` so two builders (say the
install script and a test run) cannot race.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Final

import msgspec
import trio

__all__ = [
    "DEBIAN_SUITE",
    "DEFAULT_IMAGE",
    "DEFAULT_MIRROR",
    "IMAGE_COMPAT",
    "IMAGE_PACKAGES",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "STATX_SHIM",
    "STATX_SHIM_PATH",
    "ImageBuildError",
    "ImageError",
    "ImageManifest",
    "LanguageInfo",
    "build_image",
    "find_apt_mirror",
    "image_dir",
    "image_rootfs",
    "load_manifest",
    "parse_deb822_sources",
    "parse_dpkg_status",
    "parse_one_line_sources",
]

DEFAULT_IMAGE: Final = "default"
DEBIAN_SUITE: Final = "bookworm"
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
#: Debian's full ``python3`` (not ``python3-minimal``, which lacks json and most of the stdlib).
IMAGE_PACKAGES: Final[tuple[str, ...]] = ("python3", "nodejs", "bash", "coreutils")
SANDBOX_UID: Final = 1000
SANDBOX_GID: Final = 1000

#: An LD_PRELOAD library (``statx_shim.c``, next to this file) that strips AT_NO_AUTOMOUNT from
#: statx(2): Debian 12's own runsc (0.0~20221219) rejects that flag with EINVAL, which breaks
#: bookworm's ``ls``, ``stat``, ... inside a sandbox; newer runsc accepts it, and the shim then
#: changes nothing. Compiled on the host and named in ``/etc/ld.so.preload``.
STATX_SHIM: Final = "statx-shim"
STATX_SHIM_PATH: Final = "/usr/lib/sandstorm/statx-shim.so"
#: The compatibility shims every current image has; recorded in the manifest's ``compat``.
IMAGE_COMPAT: Final[tuple[str, ...]] = (STATX_SHIM,)

MANIFEST_NAME: Final = "image.json"
ROOTFS_NAME: Final = "rootfs"

_log = logging.getLogger(__name__)

# Image names become directory names; keep them boring.
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# How much of mmdebstrap's stderr an ImageBuildError carries.
_STDERR_TAIL_LINES: Final = 40
# Bound on each "read a version from the image" command; they take milliseconds.
_PROBE_TIMEOUT_S: Final = 60.0
# Bound on compiling the statx shim (a one-function C file; well under a second).
_COMPILE_TIMEOUT_S: Final = 120.0
_STATX_SHIM_SOURCE: Final = Path(__file__).with_name("statx_shim.c")
# Cleanup of a failed or replaced image may take a while (a rootfs is thousands of files) but
# must not hang a shutdown forever.
_CLEANUP_GRACE_S: Final = 120.0
# A clean environment for the image's binaries: the gateway's own environment stays out.
_PROBE_ENV: Final[dict[str, str]] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/",
}


class ImageError(Exception):
    """An image is missing, unreadable or could not be made."""


class ImageBuildError(ImageError):
    """Building an image failed; the message ends with the tail of the failing tool's stderr."""


class LanguageInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One language the image can run.

    ``argv_prefix`` is the command that runs a program given as source text: the agent appends
    the code as one more argument (``["/usr/bin/python3", "-c"] + [code]``).
    """

    name: str
    version: str
    argv_prefix: tuple[str, ...]


class ImageManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What ``image.json`` records about a built image."""

    name: str
    created_at: str
    """RFC 3339 UTC, e.g. ``2026-11-26T07:03:00Z``."""
    debian_suite: str
    packages: tuple[str, ...]
    """The packages asked for on top of Debian's essential set."""
    languages: tuple[LanguageInfo, ...]
    size_bytes: int
    """Bytes of the rootfs (regular files, each hard link counted once)."""
    compat: tuple[str, ...] = ()
    """Compatibility shims built into the rootfs (:data:`IMAGE_COMPAT`); empty in manifests
    written before there were any."""

    def is_current(self) -> bool:
        """Whether the image has every shim this version of the builder installs."""
        return set(IMAGE_COMPAT) <= set(self.compat)

    def language(self, name: str) -> LanguageInfo | None:
        """The language called *name*, or None."""
        for lang in self.languages:
            if lang.name == name:
                return lang
        return None


_manifest_decoder: Final = msgspec.json.Decoder(ImageManifest)
_manifest_encoder: Final = msgspec.json.Encoder()


def encode_manifest(manifest: ImageManifest) -> bytes:
    """The manifest as pretty-printed JSON (it is read by humans too)."""
    return msgspec.json.format(_manifest_encoder.encode(manifest), indent=2) + b"\n"


def decode_manifest(data: bytes | str) -> ImageManifest:
    """Parse ``image.json``; raises :class:`ImageError` when it is malformed."""
    try:
        return _manifest_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ImageError(f"invalid image manifest: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Paths and the catalogue


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid image name {name!r}: want [a-z0-9][a-z0-9._-]*, max 63 chars")
    return name


def images_root(data_dir: Path) -> Path:
    """``<data_dir>/images``."""
    return Path(data_dir) / "images"


def image_dir(data_dir: Path, name: str = DEFAULT_IMAGE) -> Path:
    """``<data_dir>/images/<name>``."""
    return images_root(data_dir) / _check_name(name)


def image_rootfs(data_dir: Path, name: str = DEFAULT_IMAGE) -> Path:
    """``<data_dir>/images/<name>/rootfs``, the directory a runtime uses as the sandbox's root."""
    return image_dir(data_dir, name) / ROOTFS_NAME


def load_manifest(data_dir: Path, name: str = DEFAULT_IMAGE) -> ImageManifest | None:
    """The manifest of a built image, or None when the image is not there.

    Synchronous and cheap (one small file read): meant for start-up. An image counts as built
    only when both ``image.json`` and ``rootfs/`` exist. A manifest that exists but cannot be
    parsed raises :class:`ImageError`.
    """
    directory = image_dir(data_dir, name)
    try:
        data = (directory / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(f"cannot read {directory / MANIFEST_NAME}: {exc}") from exc
    if not (directory / ROOTFS_NAME).is_dir():
        return None
    return decode_manifest(data)


# --------------------------------------------------------------------------------------------
# Pure parsing helpers (unit-tested)


def _deb822_paragraphs(text: str) -> Iterable[dict[str, str]]:
    """Paragraphs of a deb822 file as {lower-case field: value}; continuation lines are joined."""
    fields: dict[str, str] = {}
    current: str | None = None
    for raw in [*text.splitlines(), ""]:
        line = raw.rstrip()
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, current = {}, None
            continue
        if line[0] in " \t":
            if current is not None:
                # " ." is deb822's way to write an empty line inside a multi-line value.
                piece = line.strip()
                fields[current] += "\n" + ("" if piece == "." else piece)
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue  # not a field; apt would reject it, we just skip it
        current = key.strip().lower()
        fields[current] = value.strip()


def parse_deb822_sources(text: str, suite: str = DEBIAN_SUITE) -> list[str]:
    """Mirror URIs of the enabled ``deb`` entries for *suite* (exactly, not ``suite-updates``)
    with the ``main`` component, from an apt ``.sources`` (deb822) file, in file order."""
    uris: list[str] = []
    for para in _deb822_paragraphs(text):
        if para.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in para.get("types", "").split():
            continue
        if suite not in para.get("suites", "").split():
            continue
        if "main" not in para.get("components", "").split():
            continue
        for uri in para.get("uris", "").split():
            if _usable_mirror(uri) and uri not in uris:
                uris.append(uri)
    return uris


def parse_one_line_sources(text: str, suite: str = DEBIAN_SUITE) -> list[str]:
    """Mirror URIs of the ``deb`` lines for *suite* with the ``main`` component, from an apt
    ``sources.list`` in the one-line format (``deb [opts] URI SUITE COMPONENT...``)."""
    uris: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # Options may contain spaces inside the brackets: "[arch=amd64 signed-by=...]".
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) < 4 or words[0] != "deb":
            continue
        uri, line_suite, components = words[1], words[2], words[3:]
        if line_suite != suite or "main" not in components:
            continue
        if _usable_mirror(uri) and uri not in uris:
            uris.append(uri)
    return uris


def _usable_mirror(uri: str) -> bool:
    # mmdebstrap fetches with apt, which handles these; a cdrom: entry is useless for us.
    return uri.split(":", 1)[0] in {"http", "https", "file", "mirror+http", "mirror+https"}


def find_apt_mirror(suite: str = DEBIAN_SUITE, *, apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt already uses for *suite*.

    Looks at ``sources.list.d/debian.sources`` (deb822, Debian 12's default) and then
    ``sources.list`` (one-line format). Other files under ``sources.list.d`` are third-party
    repositories (Docker, NodeSource, ...) and are not Debian mirrors, so they are ignored.
    Falls back to :data:`DEFAULT_MIRROR` (e.g. on Ubuntu, whose sources have no ``bookworm``).
    """
    candidates: list[tuple[Path, Callable[[str, str], list[str]]]] = [
        (apt_dir / "sources.list.d" / "debian.sources", parse_deb822_sources),
        (apt_dir / "sources.list", parse_one_line_sources),
    ]
    for path, parse in candidates:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        uris = parse(text, suite)
        if uris:
            return uris[0]
    return DEFAULT_MIRROR


def parse_dpkg_status(text: str, package: str) -> str | None:
    """The version of *package* in a ``/var/lib/dpkg/status`` file, if it is installed."""
    for para in _deb822_paragraphs(text):
        if para.get("package") != package:
            continue
        status = para.get("status", "install ok installed").split()
        if status[-1:] != ["installed"]:
            continue
        version = para.get("version")
        if version:
            return version
    return None


def upstream_version(debian_version: str) -> str:
    """``1:0.5.12-2+b1`` → ``0.5.12``: drop the epoch and the Debian revision."""
    version = debian_version.split(":", 1)[-1]
    if "-" in version:
        version = version.rsplit("-", 1)[0]
    return version


def _bash_version(raw: str) -> str:
    # $BASH_VERSION is "5.2.15(1)-release"; users expect "5.2.15".
    return raw.strip().split("(", 1)[0]


def _node_version(raw: str) -> str:
    return raw.strip().removeprefix("v")


def _customize_hooks() -> list[str]:
    """mmdebstrap ``--customize-hook`` shell snippets; mmdebstrap passes the rootfs as ``$1``."""
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
        # No setuid/setgid programs: nothing in a sandbox may regain privileges.
        'find "$1" -xdev -perm /6000 -type f -exec chmod ug-s {} +',
        # Package caches and lists are dead weight in a read-only image.
        'rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*',
    ]


def mmdebstrap_command(rootfs: Path, mirror: str, suite: str = DEBIAN_SUITE) -> list[str]:
    """The argv that builds the rootfs at *rootfs*."""
    argv = [
        "mmdebstrap",
        "--variant=apt",
        "--mode=root",
        "--include=" + ",".join(IMAGE_PACKAGES),
        '--aptopt=Acquire::Retries "3"',
    ]
    argv += [f"--customize-hook={hook}" for hook in _customize_hooks()]
    argv += [suite, str(rootfs), mirror]
    return argv


def _rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Building


async def build_image(
    data_dir: Path,
    *,
    name: str = DEFAULT_IMAGE,
    force: bool = False,
    mirror: str | None = None,
    log: Callable[[str], object] = _log.info,
) -> ImageManifest:
    """Build the image *name* under *data_dir* and return its manifest.

    Idempotent: when the image is already there (manifest and rootfs) and *force* is false this
    returns its manifest and does nothing else, unless the image lacks one of the compatibility
    shims in :data:`IMAGE_COMPAT` (it was built by an older version), which counts as missing.
    Otherwise it runs mmdebstrap (as root) into a temporary directory inside
    ``<data_dir>/images``, reads the language versions from the new image's own binaries, writes
    ``image.json`` and renames the directory into place. With *force*, an existing image is
    renamed away first and deleted afterwards. *mirror* defaults to the Debian mirror in this
    machine's apt sources (:func:`find_apt_mirror`). *log* receives short progress lines.

    Raises :class:`ImageBuildError` (with the tail of mmdebstrap's stderr when it failed).
    Cancellation is safe at any point: the temporary directory is removed under a shielded,
    bounded cleanup, and the final name holds either the old image or the new one.
    """
    data_dir = Path(data_dir)
    final = image_dir(data_dir, name)
    if not force:
        existing = _load_current(data_dir, name, log)
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
    async with _build_lock(root / ".lock", log):
        # Someone else may have built it while we waited for the lock.
        if not force:
            existing = _load_current(data_dir, name, log)
            if existing is not None:
                return existing
        await _remove_leftovers(root, name, log)

        tmp = root / f".tmp-{name}-{secrets.token_hex(4)}"
        await trio.Path(tmp).mkdir(mode=0o755)
        try:
            manifest = await _build_into(tmp, name=name, mirror=mirror, log=log)
            await _install(tmp, final, name, log)
        except BaseException:
            with trio.move_on_after(_CLEANUP_GRACE_S) as cleanup_scope:
                cleanup_scope.shield = True
                await _remove_tree_or_warn(tmp, log)
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


def _load_current(data_dir: Path, name: str, log: Callable[[str], object]) -> ImageManifest | None:
    """Like _load_quietly, but an image that lacks a compatibility shim means "not built"."""
    existing = _load_quietly(data_dir, name)
    if existing is None or existing.is_current():
        return existing
    missing = ", ".join(c for c in IMAGE_COMPAT if c not in existing.compat)
    log(f"image {name!r} lacks {missing}; rebuilding it")
    return None


async def _build_into(
    tmp: Path, *, name: str, mirror: str | None, log: Callable[[str], object]
) -> ImageManifest:
    rootfs = tmp / ROOTFS_NAME
    if mirror is None:
        mirror = find_apt_mirror(DEBIAN_SUITE)
    log(f"building image {name!r}: mmdebstrap {DEBIAN_SUITE} from {mirror}")
    started = trio.current_time()
    await _run_mmdebstrap(mmdebstrap_command(rootfs, mirror), log)
    log(f"mmdebstrap finished in {trio.current_time() - started:.1f} s; reading versions")

    # Before the probes, so that they (run with the shim preloaded) also check that it loads.
    await _install_statx_shim(rootfs)
    languages = await _probe_languages(rootfs)
    size = await trio.to_thread.run_sync(_tree_size, rootfs)
    manifest = ImageManifest(
        name=name,
        created_at=_rfc3339_now(),
        debian_suite=DEBIAN_SUITE,
        packages=IMAGE_PACKAGES,
        languages=languages,
        size_bytes=size,
        compat=IMAGE_COMPAT,
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


async def _install_statx_shim(rootfs: Path) -> None:
    """Compile the statx shim into the rootfs and name it in the rootfs's /etc/ld.so.preload.

    Compiled with the host's gcc: the host and the image are both Debian 12 (glibc 2.36,
    x86_64), so the ABI matches and the image needs no compiler of its own.
    """
    if not _STATX_SHIM_SOURCE.is_file():
        raise ImageBuildError(f"the statx shim's source {_STATX_SHIM_SOURCE} is missing")
    target = rootfs / STATX_SHIM_PATH.lstrip("/")
    await trio.Path(target.parent).mkdir(mode=0o755, parents=True, exist_ok=True)
    argv = ["gcc", "-O2", "-shared", "-fPIC", "-o", str(target), str(_STATX_SHIM_SOURCE)]
    try:
        with trio.fail_after(_COMPILE_TIMEOUT_S):
            result = await trio.run_process(
                argv,
                capture_stdout=True,
                capture_stderr=True,
                stdin=subprocess.DEVNULL,
                check=False,
            )
    except trio.TooSlowError:
        raise ImageBuildError("compiling the statx shim did not finish") from None
    except OSError as exc:
        raise ImageBuildError(f"cannot run gcc (apt-get install gcc libc6-dev): {exc}") from exc
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip()
        raise ImageBuildError(
            f"compiling the statx shim failed (status {result.returncode};"
            f" apt-get install gcc libc6-dev):\n{err[-2000:]}"
        )
    await trio.Path(target).chmod(0o644)
    await trio.Path(rootfs / "etc/ld.so.preload").write_text(STATX_SHIM_PATH + "\n")


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buf = b""
    async for chunk in stream:
        buf += chunk
        *complete, buf = buf.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace").rstrip("\r")
    if buf:
        yield buf.decode("utf-8", "replace")


async def _probe(rootfs: Path, argv: list[str]) -> str:
    """Run one of the image's own binaries (chrooted into it) and return its stdout."""
    cmd = ["chroot", str(rootfs), *argv]
    try:
        with trio.fail_after(_PROBE_TIMEOUT_S):
            result = await trio.run_process(
                cmd,
                capture_stdout=True,
                capture_stderr=True,
                stdin=subprocess.DEVNULL,
                env=_PROBE_ENV,
                check=False,
            )
    except trio.TooSlowError:
        raise ImageBuildError(f"{' '.join(argv)} in the image did not finish") from None
    except OSError as exc:
        raise ImageBuildError(f"cannot run chroot: {exc}") from exc
    out = result.stdout.decode("utf-8", "replace").strip()
    if result.returncode != 0 or not out:
        err = result.stderr.decode("utf-8", "replace").strip()
        raise ImageBuildError(
            f"{' '.join(argv)} in the image failed (status {result.returncode}): {err[-2000:]}"
        )
    return out


async def _probe_languages(rootfs: Path) -> tuple[LanguageInfo, ...]:
    python = await _probe(
        rootfs, ["python3", "-c", "import platform;print(platform.python_version())"]
    )
    node = _node_version(await _probe(rootfs, ["node", "--version"]))
    bash = _bash_version(await _probe(rootfs, ["bash", "-c", "echo $BASH_VERSION"]))
    status = await trio.Path(rootfs / "var/lib/dpkg/status").read_text(
        encoding="utf-8", errors="replace"
    )
    dash = parse_dpkg_status(status, "dash")
    if dash is None:
        raise ImageBuildError("dash is not installed in the image (no /bin/sh)")
    return (
        LanguageInfo(name="python", version=python, argv_prefix=("/usr/bin/python3", "-c")),
        LanguageInfo(name="javascript", version=node, argv_prefix=("/usr/bin/node", "-e")),
        LanguageInfo(name="bash", version=bash, argv_prefix=("/bin/bash", "-c")),
        LanguageInfo(name="sh", version=upstream_version(dash), argv_prefix=("/bin/sh", "-c")),
    )


def _tree_size(root: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, filename))
            except OSError:
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
    return total


async def _install(tmp: Path, final: Path, name: str, log: Callable[[str], object]) -> None:
    """Rename *tmp* to *final*; an existing *final* is renamed away first, then deleted."""
    old: Path | None = None
    if await trio.Path(final).exists():
        old = final.with_name(f".old-{name}-{secrets.token_hex(4)}")
        log(f"replacing the existing image {name!r}")
        await trio.Path(final).rename(old)
    try:
        await trio.Path(tmp).rename(final)
    except BaseException:
        if old is not None:
            with trio.CancelScope(shield=True):
                await trio.Path(old).rename(final)
        raise
    if old is not None:
        with trio.move_on_after(_CLEANUP_GRACE_S) as scope:
            scope.shield = True
            await _remove_tree_or_warn(old, log)


async def _remove_leftovers(root: Path, name: str, log: Callable[[str], object]) -> None:
    """Delete temp and replaced-image directories a crashed build left behind.

    Called with the build lock held, so none of them belongs to a live build.
    """
    for prefix in (f".tmp-{name}-", f".old-{name}-"):
        for path in await trio.Path(root).glob(prefix + "*"):
            log(f"removing leftover {path}")
            await _remove_tree(Path(path))


def _mounts_under(path: Path) -> list[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        # /proc/self/mounts escapes spaces etc. as octal (\040).
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if target == str(path) or target.startswith(prefix):
            found.append(target)
    return found


async def _remove_tree(path: Path) -> None:
    """Delete *path*; refuse if anything is still mounted under it.

    mmdebstrap mounts /proc, /sys and device nodes inside the rootfs while it runs. If it was
    killed before unmounting them, a plain recursive delete would walk into the host's /dev and
    /sys; so lazily unmount what is left first, and give up loudly if that fails.
    """
    if not await trio.Path(path).exists():
        return
    mounts = _mounts_under(path)
    for target in sorted(mounts, key=len, reverse=True):
        await trio.run_process(["umount", "--lazy", target], check=False)
    still = _mounts_under(path)
    if still:
        raise ImageBuildError(f"not deleting {path}: still mounted: {', '.join(still)}")
    await trio.to_thread.run_sync(partial(shutil.rmtree, path, ignore_errors=True))


async def _remove_tree_or_warn(path: Path, log: Callable[[str], object]) -> None:
    # Used on cleanup paths, where the build's own outcome (or exception) must win.
    try:
        await _remove_tree(path)
    except (ImageError, OSError) as exc:
        log(f"warning: could not remove {path}: {exc}")


@contextlib.asynccontextmanager
async def _build_lock(path: Path, log: Callable[[str], object]) -> AsyncIterator[None]:
    """An exclusive flock on *path*, polled so that waiting for it stays cancellable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if not waited:
                log(f"waiting for another image build to finish ({path})")
                waited = True
            await trio.sleep(0.5)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
