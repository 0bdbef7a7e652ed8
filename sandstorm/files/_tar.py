"""The tar format, both ways: headers written in PAX format, and members read back from a
stream of blocks (ustar, GNU and PAX, their extended headers applied).

Only the format lives here; what a member may do to the sandbox is :mod:`._safety`'s.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Final, Protocol

from sandstorm.errors import InvalidRequest

__all__ = [
    "BLOCK",
    "DIR",
    "FILE",
    "HARDLINK",
    "RECORD",
    "SYMLINK",
    "Blocks",
    "Member",
    "describe",
    "end_of_archive",
    "header",
    "next_member",
    "padding",
]

BLOCK: Final = 512
#: tar writes in records of 20 blocks; an archive ends on a record boundary.
RECORD: Final = 20 * BLOCK
#: Largest extended header (PAX records, a GNU long name or link) read into memory.
MAX_EXTENDED: Final = 1024 * 1024

FILE: Final = tarfile.REGTYPE
DIR: Final = tarfile.DIRTYPE
SYMLINK: Final = tarfile.SYMTYPE
HARDLINK: Final = tarfile.LNKTYPE
#: Every kind of member after extended headers, as :class:`Member` names it.
_REGULAR: Final = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_DEVICES: Final = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device"}
_SPARSE_KEYS: Final = ("GNU.sparse.", "SCHILY.sparse")
_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"


def padding(size: int) -> int:
    """NUL bytes after ``size`` bytes of data, up to the next block."""
    return -size % BLOCK


def header(
    name: str, kind: bytes, *, mode: int, mtime: float, size: int = 0, linkname: str = ""
) -> bytes:
    """The header block(s) of one member, in PAX format (long and non-ASCII names go in a PAX
    extended header); owned by uid and gid 1000 with no user or group names."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode & 0o7777
    info.mtime = max(0, int(mtime))
    info.size = size
    info.linkname = linkname
    info.uid = info.gid = 1000
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)


def end_of_archive(written: int) -> bytes:
    """The two zero blocks that end an archive of ``written`` bytes so far, and the zeros that
    fill its last record."""
    end = written + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


class Blocks(Protocol):
    """Where members are read from: the archive's bytes in order."""

    async def exact(self, size: int) -> bytes | None:
        """``size`` bytes; None at a clean end (no byte left); raises when the end cuts them."""
        ...

    async def skip(self, size: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Member:
    """One member of an archive, its extended headers applied. ``kind`` is :data:`FILE`,
    :data:`DIR`, :data:`SYMLINK`, :data:`HARDLINK` or the raw type of a member nothing may
    extract (a device, a fifo); a file's ``size`` bytes of data follow it in the stream."""

    name: str
    kind: bytes
    size: int
    mode: int
    mtime: float
    linkname: str


def _invalid(message: str, **details: object) -> InvalidRequest:
    return InvalidRequest(message, field="body", **details)


def _parse_block(block: bytes) -> tarfile.TarInfo | None:
    """The header in ``block``; None for a zero block (the end of the archive)."""
    if block.count(0) == BLOCK:
        return None
    try:
        return tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)
    except tarfile.HeaderError as exc:
        raise _invalid(f"the body is not a tar archive (nor a gzip of one): {exc}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"<length> <key>=<value>\\n"`` records of a PAX extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 24)
        if space < 0 or not data[pos:space].isdigit():
            raise _invalid("malformed PAX extended header")
        end = pos + int(data[pos:space])
        record = data[space + 1 : end]
        if end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise _invalid("malformed PAX extended header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode(_ENCODING, _ERRORS)] = value.decode(_ENCODING, _ERRORS)
        pos = end
    return records


def _pax_number(records: dict[str, str], key: str, default: float) -> float:
    raw = records.get(key)
    if raw is None:
        return default
    try:
        value = float(raw) if key == "mtime" else int(raw)
    except ValueError:
        raise _invalid(f"PAX header {key}={raw!r} is not a number") from None
    if value < 0 or value != value:
        raise _invalid(f"PAX header {key}={raw!r} is out of range")
    return value


async def _extended(blocks: Blocks, size: int) -> bytes:
    if size > MAX_EXTENDED:
        raise _invalid(f"an extended header of {size} bytes is over {MAX_EXTENDED}")
    data = await blocks.exact(size + padding(size))
    if data is None:
        raise _invalid("the archive is truncated: it ends inside an extended header")
    return data[:size]


async def next_member(blocks: Blocks) -> Member | None:
    """The next member, its extended headers read and applied; None at the end of the archive.
    A member's data is left in the stream for the caller. Raises :class:`InvalidRequest` for a
    truncated or corrupt archive, and for what cannot be extracted faithfully (sparse files)."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    long_link: str | None = None
    extended = False
    while True:
        block = await blocks.exact(BLOCK)
        if block is None:
            raise _invalid("the archive is truncated: it ends without its end-of-archive blocks")
        info = _parse_block(block)
        if info is None:
            if extended:
                raise _invalid("the archive ends after an extended header, with no member")
            return None
        kind = info.type
        if kind == tarfile.XHDTYPE:
            pax.update(_pax_records(await _extended(blocks, info.size)))
        elif kind == tarfile.XGLTYPE:
            await _extended(blocks, info.size)  # global defaults: nothing here uses them
        elif kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            data = await _extended(blocks, info.size)
            text = data.split(b"\0", 1)[0].decode(_ENCODING, _ERRORS)
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = text
            else:
                long_link = text
        else:
            break
        extended = True

    name = pax.get("path", long_name if long_name is not None else info.name)
    if kind == tarfile.GNUTYPE_SPARSE or any(k.startswith(_SPARSE_KEYS) for k in pax):
        raise _invalid("sparse files are not supported", member=name)
    size = int(_pax_number(pax, "size", info.size))
    if kind in _REGULAR:
        kind = FILE
    elif kind not in (DIR, SYMLINK, HARDLINK, tarfile.FIFOTYPE, *_DEVICES):
        raise _invalid(f"member type {kind!r} is not supported", member=name)
    if kind != FILE:
        size = 0  # as tarfile and GNU tar read them: only regular files carry data
    return Member(
        name=name,
        kind=kind,
        size=size,
        mode=info.mode,
        mtime=_pax_number(pax, "mtime", info.mtime),
        linkname=pax.get("linkpath", long_link if long_link is not None else info.linkname),
    )


def describe(kind: bytes) -> str:
    """What a member that is neither a file, a directory nor a link is, in words."""
    return _DEVICES.get(kind, "a fifo" if kind == tarfile.FIFOTYPE else f"type {kind!r}")
