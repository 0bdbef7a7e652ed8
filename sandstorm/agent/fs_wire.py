"""Payloads of the agent's file frames (``FS`` … ``FS_EVENT``, see "Files" in
``protocol/agent.md``): requests encoded for the agent, replies and events decoded from it, and
the gateway error each failure it reports stands for.

Every reply is untrusted: decoded against its schema, with names, paths and counts bounded, so a
hostile agent can only fail its own sandbox (:class:`AgentProtocolError`).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar

import msgspec

from sandstorm.errors import (
    FileExists,
    FileNotFound,
    GatewayError,
    InsufficientStorage,
    InvalidRequest,
    PermissionDenied,
    WrongFileType,
)

from .wire import AgentProtocolError

__all__ = [
    "FS_DATA_CHUNK",
    "MAX_EVENTS_PER_FRAME",
    "FileError",
    "FsEntry",
    "FsEvent",
    "FsEvents",
    "FsFailure",
    "FsListing",
    "FsReply",
    "decode_events",
    "decode_listing",
    "decode_reply",
    "encode_credit",
    "encode_request",
    "file_error",
]

#: File bytes per FS_DATA frame the gateway sends (a frame to the agent holds at most 1 MiB).
FS_DATA_CHUNK: Final = 1024 * 1024
#: Events the agent puts in one FS_EVENT frame, at most.
MAX_EVENTS_PER_FRAME: Final = 256

_Path = Annotated[str, msgspec.Meta(max_length=4096)]
_Name = Annotated[str, msgspec.Meta(max_length=4096)]
EntryType = Literal["file", "dir", "symlink", "other"]
FsOp = Literal["create", "write", "remove", "rename", "overflow"]


class FsEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One file as the agent saw it (``lstat``: a symlink is itself, with its ``target``)."""

    name: _Name
    path: _Path
    type: EntryType
    size: Annotated[int, msgspec.Meta(ge=0)]
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
    mtime: float
    target: _Path | None = None


class FsFailure(msgspec.Struct, frozen=True, kw_only=True):
    """Why a request failed inside the sandbox: the ``errno`` name and a message."""

    errno: Annotated[str, msgspec.Meta(max_length=32)]
    message: Annotated[str, msgspec.Meta(max_length=8192)]


class FsReply(msgspec.Struct, frozen=True, kw_only=True):
    """FS_REPLY, and FS_END from the agent: ``ok`` and the result, or the failure."""

    ok: bool
    errno: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    message: Annotated[str, msgspec.Meta(max_length=8192)] | None = None
    entry: FsEntry | None = None
    #: ``read``: the byte range that follows as FS_DATA.
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    length: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: ``list``: the walk stopped at its entry limit.
    truncated: bool = False

    @property
    def failure(self) -> FsFailure | None:
        if self.ok:
            return None
        return FsFailure(errno=self.errno or "EIO", message=self.message or "failed")


class FsListing(msgspec.Struct, frozen=True, kw_only=True):
    """One FS_DATA frame of a ``list``: entries in walk order (a directory before its
    contents)."""

    entries: Annotated[list[FsEntry], msgspec.Meta(max_length=4096)]


class FsEvent(msgspec.Struct, frozen=True, kw_only=True):
    op: FsOp
    path: _Path
    to: _Path | None = None


class FsEvents(msgspec.Struct, frozen=True, kw_only=True):
    """One FS_EVENT frame: what changed under a watch since the last one (coalesced)."""

    events: Annotated[list[FsEvent], msgspec.Meta(max_length=MAX_EVENTS_PER_FRAME)]


class FileError(GatewayError):
    """A file request the agent refused, for a reason it names by ``errno`` but that maps to no
    more precise error (``EBUSY``, ``EXDEV``, ``EIO`` …)."""

    status = 409
    code = "file_operation_failed"


_BY_ERRNO: Final[dict[str, type[GatewayError]]] = {
    "ENOENT": FileNotFound,
    "ENOTDIR": WrongFileType,
    "EISDIR": WrongFileType,
    "ENOTEMPTY": WrongFileType,
    "EFTYPE": WrongFileType,  # the agent's own: not a regular file (a fifo, a device)
    "EEXIST": FileExists,
    "EACCES": PermissionDenied,
    "EPERM": PermissionDenied,
    "EROFS": PermissionDenied,
    "ENOSPC": InsufficientStorage,
    "EDQUOT": InsufficientStorage,
    "EFBIG": InsufficientStorage,
}


def file_error(failure: FsFailure, path: str) -> GatewayError:
    """The gateway error for a failure the agent reported about ``path``."""
    details: dict[str, object] = {"path": path, "errno": failure.errno}
    if failure.errno in ("ENAMETOOLONG", "ELOOP", "EINVAL"):
        return InvalidRequest(failure.message, field="path", **details)
    kind = _BY_ERRNO.get(failure.errno, FileError)
    return kind(failure.message, **details)


_encoder: Final = msgspec.json.Encoder()
_reply_decoder: Final = msgspec.json.Decoder(FsReply)
_listing_decoder: Final = msgspec.json.Decoder(FsListing)
_events_decoder: Final = msgspec.json.Decoder(FsEvents)


def encode_request(op: str, **fields: object) -> bytes:
    """An FS payload: ``{"op": op, ...fields}`` (fields that are ``None`` are left out)."""
    body: dict[str, object] = {"op": op}
    body.update((k, v) for k, v in fields.items() if v is not None)
    return _encoder.encode(body)


def encode_credit(nbytes: int) -> bytes:
    return _encoder.encode({"bytes": nbytes})


_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], what: str, payload: bytes) -> _T:
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise AgentProtocolError(f"malformed {what} payload: {exc}") from None


def decode_reply(payload: bytes, what: str = "FS_REPLY") -> FsReply:
    return _decode(_reply_decoder, what, payload)


def decode_listing(payload: bytes) -> FsListing:
    return _decode(_listing_decoder, "FS_DATA listing", payload)


def decode_events(payload: bytes) -> FsEvents:
    return _decode(_events_decoder, "FS_EVENT", payload)
