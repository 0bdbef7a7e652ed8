"""The statx compatibility shim: an LD_PRELOAD library (``statx_shim.c``, next to this file)
that strips AT_NO_AUTOMOUNT from statx(2).

Debian 12's own runsc (0.0~20221219) rejects that flag with EINVAL, which breaks bookworm's
``ls``, ``stat``, ... inside a sandbox; newer runsc accepts it, and the shim then changes
nothing. It is compiled on the host and named in the rootfs's ``/etc/ld.so.preload``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

import trio

from sandstorm.images.manifest import ImageBuildError

__all__ = ["STATX_SHIM_PATH", "install_statx_shim"]

STATX_SHIM_PATH: Final = "/usr/lib/sandstorm/statx-shim.so"

# Bound on compiling the shim, a one-function C file.
_COMPILE_TIMEOUT_S: Final = 120.0
_STATX_SHIM_SOURCE: Final = Path(__file__).with_name("statx_shim.c")


async def install_statx_shim(rootfs: Path) -> None:
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
