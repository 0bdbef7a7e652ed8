"""Paths as a caller names them: absolute, normalised inside the sandbox, bounded.

Only the text is checked here; what a path names (symlinks included) is resolved by the agent,
inside the sandbox, never on the host.
"""

from __future__ import annotations

import posixpath
from typing import Final

from sandstorm.errors import InvalidRequest

__all__ = ["MAX_PATH_BYTES", "sandbox_path"]

#: Longest path accepted, in bytes of UTF-8 (the kernel's PATH_MAX).
MAX_PATH_BYTES: Final = 4096


def sandbox_path(raw: str | None, field: str = "path") -> str:
    """``raw`` as an absolute, normalised path (``.``, ``..`` and repeated ``/`` folded; ``..``
    stops at ``/``). Raises :class:`InvalidRequest` naming ``field`` for a missing, empty,
    relative, over-long or NUL-bearing path."""
    if raw is None or raw == "":
        raise InvalidRequest(f"{field} is required", field=field)
    if "\0" in raw:
        raise InvalidRequest(f"{field} must not contain NUL", field=field)
    try:
        size = len(raw.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field} is not valid UTF-8", field=field) from None
    if size > MAX_PATH_BYTES:
        raise InvalidRequest(f"{field} is longer than {MAX_PATH_BYTES} bytes", field=field)
    if not raw.startswith("/"):
        raise InvalidRequest(f"{field} must be absolute (start with /): {raw!r}", field=field)
    path = posixpath.normpath(raw)
    # POSIX keeps a leading "//" as implementation-defined; inside the sandbox it is "/".
    return "/" + path.lstrip("/")
