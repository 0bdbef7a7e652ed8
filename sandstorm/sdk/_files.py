"""``Client.files(sandbox_id)``: the files of a running sandbox, blocking (SPEC §8)."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from sandstorm.api.files import ArchiveExtracted, FileEntry, FileList
from sandstorm.api.types import FsEvent
from sandstorm.sdk import _file_calls as calls
from sandstorm.sdk._archive import ChunkReader, extract_stream, tar_stream
from sandstorm.sdk._http import SandstormError, decode, raise_for
from sandstorm.sdk._threads import iterate_in_thread
from sandstorm.sdk._watch import watch_events

T = TypeVar("T")
LocalPath = str | PathLike[str]


class Files:
    """The files of one sandbox. Paths are the sandbox's own, absolute; everything runs inside
    it as its user. An error answer raises :class:`SandstormError` with the gateway's code:
    ``file_not_found``, ``wrong_file_type``, ``file_exists``, ``permission_denied``,
    ``insufficient_storage``, ``unsafe_archive``, ``payload_too_large``, or
    ``invalid_request`` (a bad path). Content moves in chunks both ways."""

    def __init__(self, http: httpx.Client, url: str, api_key: str | None, sandbox_id: str) -> None:
        self._http = http
        self._url = url
        self._api_key = api_key
        self.sandbox_id = sandbox_id

    def _request(
        self, call: calls.FileCall[Any], content: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return self._http.request(
            call.method,
            call.url(self.sandbox_id),
            params=call.params,
            json=call.json,
            content=content,
            headers={**call.headers, **(headers or {})},
        )

    def _call(
        self, call: calls.FileCall[T], content: Any = None, headers: dict[str, str] | None = None
    ) -> T:
        assert call.answer is not None
        return decode(self._request(call, content, headers), call.answer)

    @contextmanager
    def _download(self, call: calls.FileCall[None]) -> Iterator[httpx.Response]:
        with self._http.stream(call.method, call.url(self.sandbox_id), params=call.params) as r:
            if r.status_code >= 400:
                r.read()
                raise_for(r)
            yield r

    def read(self, path: str) -> bytes:
        """The whole content of the regular file at ``path``."""
        response = self._request(calls.content(path))
        raise_for(response)
        return response.content

    @contextmanager
    def read_stream(self, path: str) -> Iterator[Iterator[bytes]]:
        """``with files.read_stream(path) as chunks: for chunk in chunks: …``"""
        with self._download(calls.content(path)) as response:
            yield response.iter_bytes(calls.CHUNK)

    def read_to(self, path: str, fileobj: IO[bytes]) -> int:
        """Write the file at ``path`` into ``fileobj`` chunk by chunk; returns the byte count."""
        count = 0
        with self.read_stream(path) as chunks:
            for chunk in chunks:
                fileobj.write(chunk)
                count += len(chunk)
        return count

    def write(
        self, path: str, data: calls.WriteData, *, mode: int | str | None = None
    ) -> FileEntry:
        """Replace (or make) the file at ``path`` with ``data``: bytes, text (UTF-8), a binary
        file object (read in chunks from where it stands), or an iterable of bytes. The file
        appears whole or not at all; missing parents are made. ``mode``: ``0o644`` or
        ``"0644"``."""
        content, headers = calls.upload_body(data)
        return self._call(calls.write(path, mode), content, headers)

    def listing(self, path: str, depth: int = 1) -> FileList:
        """The directory at ``path`` to ``depth`` levels (at most 16), with ``truncated`` set
        when the gateway stopped at its entry limit (10,000)."""
        return self._call(calls.listing(path, depth))

    def list(self, path: str, depth: int = 1) -> builtins.list[FileEntry]:
        """The entries of :meth:`listing`."""
        return self.listing(path, depth).entries

    def stat(self, path: str) -> FileEntry:
        """The entry at ``path`` itself (a symlink is not followed)."""
        return self._call(calls.stat_(path))

    def exists(self, path: str) -> bool:
        """Whether anything is at ``path`` (``file_not_found`` is False; any other error
        raises)."""
        try:
            self.stat(path)
        except SandstormError as exc:
            if exc.code == "file_not_found":
                return False
            raise
        return True

    def mkdir(self, path: str, *, parents: bool = True) -> FileEntry:
        """Make the directory ``path``; with ``parents``, its missing parents too, and an
        existing directory is no error."""
        return self._call(calls.mkdir(path, parents))

    def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileEntry:
        """Rename or move; ``file_exists`` when ``destination`` exists and not ``overwrite``."""
        return self._call(calls.move(source, destination, overwrite))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, a symlink or an empty directory; a full one with ``recursive``."""
        raise_for(self._request(calls.remove(path, recursive)))

    def upload_dir(
        self, local_dir: LocalPath, remote_dir: str, *, compress: bool = True
    ) -> ArchiveExtracted:
        """Copy the tree below ``local_dir`` into ``remote_dir`` (made when missing) as one tar
        stream built as it is sent. Symlinks go as symlinks; sockets and devices are left out."""
        stream = tar_stream(Path(local_dir), compress=compress)
        return self._call(calls.extract(remote_dir, compress), stream)

    def download_dir(self, remote_dir: str, local_dir: LocalPath, *, compress: bool = True) -> int:
        """Copy the tree below ``remote_dir`` into ``local_dir`` (made when missing), extracting
        the tar as it arrives with the ``data`` filter; returns how many entries it wrote. A
        member that would land outside ``local_dir`` raises ``tarfile.FilterError``; a
        ``remote_dir`` that is a file raises :class:`ArchiveError`."""
        with self._download(calls.archive(remote_dir, compress)) as response:
            chunks = response.iter_bytes()
            reader, top = ChunkReader(lambda: next(chunks, b"")), calls.archive_top(remote_dir)
            return extract_stream(reader, Path(local_dir), top=top)

    def watch(self, path: str, *, recursive: bool = True) -> Iterator[FsEvent]:
        """Yield the ``fs`` events under ``path`` (create, write, remove, rename) until the
        sandbox ends; leaving the loop sends ``unwatch`` and closes the stream."""
        return iterate_in_thread(
            lambda: watch_events(
                self._url, self._api_key, self.sandbox_id, path, recursive=recursive
            ),
            name="sandstorm-watch",
        )
