"""``sandstorm cp`` and ``sandstorm files …``: files in and out of a running sandbox.

``cp`` copies as ``docker cp`` does: a directory copied to a path that does not exist becomes
that path; copied to an existing directory, it lands inside it under its own name; a source
ending in ``/.`` copies the directory's contents only. A file copied to an existing directory,
or to a destination ending in ``/``, lands inside it. ``-`` is stdin (as the source) or stdout
(as the destination) for one file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import re
import stat
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from sandstorm.api.files import FileEntry
from sandstorm.cli.client._output import Failure, UsageError, note, short_time, table
from sandstorm.sdk import ArchiveError, AsyncClient, AsyncFiles, SandstormError

_REMOTE = re.compile(r"^(sbx_[0-9A-Za-z]+):(.*)$", re.DOTALL)
_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "other": 0}


@dataclass(frozen=True)
class Remote:
    """``sbx_…:/path``: a path in a sandbox; ``contents`` when it ended in ``/.``, ``directory``
    when it ended in ``/`` (a file copied there goes inside it)."""

    sandbox_id: str
    path: str
    contents: bool = False
    directory: bool = False


def parse_remote(text: str) -> Remote | None:
    """``text`` as a sandbox path, or None when it names a local one."""
    match = _REMOTE.match(text)
    if match is None:
        return None
    sandbox_id, path = match.groups()
    if not path.startswith("/"):
        raise UsageError(f"the path in {text!r} must be absolute (sbx_…:/workspace/…)")
    normal = "/" + posixpath.normpath(path).lstrip("/")
    return Remote(sandbox_id, normal, path.endswith("/."), path.endswith("/"))


def remote_arg(text: str) -> Remote:
    remote = parse_remote(text)
    if remote is None:
        raise UsageError(f"not a sandbox path: {text!r} (sbx_…:/path)")
    return remote


def _local_contents(text: str) -> bool:
    return text == "." or text.endswith("/.")


async def cmd_cp(client: AsyncClient, args: argparse.Namespace) -> int:
    source, destination = parse_remote(args.source), parse_remote(args.destination)
    if (source is None) == (destination is None):
        raise UsageError("one side of cp must be a sandbox path (sbx_…:/path), the other local")
    try:
        if destination is not None:
            await _upload(client.files(destination.sandbox_id), args.source, destination)
        else:
            assert source is not None
            await _download(client.files(source.sandbox_id), source, args.destination)
    except (OSError, tarfile.TarError, ArchiveError) as exc:
        raise Failure(_local_error(exc)) from None
    return 0


def _local_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot copy:{where}: {exc.strerror}"
    return f"cannot copy: {exc}"


async def _remote_type(files: AsyncFiles, path: str) -> str | None:
    """The type of what is at ``path`` in the sandbox; None when nothing is."""
    try:
        return (await files.stat(path)).type
    except SandstormError as exc:
        if exc.code == "file_not_found":
            return None
        raise


async def _upload(files: AsyncFiles, source: str, destination: Remote) -> None:
    if source == "-":
        await files.write(destination.path, sys.stdin.buffer)
        return
    local = Path(source)
    if not local.exists():
        raise UsageError(f"no such file or directory: {source}")
    existing = await _remote_type(files, destination.path)
    if local.is_dir():
        target = destination.path
        if existing == "dir" and not _local_contents(source):
            target = posixpath.join(target, local.resolve().name)
        elif existing not in (None, "dir"):
            raise UsageError(f"cannot copy a directory onto the file {destination.path}")
        await files.upload_dir(local, target)
        return
    target = destination.path
    if existing == "dir" or destination.directory:
        target = posixpath.join(target, local.name)
    # Opened in a thread, as the SDK reads it: a file on a slow disk never stalls Trio.
    with await trio.to_thread.run_sync(local.open, "rb") as f:
        await files.write(target, f, mode=stat.S_IMODE(os.fstat(f.fileno()).st_mode))


async def _download(files: AsyncFiles, source: Remote, destination: str) -> None:
    entry = await files.stat(source.path)
    if destination == "-":
        if entry.type == "dir":
            raise UsageError(f"{source.path} is a directory: copy it to a local path, not -")
        await files.read_to(source.path, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    local = Path(destination)
    if entry.type == "dir":
        if local.is_dir() and not source.contents and source.path != "/":
            local = local / posixpath.basename(source.path)
        elif local.exists() and not local.is_dir():
            raise UsageError(f"cannot copy a directory onto the file {destination}")
        await files.download_dir(source.path, local)
        return
    if local.is_dir() or destination.endswith("/"):
        local.mkdir(parents=True, exist_ok=True)
        local = local / posixpath.basename(source.path)
    await _download_file(files, source.path, local, int(entry.mode, 8))


async def _download_file(files: AsyncFiles, path: str, local: Path, mode: int) -> None:
    """The file at ``path`` into ``local``, whole or not at all (a temporary file renamed)."""
    fd, temporary = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            await files.read_to(path, f)
            os.fchmod(f.fileno(), mode & 0o777)
        os.replace(temporary, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


async def cmd_files(client: AsyncClient, args: argparse.Namespace) -> int:
    handler = {
        "ls": _ls,
        "stat": _stat,
        "mkdir": _mkdir,
        "rm": _rm,
        "mv": _mv,
    }[args.files_command]
    await handler(client, args)
    return 0


async def _ls(client: AsyncClient, args: argparse.Namespace) -> None:
    where = remote_arg(args.path)
    listing = await client.files(where.sandbox_id).listing(where.path, args.depth)
    if args.json:
        print(msgspec.json.encode(listing).decode())
    else:
        rows = [["MODE", "SIZE", "MODIFIED", "NAME"]]
        for entry in listing.entries:
            name = _shown_name(entry, listing.path)
            rows.append([_mode_string(entry), str(entry.size), short_time(entry.mtime), name])
        table(rows)
    if listing.truncated:
        note(f"the listing stopped at {len(listing.entries)} entries (truncated)")


def _shown_name(entry: FileEntry, listed: str) -> str:
    name = posixpath.relpath(entry.path, listed) if entry.path != listed else entry.name
    if entry.type == "dir":
        return name + "/"
    if entry.type == "symlink" and entry.target is not None:
        return f"{name} -> {entry.target}"
    return name


def _mode_string(entry: FileEntry) -> str:
    """``drwxr-xr-x`` as ``ls -l`` shows it."""
    return stat.filemode(_TYPE_BITS[entry.type] | int(entry.mode, 8))


async def _stat(client: AsyncClient, args: argparse.Namespace) -> None:
    where = remote_arg(args.path)
    entry = await client.files(where.sandbox_id).stat(where.path)
    print(msgspec.json.format(msgspec.json.encode(entry)).decode())


async def _mkdir(client: AsyncClient, args: argparse.Namespace) -> None:
    for text in args.paths:
        where = remote_arg(text)
        await client.files(where.sandbox_id).mkdir(where.path, parents=args.parents)


async def _rm(client: AsyncClient, args: argparse.Namespace) -> None:
    for text in args.paths:
        where = remote_arg(text)
        await client.files(where.sandbox_id).remove(where.path, recursive=args.recursive)


async def _mv(client: AsyncClient, args: argparse.Namespace) -> None:
    source = remote_arg(args.source)
    destination = parse_remote(args.destination)
    if destination is None:
        destination = remote_arg(f"{source.sandbox_id}:{args.destination}")
    if destination.sandbox_id != source.sandbox_id:
        raise UsageError("mv moves within one sandbox; use cp between sandboxes")
    files = client.files(source.sandbox_id)
    await files.move(source.path, destination.path, overwrite=args.force)
