"""Wire types of the file routes (SPEC §8): entries, listings, moves, extracted archives."""

from __future__ import annotations

from typing import Literal

import msgspec

from sandstorm.api.types import AbsPath, _Out, _Wire

FileType = Literal["file", "dir", "symlink", "other"]
#: Deepest listing a request may ask for, and most entries one answers with.
MAX_LIST_DEPTH = 16
MAX_LIST_ENTRIES = 10_000


class FileEntry(_Out, frozen=True, omit_defaults=True):
    """One file, as ``lstat`` sees it inside the sandbox: a symlink is itself, with its
    ``target``; ``mode`` holds the permission bits in octal (``"0644"``)."""

    name: str
    path: str
    type: FileType
    size: int
    mode: str
    mtime: str
    target: str | None = None


class FileList(_Out, frozen=True):
    path: str
    entries: list[FileEntry]
    #: The listing stopped at its entry limit.
    truncated: bool


class MoveRequest(_Wire, frozen=True):
    from_: AbsPath = msgspec.field(name="from")
    to: AbsPath
    overwrite: bool = False


class ArchiveExtracted(_Out, frozen=True):
    path: str
    files: int
    bytes: int
