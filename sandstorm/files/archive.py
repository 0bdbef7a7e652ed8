"""Tar archives of a sandbox's files, both ways (SPEC §8), through the agent only.

Out: :func:`open_archive` stats the path (and opens its walk or its read) before a byte is
made, so a missing path fails before the answer starts; then yields the archive in chunks of
at most 128 KiB, read file by file as it goes.

In: :func:`extract_archive` reads the body as it arrives, member by member, into a staging
directory inside the target, and moves the result into the target only once the whole archive
has been read and checked (:mod:`._safety`); any refusal, failure or cancellation removes the
staging directory, so nothing is extracted. Neither way holds a whole member in memory.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from contextlib import aclosing
from typing import Final, TypeVar

import trio

from sandstorm.agent.files import AgentFiles, Download, FileError, Walk
from sandstorm.agent.fs_wire import FsEntry
from sandstorm.errors import (
    FileNotFound,
    GatewayError,
    PermissionDenied,
    UnsafeArchive,
    WrongFileType,
)

from . import _tar
from ._safety import Tree, member_name, safe_mode
from ._stream import IN_PIECE, Packer, TarBytes

__all__ = ["extract_archive", "open_archive"]

#: How deep, and how many entries, an archive of a directory takes in.
WALK_DEPTH: Final = 64
WALK_MAX_ENTRIES: Final = 1 << 24
#: Staging directories are hidden in the target under this prefix.
STAGING_PREFIX: Final = ".sandstorm-extract-"
#: How long removing a failed extraction's staging directory may take.
_CLEANUP_S: Final = 60.0

_T = TypeVar("_T")


# ---------------------------------------------------------------------- out


@contextlib.asynccontextmanager
async def open_archive(
    files: AgentFiles, path: str, *, gzip: bool
) -> AsyncIterator[AsyncIterator[bytes]]:
    """The archive of ``path`` (an absolute, normalised sandbox path), as ``tar -C
    dirname(path) -c basename(path)`` makes it (``/`` as ``.``): entering raises the gateway
    error for a path that cannot be archived (missing, not a file, directory or symlink,
    unreadable) before any byte; iterating yields the chunks.

    A directory's files are read as the walk reaches them, each member's size fixed when its
    read opens (a file that shrinks after is padded with NULs). Files that vanish or cannot be
    read during the walk are left out, as ``tar`` does; a walk cut at its entry limit fails
    the stream at its end rather than pass for a whole archive."""
    entry = await files.stat(path)
    top = posixpath.basename(path) or "."
    async with contextlib.AsyncExitStack() as stack:
        if entry.type == "dir":
            walk = await stack.enter_async_context(
                files.walk(path, depth=WALK_DEPTH, max_entries=WALK_MAX_ENTRIES)
            )
            members = _directory(files, walk, path, top)
        elif entry.type == "file":
            download = await stack.enter_async_context(files.read(path))
            members = _one_file(download, top)
        elif entry.type == "symlink":
            members = _one_entry(entry, top)
        else:
            raise WrongFileType(f"{path} is neither a file nor a directory", path=path)
        chunks = _packed(members, gzip=gzip)
        try:
            yield chunks
        finally:
            await chunks.aclose()
            await members.aclose()


async def _packed(
    members: AsyncGenerator[bytes, None], *, gzip: bool
) -> AsyncGenerator[bytes, None]:
    packer = Packer(gzip=gzip)
    async for data in members:
        for chunk in await packer.add(data):
            yield chunk
    for chunk in await packer.add(_tar.end_of_archive(packer.written)):
        yield chunk
    for chunk in packer.finish():
        yield chunk


async def _one_entry(entry: FsEntry, name: str) -> AsyncGenerator[bytes, None]:
    yield _entry_header(entry, name)


def _entry_header(entry: FsEntry, name: str) -> bytes:
    """A directory's or a symlink's header; nothing for what tar does not carry."""
    if entry.type == "dir":
        return _tar.header(name, _tar.DIR, mode=entry.mode, mtime=entry.mtime)
    if entry.type == "symlink" and entry.target:
        return _tar.header(
            name, _tar.SYMLINK, mode=entry.mode, mtime=entry.mtime, linkname=entry.target
        )
    return b""


async def _one_file(download: Download, name: str) -> AsyncGenerator[bytes, None]:
    """The member of an open read: exactly ``download.length`` bytes of data, what the read
    gives cut there or padded with NULs."""
    entry = download.entry
    yield _tar.header(name, _tar.FILE, mode=entry.mode, mtime=entry.mtime, size=download.length)
    left = download.length
    async with _iterating(download) as pieces:
        async for data in pieces:
            if left > 0:
                yield data[:left]
                left -= min(left, len(data))
    while left > 0:
        zeros = min(left, IN_PIECE)
        yield bytes(zeros)
        left -= zeros
    yield bytes(_tar.padding(download.length))


async def _directory(
    files: AgentFiles, walk: Walk, root: str, top: str
) -> AsyncGenerator[bytes, None]:
    yield _entry_header(walk.entry, top)
    under = root.rstrip("/") + "/"
    async with _iterating(walk) as entries:
        async for entry in entries:
            if not entry.path.startswith(under) or entry.path == under:
                continue  # not under the walked directory: nothing to name it by
            name = top + "/" + entry.path[len(under) :]
            if entry.type != "file":
                yield _entry_header(entry, name)
                continue
            opened = False
            try:
                async with (
                    files.read(entry.path) as download,
                    aclosing(_one_file(download, name)) as member,
                ):
                    opened = True
                    async for data in member:
                        yield data
            except (FileNotFound, PermissionDenied, WrongFileType):
                if opened:
                    raise
                # Gone or unreadable since the walk saw it: left out, as tar does.
    if walk.truncated:
        raise FileError(
            f"{root} has more than {WALK_MAX_ENTRIES} entries: the archive is incomplete",
            path=root,
        )


@contextlib.asynccontextmanager
async def _iterating(iterable: AsyncIterable[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """An iterator of ``iterable``, closed on leaving (an async generator left early would
    otherwise be finalised whenever it is collected)."""
    iterator = aiter(iterable)
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


# ---------------------------------------------------------------------- in


async def extract_archive(
    files: AgentFiles,
    body: AsyncIterable[bytes],
    target: str,
    *,
    max_bytes: int | None = None,
    max_unpacked_bytes: int | None = None,
) -> tuple[int, int]:
    """Extract the tar (or gzip of a tar) ``body`` into the directory ``target`` (an absolute,
    normalised sandbox path, made with its parents when missing). Returns how many files
    (regular files, hard links and symlinks) it made and the bytes of their data.

    All or nothing: a refused member (:class:`UnsafeArchive`, naming it), a corrupt or
    truncated archive (:class:`InvalidRequest` for ``body``), a failure in the sandbox or a
    cancellation leaves the target as it was. Files replace files of the same name; directories
    merge. Modes lose setuid, setgid and sticky bits; files keep their mtimes. More than
    ``max_bytes`` of body, or ``max_unpacked_bytes`` of tar once gunzipped, is
    :class:`PayloadTooLarge`."""
    made = await _make_directory(files, target)
    staging = posixpath.join(target, STAGING_PREFIX + secrets.token_hex(8))
    try:
        await files.mkdir(staging, mode=0o700)
        stream = TarBytes(body, max_body=max_bytes, max_unpacked=max_unpacked_bytes)
        counts = await _Extraction(files, staging).run(stream)
        await files.merge(staging, target)
    except BaseException:
        await _discard(files, staging, made)
        raise
    return counts


async def _make_directory(files: AgentFiles, target: str) -> list[str]:
    """Make ``target`` a directory, with its parents, where it is missing; the directories
    this made, deepest first."""
    missing: list[str] = []
    path = target
    while True:
        try:
            entry = await files.stat(path)
        except FileNotFound:
            missing.append(path)
            path = posixpath.dirname(path)
            continue
        break
    if missing:
        await files.mkdir(target, parents=True)
    elif entry.type in ("file", "other"):
        raise WrongFileType(f"{target} is not a directory", path=target)
    return missing


async def _discard(files: AgentFiles, staging: str, made: list[str]) -> None:
    """Remove the staging directory, and the directories the extraction made for the target
    while they are empty; shielded and bounded, errors ignored: safe while failing or
    cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_S):
        with contextlib.suppress(GatewayError):
            await files.remove(staging, recursive=True)
        for directory in made:
            try:
                await files.remove(directory)
            except GatewayError:
                break


class _MemberData:
    """A file member's data as it arrives, for :meth:`AgentFiles.write`."""

    def __init__(self, stream: TarBytes, size: int) -> None:
        self._stream = stream
        self.left = size

    def __aiter__(self) -> _MemberData:
        return self

    async def __anext__(self) -> bytes:
        if self.left == 0:
            raise StopAsyncIteration
        data = await self._stream.some(min(self.left, IN_PIECE))
        self.left -= len(data)
        return data


class _Extraction:
    """One archive read into a staging directory: directories, files and hard links as they
    come, symlinks (and hard links to them) once the whole archive is known to be safe."""

    def __init__(self, files: AgentFiles, staging: str) -> None:
        self._files = files
        self._staging = staging
        self._tree = Tree()
        self._links_to_symlinks: list[tuple[str, str]] = []
        self._present: set[str] = {""}  # directories made in the staging directory
        self.files_made = 0
        self.data_bytes = 0

    def _path(self, name: str) -> str:
        return f"{self._staging}/{name}" if name else self._staging

    def _made(self, directory: str) -> None:
        while directory not in self._present:
            self._present.add(directory)
            directory = posixpath.dirname(directory)

    async def _parent_of(self, name: str) -> None:
        """Make the directory ``name`` goes in, for the requests that do not make it."""
        parent = posixpath.dirname(name)
        if parent not in self._present:
            await self._files.mkdir(self._path(parent), parents=True)
            self._made(parent)

    async def run(self, stream: TarBytes) -> tuple[int, int]:
        while (member := await _tar.next_member(stream)) is not None:
            await self._extract(member, stream)
        await stream.drain()
        escaping = self._tree.escaping_symlink()
        if escaping is not None:
            raise UnsafeArchive(
                f"symlink {escaping!r} leads outside the target through the archive's symlinks",
                member=escaping,
            )
        for name, target in self._tree.symlinks.items():
            await self._parent_of(name)
            await self._files.symlink(self._path(name), target)
            self.files_made += 1
        for name, existing in self._links_to_symlinks:
            await self._link(name, existing)
        return self.files_made, self.data_bytes

    async def _link(self, name: str, existing: str) -> None:
        await self._parent_of(name)
        await self._files.link(self._path(name), self._path(existing))
        self.files_made += 1

    async def _extract(self, member: _tar.Member, stream: TarBytes) -> None:
        raw = member.name
        name = member_name(raw)
        tree = self._tree
        if member.kind == _tar.DIR:
            tree.add_dir(name, raw)
            if name:
                mode = safe_mode(member.mode, directory=True)
                await self._files.mkdir(self._path(name), parents=True, mode=mode)
                self._made(name)
        elif member.kind == _tar.FILE:
            if not name:
                raise UnsafeArchive(f"file {raw!r} would replace the target", member=raw)
            tree.add_file(name, raw)
            data = _MemberData(stream, member.size)
            mode = safe_mode(member.mode, directory=False)
            mtime = max(0.0, member.mtime)
            await self._files.write(self._path(name), data, mode=mode, mtime=mtime, parents=True)
            self._made(posixpath.dirname(name))
            await stream.skip(data.left)  # what a write that ended early left unread
            await stream.skip(_tar.padding(member.size))
            self.files_made += 1
            self.data_bytes += member.size
        elif member.kind == _tar.SYMLINK:
            tree.add_symlink(name, raw, member.linkname)
        elif member.kind == _tar.HARDLINK:
            existing = _link_name(member)
            if not name:
                raise UnsafeArchive(f"hard link {raw!r} would replace the target", member=raw)
            tree.add_hardlink(name, raw, existing)
            if existing in tree.symlinks:
                self._links_to_symlinks.append((name, existing))
            else:
                await self._link(name, existing)
        else:
            what = _tar.describe(member.kind)
            raise UnsafeArchive(f"member {raw!r} is {what}", member=raw)


def _link_name(member: _tar.Member) -> str:
    """A hard link's ``linkname`` as a member name; an unsafe one is refused naming the link."""
    try:
        return member_name(member.linkname)
    except UnsafeArchive as exc:
        raise UnsafeArchive(
            f"hard link {member.name!r} links to {member.linkname!r}: {exc.message}",
            member=member.name,
        ) from None
