"""The file routes of SPEC §8 as plain descriptions (method, route, query, body, answer type),
shared by the sync and the async files handles, and what both do with the bytes they send."""

from __future__ import annotations

import io
import os
import posixpath
import stat
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Generic, TypeVar, cast

import trio

from sandstorm.api.files import ArchiveExtracted, FileEntry, FileList

T = TypeVar("T")
#: Bytes read from a local file object at once.
CHUNK = 256 * 1024
#: What ``write`` takes: the content, its text (sent as UTF-8), a binary file object (read in
#: chunks from where it stands), or chunks of bytes.
WriteData = bytes | bytearray | memoryview | str | IO[bytes] | Iterable[bytes]
AsyncWriteData = WriteData | AsyncIterable[bytes]


@dataclass(frozen=True)
class FileCall(Generic[T]):
    """One request on ``/v1/sandboxes/{id}/files…``; ``answer`` None: no body (204)."""

    method: str
    route: str
    params: dict[str, str]
    answer: type[T] | None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def url(self, sandbox_id: str) -> str:
        return f"/v1/sandboxes/{sandbox_id}/files{self.route}"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def mode_text(mode: int | str | None) -> dict[str, str]:
    """``mode`` as the query's octal text: ``0o644`` or ``"644"`` → ``{"mode": "0644"}``."""
    if mode is None:
        return {}
    number = int(mode, 8) if isinstance(mode, str) else mode
    if not 0 <= number <= 0o7777:
        raise ValueError(f"not a file mode: {mode!r}")
    return {"mode": f"{number:04o}"}


def content(path: str) -> FileCall[None]:
    return FileCall("GET", "/content", {"path": path}, None)


def write(path: str, mode: int | str | None) -> FileCall[FileEntry]:
    return FileCall("PUT", "/content", {"path": path, **mode_text(mode)}, FileEntry)


def listing(path: str, depth: int) -> FileCall[FileList]:
    return FileCall("GET", "/list", {"path": path, "depth": str(depth)}, FileList)


def stat_(path: str) -> FileCall[FileEntry]:
    return FileCall("GET", "/stat", {"path": path}, FileEntry)


def mkdir(path: str, parents: bool) -> FileCall[FileEntry]:
    return FileCall("POST", "/mkdir", {"path": path, "parents": _flag(parents)}, FileEntry)


def move(source: str, destination: str, overwrite: bool) -> FileCall[FileEntry]:
    body = {"from": source, "to": destination, "overwrite": overwrite}
    return FileCall("POST", "/move", {}, FileEntry, json=body)


def remove(path: str, recursive: bool) -> FileCall[None]:
    return FileCall("DELETE", "", {"path": path, "recursive": _flag(recursive)}, None)


def archive(path: str, compress: bool) -> FileCall[None]:
    return FileCall("GET", "/archive", {"path": path, "format": _format(compress)}, None)


def archive_top(path: str) -> str:
    """The name a directory's archive puts its members under: its own name (``.`` for ``/``)."""
    return posixpath.basename(posixpath.normpath(path)) or "."


def extract(path: str, compress: bool) -> FileCall[ArchiveExtracted]:
    content_type = "application/gzip" if compress else "application/x-tar"
    headers = {"Content-Type": content_type}
    return FileCall("PUT", "/archive", {"path": path}, ArchiveExtracted, headers=headers)


def _format(compress: bool) -> str:
    return "tar.gz" if compress else "tar"


def _is_file(data: object) -> bool:
    return callable(getattr(data, "read", None))


def _size_left(f: IO[bytes]) -> int | None:
    """What a regular file holds from where it stands (its Content-Length); None when it is no
    regular file or cannot tell."""
    try:
        st = os.fstat(f.fileno())
        return st.st_size - f.tell() if stat.S_ISREG(st.st_mode) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def upload_body(data: WriteData) -> tuple[bytes | Iterator[bytes], dict[str, str]]:
    """The request body for ``data`` and any header it sets (a regular file's length)."""
    if isinstance(data, str):
        return data.encode(), {}
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data), {}
    if _is_file(data):
        file = cast(IO[bytes], data)
        size = _size_left(file)
        headers = {} if size is None else {"Content-Length": str(size)}
        return _read_chunks(file), headers
    return iter(data), {}


def async_upload_body(
    data: AsyncWriteData,
) -> tuple[bytes | AsyncIterable[bytes], dict[str, str]]:
    """:func:`upload_body` for httpx's async client, which takes only async streams: a file
    object is read in a worker thread, chunk by chunk."""
    if isinstance(data, AsyncIterable):
        return data, {}
    body, headers = upload_body(data)
    if isinstance(body, bytes):
        return body, headers
    return AsyncChunks(body, in_thread=_is_file(data)), headers


class AsyncChunks:
    """Sync chunks as an async iterator, pulled in a worker thread when they read local files.
    A class rather than an async generator: httpx may drop the body unfinished (the gateway
    answered early), and a plain object needs no finalising then."""

    def __init__(self, chunks: Iterator[bytes], *, in_thread: bool) -> None:
        self._chunks = chunks
        self._in_thread = in_thread

    def __aiter__(self) -> AsyncChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._in_thread:
            chunk = await trio.to_thread.run_sync(next, self._chunks, None)
        else:
            chunk = next(self._chunks, None)
        if chunk is None:
            raise StopAsyncIteration
        return chunk
