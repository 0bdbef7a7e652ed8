"""The gateway's C programs (the shim, the agent), compiled with the host's gcc once per source.

A binary is named by the hash of its sources (every C file and header) and flags
(``<bin_dir>/<prefix><hash>``), so a change to any of them gets a new binary, and a process still
running an older one (a gateway upgraded under its sandboxes) keeps its own file. It is written
to a temporary name and renamed into place: two gateways building at once both end with one
whole binary. Old binaries are never deleted: a running process, or a snapshot's restored one,
may still be executing one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

GCC_TIMEOUT_S: Final = 120.0
GCC_FLAGS: Final = ("-O2", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2", "-s")


class NativeBuildError(RuntimeError):
    """A C program cannot be compiled here; the message says what to install or fix."""


Sources = Path | Sequence[Path]


def _paths(sources: Sources) -> tuple[Path, ...]:
    return (sources,) if isinstance(sources, Path) else tuple(sources)


def binary_path(
    sources: Sources, bin_dir: Path, prefix: str, extra_flags: tuple[str, ...] = ()
) -> Path:
    """Where ``sources`` (C files and the headers they include, in a fixed order) compiled with
    ``extra_flags`` go: named by the hash of all of them, so a change of any is a new binary."""
    flags = "\0".join((*GCC_FLAGS, *extra_flags)).encode()
    text = b"\0".join(path.read_bytes() for path in _paths(sources))
    digest = hashlib.sha256(text + b"\0" + flags).hexdigest()[:16]
    return bin_dir / f"{prefix}{digest}"


def is_binary_argv(argv: list[bytes], bin_dir: Path, prefix: str) -> bool:
    """Whether a command line (``/proc/PID/cmdline`` split at NULs) runs a binary of
    ``bin_dir`` named by a source hash, whichever version."""
    if not argv:
        return False
    directory, _, name = argv[0].rpartition(b"/")
    return directory == os.fsencode(bin_dir) and name.startswith(prefix.encode())


def compile_once(
    sources: Sources,
    bin_dir: Path,
    prefix: str,
    *,
    what: str,
    error: type[NativeBuildError] = NativeBuildError,
    extra_flags: tuple[str, ...] = (),
) -> Path:
    """The binary of ``sources`` (its C files are compiled, its headers only hashed), compiled
    first if it is missing. Blocking (gcc takes about a second); raises ``error`` naming ``what``
    was being built."""
    paths = _paths(sources)
    if not paths:
        raise error(f"no source for the {what}")
    where = paths[0] if len(paths) == 1 else paths[0].parent
    try:
        target = binary_path(paths, bin_dir, prefix, extra_flags)
    except OSError as exc:
        raise error(f"cannot read the {what}'s source {where}: {exc}") from exc
    if target.is_file():
        return target
    try:
        bin_dir.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create {bin_dir} for the {what}: {exc}") from exc
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    c_files = [str(path) for path in paths if path.suffix == ".c"]
    argv = ["gcc", *GCC_FLAGS, *extra_flags, "-o", str(tmp), *c_files]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=GCC_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        tmp.unlink(missing_ok=True)
        raise error(
            f"cannot run gcc to build the {what} (apt-get install gcc libc6-dev): {exc}"
        ) from exc
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        err = done.stderr.decode(errors="replace")[-2000:]
        raise error(f"gcc failed to build {where}:\n{err}")
    os.replace(tmp, target)
    return target
