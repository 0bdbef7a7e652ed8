"""``AsyncClient.files(sandbox_id)``: the files of a running sandbox, on Trio (SPEC §8). The
same calls as :class:`sandstorm.sdk.Files`; local files are read and extracted in worker
threads, so the event loop never waits on the local disk for long."""

from __future__ import annotations

import builtins
import functools
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import trio

from sandstorm.api.files import ArchiveExtracted, FileEntry, FileList
from sandstorm.sdk import _file_calls as calls
from sandstorm.sdk._archive import ChunkReader, extract_stream, tar_stream
from sandstorm.sdk._files import LocalPath
from sandstorm.sdk._http import SandstormError, decode, raise_for
from sandstorm.sdk._watch import FsEvents, watch_events

T = TypeVar("T")


class AsyncFiles:
    """The files of one sandbox; see :class:`sandstorm.sdk.Files` for what each call does."""

    def __init__(
        self, http: httpx.AsyncClient, url: str, api_key: str | None, sandbox_id: str
    ) -> None:
        self._http = http
        self._url = url
        self._api_key = api_key
        self.sandbox_id = sandbox_id

    async def _request(
        self, call: calls.FileCall[Any], content: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        request = self._http.build_request(
            call.method,
            call.url(self.sandbox_id),
            params=call.params,
            json=call.json,
            content=content,
            headers={**call.headers, **(headers or {})},
        )
        if isinstance(content, AsyncIterable):
            request.stream = _Body(content)
        return await self._http.send(request)

    async def _call(
        self, call: calls.FileCall[T], content: Any = None, headers: dict[str, str] | None = None
    ) -> T:
        assert call.answer is not None
        return decode(await self._request(call, content, headers), call.answer)

    @asynccontextmanager
    async def _download(self, call: calls.FileCall[None]) -> AsyncIterator[httpx.Response]:
        url = call.url(self.sandbox_id)
        async with self._http.stream(call.method, url, params=call.params) as response:
            if response.status_code >= 400:
                await response.aread()
                raise_for(response)
            yield response

    async def read(self, path: str) -> bytes:
        response = await self._request(calls.content(path))
        raise_for(response)
        return response.content

    @asynccontextmanager
    async def read_stream(self, path: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """``async with files.read_stream(path) as chunks: async for chunk in chunks: …``"""
        async with self._download(calls.content(path)) as response:
            yield response.aiter_bytes(calls.CHUNK)

    async def read_to(self, path: str, fileobj: IO[bytes]) -> int:
        count = 0
        async with self.read_stream(path) as chunks:
            async for chunk in chunks:
                await trio.to_thread.run_sync(fileobj.write, chunk)
                count += len(chunk)
        return count

    async def write(
        self, path: str, data: calls.AsyncWriteData, *, mode: int | str | None = None
    ) -> FileEntry:
        """As :meth:`Files.write`; ``data`` may also be an async iterable of bytes."""
        content, headers = calls.async_upload_body(data)
        return await self._call(calls.write(path, mode), content, headers)

    async def listing(self, path: str, depth: int = 1) -> FileList:
        return await self._call(calls.listing(path, depth))

    async def list(self, path: str, depth: int = 1) -> builtins.list[FileEntry]:
        return (await self.listing(path, depth)).entries

    async def stat(self, path: str) -> FileEntry:
        return await self._call(calls.stat_(path))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except SandstormError as exc:
            if exc.code == "file_not_found":
                return False
            raise
        return True

    async def mkdir(self, path: str, *, parents: bool = True) -> FileEntry:
        return await self._call(calls.mkdir(path, parents))

    async def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileEntry:
        return await self._call(calls.move(source, destination, overwrite))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        raise_for(await self._request(calls.remove(path, recursive)))

    async def upload_dir(
        self, local_dir: LocalPath, remote_dir: str, *, compress: bool = True
    ) -> ArchiveExtracted:
        stream = calls.AsyncChunks(tar_stream(Path(local_dir), compress=compress), in_thread=True)
        return await self._call(calls.extract(remote_dir, compress), stream)

    async def download_dir(
        self, remote_dir: str, local_dir: LocalPath, *, compress: bool = True
    ) -> int:
        async with self._download(calls.archive(remote_dir, compress)) as response:
            chunks = response.aiter_bytes()

            def next_chunk() -> bytes:
                return trio.from_thread.run(_next_or_end, chunks)

            reader, top = ChunkReader(next_chunk), calls.archive_top(remote_dir)
            return await trio.to_thread.run_sync(
                functools.partial(extract_stream, reader, Path(local_dir), top=top)
            )

    def watch(self, path: str, *, recursive: bool = True) -> AbstractAsyncContextManager[FsEvents]:
        """``async with files.watch("/workspace") as events: async for event in events: …``;
        leaving sends ``unwatch`` and closes the stream."""
        return watch_events(self._url, self._api_key, self.sandbox_id, path, recursive=recursive)


class _Body(httpx.AsyncByteStream):
    """A streamed request body iterated as it is, not through httpx's own async generator: the
    gateway may answer before taking it all (413, 507, ``unsafe_archive``), and an async
    generator dropped unfinished is reported when it is collected."""

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks.__aiter__()


async def _next_or_end(chunks: AsyncIterator[bytes]) -> bytes:
    """The next chunk, or ``b""`` once there are no more."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return b""
