"""Bytes of an archive in bounded pieces: an upload's body read as tar (gunzipped when it is
gzip), and an archive's tar bytes packed into the chunks of a download (gzipped on request).

Neither ever holds more than a piece or two: a piece of a download is at most
:data:`OUT_CHUNK` bytes, a piece of an upload at most :data:`IN_PIECE` (a gzip bomb unpacks
no faster than it is consumed).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

import trio

from sandstorm.errors import InvalidRequest, PayloadTooLarge

__all__ = ["IN_PIECE", "OUT_CHUNK", "Packer", "TarBytes"]

#: Largest chunk of a download.
OUT_CHUNK: Final = 128 * 1024
#: Largest piece of an upload's tar bytes handed on at once.
IN_PIECE: Final = 256 * 1024
#: Data compressed in a worker thread from this size up, so the event loop does not wait on it.
_THREAD_FROM: Final = 64 * 1024
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: zlib's window bits for gzip framing only.
_GZIP_WBITS: Final = 31


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message, field="body")


class TarBytes:
    """An upload's body as the tar stream in it: plain, or gzip (one member or several, as
    ``cat a.gz b.gz`` makes) told by its magic. Raises :class:`PayloadTooLarge` past
    ``max_body`` bytes of body or ``max_unpacked`` bytes of tar, and :class:`InvalidRequest`
    for a corrupt or truncated gzip stream or a tar cut short."""

    def __init__(
        self,
        body: AsyncIterable[bytes],
        *,
        max_body: int | None = None,
        max_unpacked: int | None = None,
    ) -> None:
        self._body: AsyncIterator[bytes] = aiter(body)
        self._max_body = max_body
        self._max_unpacked = max_unpacked
        self.body_bytes = 0
        self.unpacked = 0
        self._gzip: bool | None = None  # unknown until the first two bytes
        self._inflater: zlib._Decompress | None = None
        self._input = memoryview(b"")  # body bytes not yet handed on (plain) or inflated (gzip)
        self._inflater_full = False  # the last inflate filled its output: more may be inside
        self._ended = False
        self._buffer = b""  # tar bytes read but not yet taken
        self._offset = 0

    async def _more_body(self) -> bool:
        while not self._ended:
            try:
                chunk = await anext(self._body)
            except StopAsyncIteration:
                self._ended = True
                break
            if chunk:
                self.body_bytes += len(chunk)
                if self._max_body is not None and self.body_bytes > self._max_body:
                    raise PayloadTooLarge(f"the archive is larger than {self._max_body} bytes")
                self._input = memoryview(bytes(self._input) + chunk if self._input else chunk)
                return True
        return False

    async def _piece(self) -> bytes | None:
        """The next piece of tar bytes (at most :data:`IN_PIECE`); None at the body's end."""
        if self._gzip is None:
            while len(self._input) < len(_GZIP_MAGIC) and await self._more_body():
                pass
            self._gzip = bytes(self._input[:2]) == _GZIP_MAGIC
        piece = await (self._inflate() if self._gzip else self._plain())
        if piece is not None:
            self.unpacked += len(piece)
            if self._max_unpacked is not None and self.unpacked > self._max_unpacked:
                raise PayloadTooLarge(
                    f"the archive unpacks to more than {self._max_unpacked} bytes"
                )
        return piece

    async def _plain(self) -> bytes | None:
        if not self._input and not await self._more_body():
            return None
        piece = bytes(self._input[:IN_PIECE])
        self._input = self._input[IN_PIECE:]
        return piece

    async def _inflate(self) -> bytes | None:
        while True:
            if self._inflater is None or self._inflater.eof:
                if self._inflater is not None:
                    self._input = memoryview(self._inflater.unused_data)
                if not self._input and not await self._more_body():
                    return None  # every gzip member is complete
                self._inflater = zlib.decompressobj(_GZIP_WBITS)
            out = await self._inflate_step(self._inflater)
            if out:
                return out

    async def _inflate_step(self, inflater: zlib._Decompress) -> bytes:
        """Some bytes of the gzip member ``inflater`` unpacks (perhaps none yet)."""
        if not self._input and not self._inflater_full and not await self._more_body():
            raise _invalid("the gzip stream is truncated")
        try:
            out = inflater.decompress(self._input, IN_PIECE)
        except zlib.error as exc:
            raise _invalid(f"the gzip stream is corrupt: {exc}") from None
        self._input = memoryview(inflater.unconsumed_tail)
        self._inflater_full = len(out) == IN_PIECE
        return out

    async def drain(self) -> None:
        """Read the body to its end once the archive has ended (a record's padding, the end of
        the gzip stream, whose check catches corruption); what follows the last gzip member
        is ignored, as gzip does."""
        self._buffer, self._offset = b"", 0
        while self._inflater is not None and not self._inflater.eof:
            await self._inflate_step(self._inflater)
        self._input = memoryview(b"")
        while await self._more_body():
            self._input = memoryview(b"")

    # ------------------------------------------------------------------ as tarfile reads

    async def exact(self, size: int) -> bytes | None:
        """``size`` bytes; None when the stream ended before any of them; raises
        :class:`InvalidRequest` when it ends part way through."""
        while len(self._buffer) - self._offset < size:
            piece = await self._piece()
            if piece is None:
                if self._offset == len(self._buffer):
                    return None
                raise _invalid("the archive is truncated")
            self._buffer = self._buffer[self._offset :] + piece
            self._offset = 0
        data = self._buffer[self._offset : self._offset + size]
        self._offset += size
        return data

    async def some(self, most: int) -> bytes:
        """Between 1 and ``most`` bytes; raises :class:`InvalidRequest` at the end."""
        if self._offset == len(self._buffer):
            piece = await self._piece()
            if piece is None:
                raise _invalid("the archive is truncated")
            self._buffer, self._offset = piece, 0
        data = self._buffer[self._offset : self._offset + most]
        self._offset += len(data)
        return data

    async def skip(self, size: int) -> None:
        while size > 0:
            size -= len(await self.some(min(size, IN_PIECE)))


class Packer:
    """Tar bytes into the chunks of a download: gzipped with ``gzip``, cut at
    :data:`OUT_CHUNK`. ``written`` counts the tar bytes taken."""

    def __init__(self, *, gzip: bool) -> None:
        self._deflater = zlib.compressobj(wbits=_GZIP_WBITS) if gzip else None
        self._pending = bytearray()
        self.written = 0

    async def add(self, data: bytes) -> list[bytes]:
        """Take ``data``; the chunks now complete."""
        self.written += len(data)
        if self._deflater is not None:
            if len(data) >= _THREAD_FROM:
                data = await trio.to_thread.run_sync(self._deflater.compress, data)
            else:
                data = self._deflater.compress(data)
        self._pending += data
        return self._cut(final=False)

    def finish(self) -> list[bytes]:
        """The chunks left, the compressed stream's end included."""
        if self._deflater is not None:
            self._pending += self._deflater.flush()
        return self._cut(final=True)

    def _cut(self, *, final: bool) -> list[bytes]:
        whole = len(self._pending) if final else len(self._pending) // OUT_CHUNK * OUT_CHUNK
        if whole == 0:
            return []
        view = memoryview(self._pending)
        chunks = [bytes(view[i : i + OUT_CHUNK]) for i in range(0, whole, OUT_CHUNK)]
        view.release()
        del self._pending[:whole]
        return chunks
