"""The client's subcommands, and the entry point that runs one and turns its failure into an
exit code."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
from trio_websocket import ConnectionClosed

from sandstorm.api.types import LANGUAGES, SandboxStatus
from sandstorm.cli.client._files import cmd_cp, cmd_files
from sandstorm.cli.client._output import (
    EXIT_FAILURE,
    EXIT_USAGE,
    Failure,
    UsageError,
    note,
    short_time,
    table,
)
from sandstorm.cli.client._session import Session
from sandstorm.sdk import AsyncClient, SandstormError, default_url

# .sh maps to bash (a superset of sh for almost every script); use --language sh for dash.
EXTENSIONS: dict[str, str] = {
    ".py": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".sh": "bash",
    ".bash": "bash",
}
SHEBANGS: tuple[tuple[str, str], ...] = (
    ("python", "python"),
    ("node", "javascript"),
    ("bash", "bash"),
    ("sh", "sh"),
)


def main(args: argparse.Namespace) -> int:
    """Run one client subcommand; returns the process exit code."""
    url: str = getattr(args, "url", None) or default_url()
    handler: Callable[[AsyncClient, argparse.Namespace], Any] = HANDLERS[args.command]
    try:
        return int(trio.run(_with_client, url, handler, args))
    except BaseException as exc:  # reported below, or raised again
        code = _report(_leaf(exc), url)
        if code is None:
            raise
        return code


def _leaf(exc: BaseException) -> BaseException:
    """The error inside the (possibly nested) exception groups that Trio's nurseries raise."""
    while isinstance(exc, BaseExceptionGroup):
        real = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (real or list(exc.exceptions))[0]
    return exc


def _report(exc: BaseException, url: str) -> int | None:
    """Print a one-line message for an expected failure; its exit code (None: unexpected)."""
    if isinstance(exc, UsageError):
        note(str(exc))
        return EXIT_USAGE
    if isinstance(exc, Failure):
        note(str(exc))
        return EXIT_FAILURE
    if isinstance(exc, SandstormError):
        note(exc.message)
        if exc.status == 401:
            note("the gateway needs an API key: set $SANDSTORM_API_KEY (sandstorm keys create)")
        return EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILURE
    if isinstance(exc, httpx.TransportError | OSError | ConnectionClosed):
        note(f"cannot reach the gateway at {url}: {exc}")
        return EXIT_FAILURE
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return None


async def _with_client(
    url: str, handler: Callable[[AsyncClient, argparse.Namespace], Any], args: argparse.Namespace
) -> int:
    async with AsyncClient(url) as client:
        return int(await handler(client, args))


def language_for(path: Path, text: str) -> str | None:
    """The language of a program file: its extension, else its ``#!`` line."""
    language = EXTENSIONS.get(path.suffix.lower())
    if language is not None:
        return language
    first = text.split("\n", 1)[0]
    if first.startswith("#!"):
        words = first[2:].split()
        # "#!/usr/bin/env python3" names the interpreter in its last word.
        interpreter = Path(words[-1] if words and words[0].endswith("env") else words[0]).name
        for prefix, name in SHEBANGS:
            if interpreter.startswith(prefix):
                return name
    return None


async def cmd_run(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.file == "-":
        source = sys.stdin.buffer.read()
        path = Path("-")
        forward_stdin = False  # stdin was the program itself
    else:
        path = Path(args.file)
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
        forward_stdin = not args.no_stdin
    try:
        code = source.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{args.file} is not UTF-8 text") from None
    language = args.language or language_for(path, code)
    if language is None:
        what = "the program on stdin" if args.file == "-" else args.file
        raise UsageError(
            f"cannot tell the language of {what}; pass --language ({', '.join(LANGUAGES)})"
        )
    keep = args.keep or args.keep_alive is not None
    # keep_alive 0: the gateway destroys the sandbox as soon as the run ends.
    keep_alive = (300 if args.keep_alive is None else args.keep_alive) if keep else 0
    environment = dict(args.env)
    body: dict[str, Any] = {
        "code": code,
        "language": language,
        "isolation_level": args.isolation,
        "runtime_preference": args.runtime,
        "memory_limit": args.memory,
        "cpu_limit": args.cpu,
        "timeout": args.timeout,
        "environment": environment,
        "wait": False,
        "stdin_open": forward_stdin,
        "keep_alive": keep_alive,
        "background": args.background,
    }
    session = Session(forward_stdin=forward_stdin)
    return await session.run(client, body, keep=keep)


async def cmd_exec(client: AsyncClient, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {
        "command": list(args.argv),
        "environment": dict(args.env),
        "cwd": args.cwd,
        "timeout": args.timeout,
        "background": args.background,
    }
    session = Session(forward_stdin=not args.no_stdin)
    return await session.exec(client, args.sandbox_id, fields)


async def cmd_ls(client: AsyncClient, args: argparse.Namespace) -> int:
    sandboxes: list[SandboxStatus] = await client.sandboxes()
    if not args.all:
        sandboxes = [s for s in sandboxes if s.state not in ("destroyed", "failed")]
    if args.json:
        print(msgspec.json.encode({"sandboxes": sandboxes}).decode())
        return 0
    rows = [["ID", "STATE", "RUNTIME", "CREATED", "EXPIRES"]]
    for s in sandboxes:
        rows.append([s.id, s.state, s.runtime, short_time(s.created_at), short_time(s.expires_at)])
    table(rows)
    return 0


async def cmd_rm(client: AsyncClient, args: argparse.Namespace) -> int:
    code = 0
    for sandbox_id in args.sandbox_ids:
        try:
            deleted = await client.delete(sandbox_id)
        except SandstormError as exc:
            note(exc.message)
            code = max(code, EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILURE)
            continue
        released = ", ".join(deleted.released) if deleted.released else "nothing (already gone)"
        print(f"{deleted.id} {deleted.state}; released {released}")
    return code


async def cmd_status(client: AsyncClient, args: argparse.Namespace) -> int:
    status = await client.status(args.sandbox_id)
    print(msgspec.json.format(msgspec.json.encode(status)).decode())
    return 0


async def cmd_snapshot(client: AsyncClient, args: argparse.Namespace) -> int:
    info = await client.snapshot(args.sandbox_id, leave_running=not args.stop)
    print(info.snapshot_id)
    return 0


async def cmd_snapshots(client: AsyncClient, args: argparse.Namespace) -> int:
    snapshots = await client.snapshots()
    if args.json:
        print(msgspec.json.encode({"snapshots": snapshots}).decode())
        return 0
    rows = [["SNAPSHOT", "SANDBOX", "RUNTIME", "SIZE", "CREATED"]]
    for s in snapshots:
        size = f"{s.size_bytes / (1024 * 1024):.1f}M"
        rows.append([s.snapshot_id, s.sandbox_id, s.runtime, size, short_time(s.created_at)])
    table(rows)
    return 0


async def cmd_resume(client: AsyncClient, args: argparse.Namespace) -> int:
    status = await client.resume(args.snapshot_id, keep_alive=args.keep_alive)
    print(status.id)
    return 0


HANDLERS: dict[str, Callable[[AsyncClient, argparse.Namespace], Any]] = {
    "run": cmd_run,
    "exec": cmd_exec,
    "ls": cmd_ls,
    "rm": cmd_rm,
    "status": cmd_status,
    "snapshot": cmd_snapshot,
    "snapshots": cmd_snapshots,
    "resume": cmd_resume,
    "cp": cmd_cp,
    "files": cmd_files,
}
