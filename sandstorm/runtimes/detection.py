"""What detection shares across runtimes: finding a binary on its configured search paths,
saying where it was looked for, and reading its version."""

from __future__ import annotations

import os
import shutil

import trio

from sandstorm.runtimes.base import HOST_ENV


def first_executable(paths: list[str]) -> str | None:
    """The first of ``paths`` that is an executable file (a bare name is looked up on
    ``HOST_ENV``'s PATH), made absolute; None if there is none."""
    for path in paths:
        resolved = path if os.sep in path else shutil.which(path, path=HOST_ENV["PATH"])
        if resolved and os.path.isfile(resolved) and os.access(resolved, os.X_OK):
            return os.path.abspath(resolved)
    return None


def not_found(paths: list[str]) -> str:
    return "not found at " + ", ".join(paths)


async def read_version(argv: list[str]) -> str | None:
    """First non-empty line a ``--version`` style command prints, or None if it fails."""
    try:
        with trio.move_on_after(5):
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False, env=HOST_ENV
            )
            for line in (result.stdout + result.stderr).decode(errors="replace").splitlines():
                if line.strip():
                    return line.strip()
    except OSError:
        return None
    return None
