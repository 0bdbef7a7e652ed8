"""An in-memory sandbox filesystem behind the :class:`AgentFiles` methods the archives use,
with the agent's semantics (lstat, atomic writes, ``mkdir -p``, merge, symlinks followed in
the middle of a path): the fake the archive tests share.

It also lets a test make a file shrink or grow under a read, refuse a read, or fail a write
(out of room), and keeps what the tests check: every chunk a write took, and a snapshot of the
whole tree to compare before and after."""

from __future__ import annotations

import contextlib
import io
import posixpath
import tarfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from sandstorm.agent.fs_wire import FsEntry
from sandstorm.errors import (
    FileExists,
    FileNotFound,
    InsufficientStorage,
    PermissionDenied,
    WrongFileType,
)

READ_CHUNK = 64 * 1024
#: Where the tests extract: a directory with a file in it, beside another file.
TARGET = "/workspace/dst"


@dataclass(eq=False)
class Node:
    type: Literal["file", "dir", "symlink", "other"]
    mode: int = 0o644
    mtime: float = 1_700_000_000.0
    data: bytes = b""
    target: str | None = None
    children: dict[str, Node] = field(default_factory=dict)


class FakeDownload:
    def __init__(self, files: FakeFiles, entry: FsEntry, data: bytes, length: int) -> None:
        self.entry = entry
        self.offset = 0
        self.length = length
        self._files = files
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), READ_CHUNK):
            await trio.lowlevel.checkpoint()
            chunk = self._data[start : start + READ_CHUNK]
            self._files.served += len(chunk)
            yield chunk


class FakeWalk:
    def __init__(self, entry: FsEntry, entries: list[FsEntry], truncated: bool) -> None:
        self.entry = entry
        self.truncated = False
        self._entries = entries
        self._truncated = truncated

    async def __aiter__(self) -> AsyncIterator[FsEntry]:
        for entry in self._entries:
            await trio.lowlevel.checkpoint()
            yield entry
        self.truncated = self._truncated


class FakeFiles:
    """The sandbox's tree from ``/``; paths absolute and normalised, as the gateway sends."""

    def __init__(self) -> None:
        self.root = Node("dir", mode=0o755)
        self.written: list[int] = []  # size of every chunk a write took
        self.served = 0  # bytes every read has given
        self.on_chunk: list[Callable[[int], None]] = []  # told each chunk a write takes
        self.resize: dict[str, bytes] = {}  # path -> what a read yields instead
        self.unreadable: set[str] = set()
        self.room: int | None = None  # bytes a write may take in all before ENOSPC
        self.max_entries = 1 << 30

    # ------------------------------------------------------------------ the tree

    def _parent(self, path: str) -> tuple[Node, str]:
        """The directory holding ``path``'s last component (symlinks followed), and the name."""
        parent, name = posixpath.split(path)
        node = self._resolve(parent, follow=True)
        if node.type != "dir":
            raise WrongFileType(f"not a directory: {parent}", path=path)
        return node, name

    def _resolve(self, path: str, *, follow: bool, hops: int = 0) -> Node:
        node = self.root
        where: list[str] = []
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            if part == "..":
                where = where[:-1]
                node = self._resolve("/" + "/".join(where), follow=True, hops=hops)
                continue
            if node.type != "dir":
                raise WrongFileType(f"not a directory: {path}", path=path)
            child = node.children.get(part)
            if child is None:
                raise FileNotFound(f"no such file: {path}", path=path)
            last = i == len(parts) - 1
            if child.type == "symlink" and (follow or not last):
                if hops > 40:
                    raise WrongFileType(f"symlink loop: {path}", path=path)
                assert child.target is not None
                base = "/" + "/".join(where)
                linked = posixpath.join(base, child.target)
                child = self._resolve(linked, follow=True, hops=hops + 1)
                where = [p for p in posixpath.normpath(linked).split("/") if p]
            else:
                where.append(part)
            node = child
        return node

    def node(self, path: str) -> Node:
        return self._resolve(path, follow=False)

    def exists(self, path: str) -> bool:
        try:
            self.node(path)
        except FileNotFound:
            return False
        return True

    def snapshot(self) -> dict[str, Any]:
        """Every entry under ``/`` with what it holds; hard links share an id."""
        ids: dict[int, int] = {}
        found: dict[str, Any] = {}

        def visit(node: Node, path: str) -> None:
            key = ids.setdefault(id(node), len(ids))
            found[path or "/"] = (node.type, node.mode, node.data, node.target, key)
            for name, child in node.children.items():
                visit(child, f"{path}/{name}")

        visit(self.root, "")
        return found

    def add(self, path: str, node: Node) -> Node:
        """Put ``node`` at ``path`` (parents made) for a test's set-up."""
        parent = self.root
        for part in [p for p in path.split("/") if p][:-1]:
            parent = parent.children.setdefault(part, Node("dir", mode=0o755))
        parent.children[posixpath.basename(path)] = node
        return node

    def entry(self, path: str, node: Node) -> FsEntry:
        size = len(node.data) if node.type == "file" else 0
        return FsEntry(
            name=posixpath.basename(path) or "/",
            path=path,
            type=node.type,
            size=size,
            mode=node.mode,
            mtime=node.mtime,
            target=node.target,
        )

    # ------------------------------------------------------------------ AgentFiles

    async def stat(self, path: str) -> FsEntry:
        await trio.lowlevel.checkpoint()
        return self.entry(path, self.node(path))

    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> FsEntry:
        await trio.lowlevel.checkpoint()
        if parents and path != "/":
            parent = posixpath.dirname(path)
            if not self.exists(parent):
                await self.mkdir(parent, parents=True)
        directory, name = self._parent(path)
        existing = directory.children.get(name)
        if existing is not None:
            if parents and self._resolve(path, follow=True).type == "dir":
                return self.entry(path, existing)
            raise FileExists(f"exists: {path}", path=path)
        directory.children[name] = Node("dir", mode=mode)
        return self.entry(path, directory.children[name])

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        directory, name = self._parent(path)
        node = directory.children.get(name)
        if node is None:
            raise FileNotFound(f"no such file: {path}", path=path)
        if node.type == "dir" and node.children and not recursive:
            raise WrongFileType(f"not empty: {path}", path=path)
        del directory.children[name]

    async def symlink(self, path: str, target: str) -> FsEntry:
        await trio.lowlevel.checkpoint()
        directory, name = self._parent(path)
        if name in directory.children:
            raise FileExists(f"exists: {path}", path=path)
        directory.children[name] = Node("symlink", mode=0o777, target=target)
        return self.entry(path, directory.children[name])

    async def link(self, path: str, existing: str) -> FsEntry:
        await trio.lowlevel.checkpoint()
        node = self.node(existing)
        if node.type == "dir":
            raise PermissionDenied(f"hard link to a directory: {existing}", path=path)
        directory, name = self._parent(path)
        if name in directory.children:
            raise FileExists(f"exists: {path}", path=path)
        directory.children[name] = node
        return self.entry(path, node)

    async def merge(self, source: str, target: str) -> None:
        await trio.lowlevel.checkpoint()
        self._merge_into(self._resolve(target, follow=True), self.node(source))
        await self.remove(source, recursive=True)

    def _merge_into(self, into: Node, source: Node) -> None:
        for name, node in list(source.children.items()):
            there = into.children.get(name)
            if there is not None and there.type == "dir" and node.type == "dir":
                self._merge_into(there, node)
            elif there is not None and (there.type == "dir") != (node.type == "dir"):
                raise WrongFileType(f"cannot merge {name} over a {there.type}", path=name)
            else:
                into.children[name] = node
            del source.children[name]

    @contextlib.asynccontextmanager
    async def read(self, path: str) -> AsyncIterator[FakeDownload]:
        await trio.lowlevel.checkpoint()
        if path in self.unreadable:
            raise PermissionDenied(f"denied: {path}", path=path)
        node = self._resolve(path, follow=True)
        if node.type != "file":
            raise WrongFileType(f"not a regular file: {path}", path=path)
        data = self.resize.get(path, node.data)
        yield FakeDownload(self, self.entry(path, node), data, len(node.data))

    @contextlib.asynccontextmanager
    async def walk(self, path: str, *, depth: int, max_entries: int) -> AsyncIterator[FakeWalk]:
        await trio.lowlevel.checkpoint()
        top = self._resolve(path, follow=True)
        if top.type != "dir":
            raise WrongFileType(f"not a directory: {path}", path=path)
        entries: list[FsEntry] = []
        limit = min(max_entries, self.max_entries)

        def visit(node: Node, at: str, level: int) -> None:
            for name, child in node.children.items():
                if len(entries) == limit:
                    return
                child_path = f"{at.rstrip('/')}/{name}"
                entries.append(self.entry(child_path, child))
                if child.type == "dir" and level < depth:
                    visit(child, child_path, level + 1)

        visit(top, path, 1)
        truncated = len(entries) == limit and limit < self._count(top)
        yield FakeWalk(self.entry(path, top), entries, truncated)

    def _count(self, node: Node) -> int:
        return sum(1 + self._count(child) for child in node.children.values())

    async def write(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        mtime: float | None = None,
        parents: bool = True,
    ) -> FsEntry:
        await trio.lowlevel.checkpoint()
        if parents:
            await self.mkdir(posixpath.dirname(path), parents=True)
        self._parent(path)
        pieces = []
        async for chunk in chunks:
            self.written.append(len(chunk))
            for observer in self.on_chunk:
                observer(len(chunk))
            if self.room is not None:
                self.room -= len(chunk)
                if self.room < 0:
                    raise InsufficientStorage(f"no room for {path}", path=path)
            pieces.append(chunk)
        directory, name = self._parent(path)
        existing = directory.children.get(name)
        if existing is not None and existing.type == "dir":
            raise WrongFileType(f"is a directory: {path}", path=path)
        node = Node("file", mode=mode, data=b"".join(pieces))
        if mtime is not None:
            node.mtime = mtime
        directory.children[name] = node
        return self.entry(path, node)


def with_target() -> FakeFiles:
    """A sandbox whose :data:`TARGET` holds ``existing.txt``, with a file beside it."""
    fake = FakeFiles()
    fake.add(f"{TARGET}/existing.txt", Node("file", data=b"kept"))
    fake.add("/workspace/x", Node("file", data=b"beside the target"))
    return fake


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]], *, gzip: bool = False) -> bytes:
    """An archive tarfile writes of ``members`` (each with its data, for files)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o644)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


class body_of:
    """``data`` as a request body arrives: in chunks of ``chunk`` bytes, with checkpoints
    between them; ``taken`` counts the bytes read so far."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024) -> None:
        self._data = data
        self._chunk = chunk
        self.taken = 0

    def __aiter__(self) -> body_of:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.taken >= len(self._data):
            raise StopAsyncIteration
        piece = self._data[self.taken : self.taken + self._chunk]
        self.taken += len(piece)
        return piece
