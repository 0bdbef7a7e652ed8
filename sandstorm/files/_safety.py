"""What an archive may do to the directory it is extracted into.

Every member lands inside the target: names are relative, without ``..``; nothing is made but
files, directories and links; links stay inside. Symlinks are checked twice: lexically as they
arrive, and once the whole archive is known, resolved through the archive's own symlinks (a
link may climb out through another, ``s -> .`` then ``p -> s/..``). The caller creates
symlinks only after everything else, so no member is ever written through one.
"""

from __future__ import annotations

import posixpath
from collections import deque
from typing import Final

from sandstorm.errors import InvalidRequest, UnsafeArchive

__all__ = ["Tree", "member_name", "safe_mode"]

#: Symlinks followed while resolving one, as the kernel allows (``MAXSYMLINKS``).
_MAX_HOPS: Final = 40


def member_name(raw: str) -> str:
    """``raw`` (a member's name, or a hard link's) relative to the target, ``.`` components
    and repeated or trailing slashes dropped; ``""`` is the target itself. Raises
    :class:`UnsafeArchive` for an absolute name or a ``..`` component, and
    :class:`InvalidRequest` for a name no path can hold."""
    if raw.startswith("/"):
        raise UnsafeArchive(f"member {raw!r} has an absolute name", member=raw)
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"member {raw!r} has a '..' component", member=raw)
    if "\0" in raw:
        raise InvalidRequest(f"member {raw!r} has a NUL in its name", field="body", member=raw)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        shown = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise InvalidRequest(
            f"member {shown!r} has a name that is not UTF-8", field="body", member=shown
        ) from None
    return "/".join(parts)


def safe_mode(mode: int, *, directory: bool) -> int:
    """``mode`` without setuid, setgid and sticky bits; a directory stays open to its owner so
    the rest of the archive can go into it."""
    return (mode & 0o777) | (0o700 if directory else 0)


def _ancestors(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class Tree:
    """The names an archive has made so far, to check each next member against."""

    def __init__(self) -> None:
        self.dirs: set[str] = {""}  # explicit directories and every member's parents
        self.files: set[str] = set()  # regular files and hard links: what a hard link may name
        self.symlinks: dict[str, str] = {}  # name -> target, made last

    def _enter(self, name: str, raw: str) -> None:
        for parent in _ancestors(name):
            if parent in self.symlinks:
                raise UnsafeArchive(
                    f"member {raw!r} goes through the archive's symlink {parent!r}", member=raw
                )
        self.dirs.update(_ancestors(name))
        self.symlinks.pop(name, None)  # a later member replaces an earlier one of its name

    def add_dir(self, name: str, raw: str) -> None:
        self._enter(name, raw)
        self.dirs.add(name)

    def add_file(self, name: str, raw: str) -> None:
        self._enter(name, raw)
        self.files.add(name)

    def add_hardlink(self, name: str, raw: str, existing: str) -> None:
        """A hard link ``name`` to the member ``existing`` (a name :func:`member_name` gave),
        which must be a file or symlink the archive made before it."""
        if existing not in self.files and existing not in self.symlinks:
            raise UnsafeArchive(
                f"member {raw!r} links to {existing!r}, which is no file before it in the archive",
                member=raw,
            )
        self.add_file(name, raw)

    def add_symlink(self, name: str, raw: str, target: str) -> None:
        if name == "":
            raise UnsafeArchive(
                f"member {raw!r} would replace the target with a symlink", member=raw
            )
        if target == "" or "\0" in target:
            raise InvalidRequest(f"symlink {raw!r} has no valid target", field="body", member=raw)
        if target.startswith("/"):
            raise UnsafeArchive(f"symlink {raw!r} points to an absolute path", member=raw)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(
                f"symlink {raw!r} points outside the target: {target!r}", member=raw
            )
        if name in self.dirs:
            raise UnsafeArchive(f"symlink {raw!r} would replace a directory", member=raw)
        self._enter(name, raw)
        self.symlinks[name] = target

    def escaping_symlink(self) -> str | None:
        """A symlink that, resolved through the archive's symlinks, leaves the target (or
        climbs out of something that is not one of the archive's directories, whose parent
        cannot be known here); None when every one stays inside."""
        for name, target in self.symlinks.items():
            if not self._stays_inside(name, target):
                return name
        return None

    def _stays_inside(self, name: str, target: str) -> bool:
        where = name.split("/")[:-1]
        todo = deque(target.split("/"))
        hops = 0
        while todo:
            part = todo.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not where or "/".join(where) not in self.dirs:
                    return False
                where.pop()
                continue
            where.append(part)
            link = self.symlinks.get("/".join(where))
            if link is not None:
                hops += 1
                if hops > _MAX_HOPS or link.startswith("/"):
                    return False
                where.pop()
                todo.extendleft(reversed(link.split("/")))
        return True
