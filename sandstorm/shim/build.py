"""The shim binary: ``shim.c`` compiled with the host's gcc, once per source (see
``sandstorm.native``).

A shim still running from an older binary (a gateway upgraded under its sandboxes) is still
recognised as a shim (``is_shim_argv``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Final

from sandstorm.native import NativeBuildError, binary_path, compile_once, is_binary_argv

SHIM_SOURCE: Final = Path(__file__).resolve().with_name("shim.c")
SHIM_BIN_DIR: Final = SHIM_SOURCE.parent / "bin"
SHIM_PREFIX: Final = "sandstorm-shim-"

_lock = threading.Lock()
_built: Path | None = None


class ShimBuildError(NativeBuildError):
    """The shim cannot be compiled here; the message says what to install or fix."""


def shim_binary_path() -> Path:
    return binary_path(SHIM_SOURCE, SHIM_BIN_DIR, SHIM_PREFIX)


def is_shim_argv(argv: list[bytes]) -> bool:
    """Whether a process's command line (``/proc/PID/cmdline`` split at NULs) is a shim's:
    a binary of ``SHIM_BIN_DIR`` named by a source hash, whichever version."""
    return is_binary_argv(argv, SHIM_BIN_DIR, SHIM_PREFIX)


def ensure_shim_binary() -> Path:
    """The current shim binary, compiled first if it is missing. Blocking (it runs gcc,
    once per source); raises ``ShimBuildError``."""
    global _built
    if _built is not None:  # this process built or found it: the source is not read again
        return _built
    with _lock:
        _built = compile_once(
            SHIM_SOURCE, SHIM_BIN_DIR, SHIM_PREFIX, what="shim", error=ShimBuildError
        )
        return _built
