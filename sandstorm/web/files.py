"""File routes of SPEC §8: a running sandbox's files read, written, listed, moved and removed
through its agent, inside the sandbox, as its user. The gateway never opens a host path here.

Bytes stream both ways: an upload goes to the agent as it arrives (``bodies.BoundedBody`` holds
at most a megabyte the sandbox has not taken), a download is sent as the agent reads it (it
reads only what its credit allows, see ``agent/files.py``). Errors are known before the first
byte of an answer: a download opens what it sends before the answer starts (``_opened``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Final
from urllib.parse import quote

import msgspec
from quart import Blueprint, Response, g, request

from sandstorm.actors.sandbox import SandboxActor
from sandstorm.agent.files import Download
from sandstorm.agent.fs_wire import FsEntry
from sandstorm.api.decoding import decode_request
from sandstorm.api.files import (
    MAX_LIST_DEPTH,
    MAX_LIST_ENTRIES,
    ArchiveExtracted,
    FileEntry,
    FileList,
    MoveRequest,
)
from sandstorm.api.timestamps import rfc3339_from_epoch
from sandstorm.config import Config
from sandstorm.errors import InvalidRequest, PayloadTooLarge, RangeNotSatisfiable
from sandstorm.files import extract_archive, open_archive, sandbox_path
from sandstorm.web.rest import _gateway, _json, _raw_body, live_sandbox

blueprint = Blueprint("files", __name__)
_MOVE = msgspec.json.Decoder(MoveRequest)
_RANGE: Final = re.compile(r"^bytes=(\d*)-(\d*)$")
_TRUE = ("1", "true", "yes")
_FALSE = ("", "0", "false", "no")


def _config() -> Config:
    return _gateway().config


def file_entry(entry: FsEntry) -> FileEntry:
    return FileEntry(
        name=entry.name,
        path=entry.path,
        type=entry.type,
        size=entry.size,
        mode=f"{entry.mode:04o}",
        mtime=rfc3339_from_epoch(entry.mtime),
        target=entry.target,
    )


def _path(field: str = "path") -> str:
    path = sandbox_path(request.args.get(field), field)
    g.audit_target = path
    return path


def _flag(name: str) -> bool:
    raw = request.args.get(name, "").lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidRequest(f"{name} must be true or false", field=name)


def _int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be in {low}..{high}", field=name)
    return value


def _mode(default: int) -> int:
    raw = request.args.get("mode")
    if raw is None or raw == "":
        return default
    problem = "mode must be octal permission bits within 0000..0777, e.g. 0644"
    try:
        mode = int(raw, 8)
    except ValueError:
        raise InvalidRequest(problem, field="mode") from None
    if not 0 <= mode <= 0o777:  # no setuid, setgid or sticky bit
        raise InvalidRequest(problem, field="mode")
    return mode


def _range() -> tuple[int, int | None, int | None] | None:
    """The byte range a ``Range: bytes=a-b`` header asks for, as (offset, length, suffix):
    ``a-b``, ``a-`` (to the end) or ``-n`` (the last n bytes). None for no header, another unit,
    several ranges or a malformed one: the whole file is sent, as RFC 9110 allows."""
    raw = request.headers.get("Range")
    if raw is None or (match := _RANGE.match(raw.strip().replace(" ", ""))) is None:
        return None
    first, last = match.groups()
    if first == "":
        return None if last == "" else (0, None, int(last))
    if last == "":
        return int(first), None, None
    if int(last) < int(first):
        return None
    return int(first), int(last) - int(first) + 1, None


class _UploadBody:
    """The request's body as chunks, counted against ``max_upload_bytes`` (a chunked body has
    no declared length to refuse it by)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._total = 0
        self._body = request.body

    def __aiter__(self) -> _UploadBody:
        return self

    async def __anext__(self) -> bytes:
        chunk: bytes = await self._body.__anext__()
        self._total += len(chunk)
        if self._total > self._limit:
            raise PayloadTooLarge(
                f"upload is larger than max_upload_bytes ({self._limit} bytes)",
                field="body",
                limit=self._limit,
            )
        return chunk


def upload_body() -> _UploadBody:
    """The request's body to stream into the sandbox; a declared length over
    ``max_upload_bytes`` is refused (413) before any of it is read."""
    limit = _config().max_upload_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"upload of {declared} bytes is larger than max_upload_bytes ({limit} bytes)",
            field="body",
            limit=limit,
        )
    return _UploadBody(limit)


# ---------------------------------------------------------------------------- content


@blueprint.get("/v1/sandboxes/<sandbox_id>/files/content")
async def read_file(sandbox_id: str) -> Response:
    actor = await live_sandbox(sandbox_id)
    path = _path()
    wanted = _range()
    opened: list[Download] = []
    body = await _opened(_download(actor, path, wanted, opened))  # a missing file: 404 here
    download = opened[0]
    if wanted is not None and download.length == 0:
        await body.aclose()
        size = download.entry.size
        raise RangeNotSatisfiable(
            f"range {request.headers['Range']} of a {size}-byte file", size=size
        )
    response = Response(
        body,
        status=206 if wanted is not None else 200,
        content_type="application/octet-stream",
    )
    response.headers["Content-Length"] = str(download.length)
    response.headers["Accept-Ranges"] = "bytes"
    if wanted is not None:
        end = download.offset + download.length - 1
        response.headers["Content-Range"] = f"bytes {download.offset}-{end}/{download.entry.size}"
    response.timeout = None  # as long as the client keeps taking it
    return response


async def _opened(body: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """``body`` run to its first, empty chunk, by which it has opened what it sends: what
    cannot be opened fails here, before the answer starts. Started, it is closed by trio's
    finalizer even if the answer is never sent."""
    try:
        await anext(body)
    except BaseException:
        await body.aclose()
        raise
    return body


async def _download(
    actor: SandboxActor,
    path: str,
    wanted: tuple[int, int | None, int | None] | None,
    opened: list[Download],
) -> AsyncGenerator[bytes, None]:
    """Opens the file (symlinks followed) and hands its :class:`Download` over through
    ``opened`` with a first, empty chunk (see :func:`_opened`); then the bytes of the range as
    the agent reads them. A file that shrinks meanwhile ends the answer short, which breaks its
    connection: the client sees the truncation."""
    offset, length, suffix = wanted or (0, None, None)
    async with (
        actor.file_access() as files,
        files.read(path, offset=offset, length=length, suffix=suffix) as download,
    ):
        opened.append(download)
        yield b""
        async for chunk in download:
            yield chunk


@blueprint.put("/v1/sandboxes/<sandbox_id>/files/content")
async def write_file(sandbox_id: str) -> Response:
    actor = await live_sandbox(sandbox_id)
    path = _path()
    mode = _mode(0o644)
    body = upload_body()
    async with actor.file_access() as files:
        entry = await files.write(path, body, mode=mode)
    return _json(file_entry(entry), 201)


# ---------------------------------------------------------------------------- the tree


@blueprint.get("/v1/sandboxes/<sandbox_id>/files/list")
async def list_files(sandbox_id: str) -> Response:
    actor = await live_sandbox(sandbox_id)
    path = _path()
    depth = _int("depth", 1, 1, MAX_LIST_DEPTH)
    async with (
        actor.file_access() as files,
        files.walk(path, depth=depth, max_entries=MAX_LIST_ENTRIES) as walk,
    ):
        entries = [file_entry(entry) async for entry in walk]
    return _json(FileList(path=path, entries=entries, truncated=walk.truncated))


@blueprint.get("/v1/sandboxes/<sandbox_id>/files/stat")
async def stat_file(sandbox_id: str) -> Response:
    actor = await live_sandbox(sandbox_id)
    path = _path()
    async with actor.file_access() as files:
        return _json(file_entry(await files.stat(path)))


@blueprint.post("/v1/sandboxes/<sandbox_id>/files/mkdir")
async def make_directory(sandbox_id: str) -> Response:
    await _raw_body()  # before any answer (see rest.exec_in_sandbox)
    actor = await live_sandbox(sandbox_id)
    path = _path()
    parents = _flag("parents")
    mode = _mode(0o755)
    async with actor.file_access() as files:
        return _json(file_entry(await files.mkdir(path, parents=parents, mode=mode)), 201)


@blueprint.post("/v1/sandboxes/<sandbox_id>/files/move")
async def move_file(sandbox_id: str) -> Response:
    raw = await _raw_body()
    actor = await live_sandbox(sandbox_id)
    move: MoveRequest = await decode_request(_MOVE, raw)
    source = sandbox_path(move.from_, "from")
    target = sandbox_path(move.to, "to")
    g.audit_target = f"{source} -> {target}"
    async with actor.file_access() as files:
        entry = await files.move(source, target, overwrite=move.overwrite)
    return _json(file_entry(entry))


@blueprint.delete("/v1/sandboxes/<sandbox_id>/files")
async def delete_file(sandbox_id: str) -> Response:
    actor = await live_sandbox(sandbox_id)
    path = _path()
    recursive = _flag("recursive")
    async with actor.file_access() as files:
        await files.remove(path, recursive=recursive)
    return Response(b"", status=204)


# ---------------------------------------------------------------------------- archives

#: Most bytes of tar a gzip upload may unpack to, per byte of ``max_upload_bytes`` (a bound on
#: the work a small, very compressible body can ask for).
UNPACK_RATIO: Final = 4
_ARCHIVE_TYPES: Final = {"tar": "application/x-tar", "tar.gz": "application/gzip"}


@blueprint.get("/v1/sandboxes/<sandbox_id>/files/archive")
async def read_archive(sandbox_id: str) -> Response:
    actor = await live_sandbox(sandbox_id)
    path = _path()
    form = request.args.get("format") or "tar"
    if form not in _ARCHIVE_TYPES:
        raise InvalidRequest("format must be tar or tar.gz", field="format")
    body = await _opened(_archive(actor, path, form == "tar.gz"))  # a missing path: 404 here
    response = Response(body, content_type=_ARCHIVE_TYPES[form])
    name = (path.rstrip("/").rsplit("/", 1)[-1] or "root") + "." + form
    response.headers["Content-Disposition"] = _attachment(name)
    response.timeout = None
    return response


def _attachment(name: str) -> str:
    """A ``Content-Disposition`` naming ``name``: in ASCII for every client, and exactly
    (RFC 6266 ``filename*``) for those that read UTF-8."""
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


async def _archive(actor: SandboxActor, path: str, gzip: bool) -> AsyncGenerator[bytes, None]:
    """The archive, its path opened before a first, empty chunk (see :func:`_opened`)."""
    async with actor.file_access() as files, open_archive(files, path, gzip=gzip) as chunks:
        yield b""
        async for chunk in chunks:
            yield chunk


@blueprint.put("/v1/sandboxes/<sandbox_id>/files/archive")
async def extract_archive_into(sandbox_id: str) -> Response:
    actor = await live_sandbox(sandbox_id)
    path = _path()
    body = upload_body()
    limit = _config().max_upload_bytes
    async with actor.file_access() as files:
        count, size = await extract_archive(
            files, body, path, max_unpacked_bytes=limit * UNPACK_RATIO
        )
    return _json(ArchiveExtracted(path=path, files=count, bytes=size), 201)
