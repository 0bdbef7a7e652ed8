"""Directory trees as tar streams, both ways, without holding a whole file: a gzip'd tar built
on the fly from a local directory, and a tar read from a stream of chunks and extracted with
the standard library's ``data`` filter (no absolute names, no escapes, no device nodes, no
setuid bits)."""

from __future__ import annotations

import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

#: Bytes read from a local file at once, and the least a built archive yields at once.
CHUNK = 256 * 1024
_BLOCK = tarfile.BLOCKSIZE
_END_OF_ARCHIVE = bytes(2 * _BLOCK)
#: gzip wrapping for zlib: a ``.gz`` stream rather than a bare deflate one.
_GZIP_WBITS = 31


class ArchiveError(Exception):
    """A local tree that cannot be archived as read (a file shrank while being sent), or a
    downloaded archive that is not the one directory asked for."""


def _members(root: Path) -> Iterator[tuple[Path, str, os.stat_result]]:
    """Every entry below ``root`` (not ``root`` itself), parents before children, in name
    order; symlinks are entries, never followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = here / name
            yield path, path.relative_to(root).as_posix(), path.lstat()


def _header(name: str, st: os.stat_result, path: Path) -> tarfile.TarInfo | None:
    """The tar header of one entry; None for what a tar of plain data does not carry
    (sockets, FIFOs, device nodes)."""
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    else:
        return None
    return info


def _file_blocks(path: Path, size: int) -> Iterator[bytes]:
    """The ``size`` bytes of a regular file, then the padding to a whole tar block."""
    left = size
    with path.open("rb") as f:
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise ArchiveError(f"{path} shrank while it was being archived")
            left -= len(chunk)
            yield chunk
    if size % _BLOCK:
        yield bytes(_BLOCK - size % _BLOCK)


def tar_stream(root: Path, *, compress: bool = True) -> Iterator[bytes]:
    """A tar of the tree below ``root`` (member names relative to it), gzip'd unless
    ``compress`` is false, in pieces of about :data:`CHUNK` bytes. Reads each file as it goes:
    memory stays bounded whatever the tree holds. Raises at once when ``root`` is not a
    directory."""
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    pieces = _tar_blocks(root)
    return _gzip(pieces) if compress else _rechunk(pieces)


def _tar_blocks(root: Path) -> Iterator[bytes]:
    for path, name, st in _members(root):
        info = _header(name, st, path)
        if info is None:
            continue
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if info.type == tarfile.REGTYPE:
            yield from _file_blocks(path, info.size)
    yield _END_OF_ARCHIVE


def _gzip(pieces: Iterator[bytes]) -> Iterator[bytes]:
    deflate = zlib.compressobj(6, zlib.DEFLATED, _GZIP_WBITS)
    yield from _rechunk(deflate.compress(piece) for piece in pieces)
    yield deflate.flush()


def _rechunk(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Join small pieces (headers, compressor output) into about :data:`CHUNK` bytes."""
    pending: list[bytes] = []
    held = 0
    for piece in pieces:
        pending.append(piece)
        held += len(piece)
        if held >= CHUNK:
            yield b"".join(pending)
            pending, held = [], 0
    if held:
        yield b"".join(pending)


class ChunkReader:
    """A read-only file object over chunks that ``next_chunk`` hands out (``b""`` at the end):
    what ``tarfile``'s stream mode reads from."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next_chunk = next_chunk
        self._buffer = bytearray()
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        while not self._ended and (size < 0 or len(self._buffer) < size):
            chunk = self._next_chunk()
            if not chunk:
                self._ended = True
            self._buffer += chunk
        cut = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        return out


def extract_stream(reader: ChunkReader, destination: Path, *, top: str | None = None) -> int:
    """Extract a tar (gzip'd or not) read from ``reader`` into ``destination`` (made, with
    its parents, when missing) with the ``data`` filter; returns how many members it wrote.
    A member the filter refuses raises ``tarfile.FilterError`` naming it.

    ``top``: the archive holds one directory of that name (as ``tar -c top`` makes it) whose
    contents go into ``destination``; anything else in it raises :class:`ArchiveError`."""
    destination.mkdir(parents=True, exist_ok=True)
    written = 0

    def under_destination(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        nonlocal written
        if top is not None:
            stripped = _strip_top(member, top)
            if stripped is None:
                return None
            member = stripped
        safe = tarfile.data_filter(member, path)
        written += 1
        return safe

    with tarfile.open(fileobj=reader, mode="r|*") as archive:  # type: ignore[call-overload]
        archive.extractall(destination, filter=under_destination)
    return written


def _strip_top(member: tarfile.TarInfo, top: str) -> tarfile.TarInfo | None:
    """``member`` renamed from ``top/x`` to ``x``; None for ``top`` itself (the destination
    stands for it)."""
    name = member.name.rstrip("/")
    if name == top:
        if not member.isdir():
            raise ArchiveError(f"{top} is not a directory")
        return None
    prefix = top + "/"
    if not name.startswith(prefix):
        raise ArchiveError(f"archive member {member.name!r} is not under {top!r}")
    linkname = member.linkname
    if member.islnk():
        if not linkname.startswith(prefix):
            raise ArchiveError(f"hard link {member.name!r} points outside {top!r}")
        linkname = linkname[len(prefix) :]
    return member.replace(name=name[len(prefix) :], linkname=linkname, deep=False)
