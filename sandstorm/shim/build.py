"""The shim binary: ``shim.c`` compiled with the host's gcc, once per source.

The binary is named by the source's hash (``bin/sandstorm-shim-<hash>``), so a changed
``shim.c`` gets a new binary and a shim still running from an older one (a gateway upgraded
under its sandboxes) keeps its own file and is still recognised as a shim (``is_shim_argv``).
It is written to a temporary name and renamed into place: two gateways building at once both
end with one whole binary.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path
from typing import Final

SHIM_SOURCE: Final = Path(__file__).resolve().with_name("shim.c")
SHIM_BIN_DIR: Final = SHIM_SOURCE.parent / "bin"
SHIM_PREFIX: Final = "sandstorm-shim-"
GCC_TIMEOUT_S: Final = 120.0
_GCC_FLAGS: Final = ("-O2", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2", "-s")

_lock = threading.Lock()
_built: Path | None = None


class ShimBuildError(RuntimeError):
    """The shim cannot be compiled here; the message says what to install or fix."""


def shim_binary_path() -> Path:
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:16]
    return SHIM_BIN_DIR / f"{SHIM_PREFIX}{digest}"


def is_shim_argv(argv: list[bytes]) -> bool:
    """Whether a process's command line (``/proc/PID/cmdline`` split at NULs) is a shim's:
    a binary of ``SHIM_BIN_DIR`` named by a source hash, whichever version."""
    if not argv:
        return False
    directory, _, name = argv[0].rpartition(b"/")
    return directory == os.fsencode(SHIM_BIN_DIR) and name.startswith(SHIM_PREFIX.encode())


def ensure_shim_binary() -> Path:
    """The current shim binary, compiled first if it is missing. Blocking (gcc takes ~0.5 s,
    once per source); raises ``ShimBuildError``."""
    global _built
    if _built is not None:  # this process built or found it: the source is not read again
        return _built
    with _lock:
        try:
            target = shim_binary_path()
        except OSError as exc:
            raise ShimBuildError(f"cannot read the shim's source {SHIM_SOURCE}: {exc}") from exc
        if target.is_file():
            _built = target
            return target
        try:
            SHIM_BIN_DIR.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ShimBuildError(f"cannot create {SHIM_BIN_DIR} for the shim: {exc}") from exc
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        argv = ["gcc", *_GCC_FLAGS, "-o", str(tmp), str(SHIM_SOURCE)]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=GCC_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tmp.unlink(missing_ok=True)
            raise ShimBuildError(
                f"cannot run gcc to build the shim (apt-get install gcc libc6-dev): {exc}"
            ) from exc
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            err = done.stderr.decode(errors="replace")[-2000:]
            raise ShimBuildError(f"gcc failed to build {SHIM_SOURCE}:\n{err}")
        os.replace(tmp, target)
        _built = target
        return target
