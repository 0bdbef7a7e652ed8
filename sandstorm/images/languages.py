"""The languages an image can run, with versions read from the image's own binaries."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

import trio

from sandstorm.images.debian import parse_dpkg_status, upstream_version
from sandstorm.images.manifest import ImageBuildError, LanguageInfo

__all__ = ["bash_version", "node_version", "probe_languages"]

# Bound on each "read a version from the image" command; they take milliseconds.
_PROBE_TIMEOUT_S: Final = 60.0
# A clean environment for the image's binaries: the gateway's own environment stays out.
_PROBE_ENV: Final[dict[str, str]] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/",
}


async def probe_languages(rootfs: Path) -> tuple[LanguageInfo, ...]:
    """The languages of the image at *rootfs*; its binaries run chrooted into it (needs root)."""
    python = await _probe(
        rootfs, ["python3", "-c", "import platform;print(platform.python_version())"]
    )
    node = node_version(await _probe(rootfs, ["node", "--version"]))
    bash = bash_version(await _probe(rootfs, ["bash", "-c", "echo $BASH_VERSION"]))
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


def bash_version(raw: str) -> str:
    """``$BASH_VERSION`` (``5.2.15(1)-release``) as users write it: ``5.2.15``."""
    return raw.strip().split("(", 1)[0]


def node_version(raw: str) -> str:
    """``node --version`` (``v18.19.0``) without its ``v``."""
    return raw.strip().removeprefix("v")
