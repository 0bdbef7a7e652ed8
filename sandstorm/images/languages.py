"""The languages an image can run, with versions read from the image's own binaries."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from sandstorm.images.manifest import ImageBuildError, LanguageInfo
from sandstorm.images.recipe import RecipeLanguage

__all__ = ["probe_languages"]

# Bound on each "read a version from the image" command; they take milliseconds.
_PROBE_TIMEOUT_S: Final = 60.0
# A clean environment for the image's binaries: the gateway's own environment stays out.
_PROBE_ENV: Final[dict[str, str]] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/",
}


async def probe_languages(
    rootfs: Path, languages: Sequence[RecipeLanguage]
) -> tuple[LanguageInfo, ...]:
    """The recipe's *languages* with their versions, each read by running the recipe's own
    version command in the image at *rootfs* (chrooted: needs root)."""
    found = []
    for language in languages:
        version = await _probe(rootfs, list(language.version))
        found.append(
            LanguageInfo(name=language.name, version=version, argv_prefix=tuple(language.run))
        )
    return tuple(found)


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
