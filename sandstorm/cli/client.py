"""The client half of the ``sandstorm`` command: run code, exec, list, remove, snapshot, resume.

Every subcommand talks to a gateway through :mod:`sandstorm.sdk`; the gateway URL comes from
``--url`` or ``$SANDSTORM_URL`` (default http://localhost:3000), the API key from
``$SANDSTORM_API_KEY`` (never a flag: command lines are visible to every user of the host).

``run`` and ``exec`` are interactive: the program's output streams to the terminal as it is
written, the terminal's stdin is forwarded to the program (EOF closes the program's stdin), and
the command exits with the program's exit code (128 + N for a signal, 124 for a timeout, as GNU
``timeout`` does). Ctrl-C sends SIGINT to the program; a second Ctrl-C sends SIGKILL.

Exit codes of the CLI itself: 2 for a usage error (bad arguments, or a 4xx answer from the
gateway such as an unknown sandbox), 1 for any other failure (gateway unreachable, 5xx).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import math
import os
import re
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
from trio_websocket import ConnectionClosed

from sandstorm.api.types import (
    ISOLATION_LEVELS,
    LANGUAGES,
    RUNTIME_NAMES,
    ErrorEvent,
    ExecAcceptedEvent,
    ExecResult,
    ExitEvent,
    LaggedEvent,
    SandboxStatus,
    StderrEvent,
    StdoutEvent,
)
from sandstorm.sdk import AsyncClient, SandstormError, Stream, default_url

COMMANDS = ("run", "exec", "ls", "rm", "status", "snapshot", "snapshots", "resume")

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
EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_TIMEOUT = 124
EXIT_SIGPIPE = 128 + signal.SIGPIPE
# ``since`` past any real seq: the stream replays nothing and carries only live events.
LIVE_ONLY = 10**15
STDIN_CHUNK = 64 * 1024
# Stream ``error`` codes that are the gateway's trouble, not the caller's (exit 1, not 2).
SERVER_ERRORS = frozenset({"runtime_unavailable", "at_capacity", "internal"})
# Events held back while an ``exec`` frame waits for its ``exec_accepted`` reply.
MAX_PENDING_EVENTS = 100_000
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UsageError(Exception):
    """A bad command line: printed as ``sandstorm: …`` with exit code 2."""


# --------------------------------------------------------------------------- argument parsing


def parse_size(text: str) -> int:
    """``268435456``, ``256M``, ``256MiB``, ``1G``, ``1.5g`` → bytes (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G, 536870912)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def parse_duration_ms(text: str) -> int:
    """``30`` (seconds), ``1.5s``, ``500ms``, ``2m``, ``1h`` → milliseconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30, 30s, 500ms, 2m)")
    factor = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[(match.group(2) or "s").lower()]
    return max(1, math.ceil(float(match.group(1)) * factor))


def parse_env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _ENV_NAME.match(name):
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return name, value


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add the client subcommands to the ``sandstorm`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: ``sandstorm --url X ls`` and ``sandstorm ls --url X`` both work.
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="gateway URL (default $SANDSTORM_URL or http://localhost:3000)",
    )

    streaming = argparse.ArgumentParser(add_help=False)
    streaming.add_argument(
        "--env",
        "-e",
        action="append",
        type=parse_env,
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the program (repeatable)",
    )
    streaming.add_argument(
        "--timeout",
        type=parse_duration_ms,
        default=None,
        help="time limit: seconds, or with a unit (500ms, 30s, 5m); default: the gateway's",
    )
    streaming.add_argument(
        "--no-stdin",
        "-n",
        action="store_true",
        help="do not forward this terminal's stdin (the program reads EOF)",
    )

    run = sub.add_parser(
        "run",
        parents=[common, streaming],
        help="run a program in a new sandbox, streaming its output",
        description="Run FILE (or the program read from stdin with '-') in a new sandbox. "
        "Output streams live; stdin is forwarded (not with '-', where stdin is the program). "
        "Exits with the program's exit code (128+N for signal N, 124 for a timeout).",
    )
    run.add_argument("file", metavar="FILE|-", help="program file, or - to read it from stdin")
    run.add_argument(
        "--language",
        "-l",
        choices=LANGUAGES,
        help="language (default: from the extension .py .js .mjs .cjs .sh .bash or #! line)",
    )
    run.add_argument("--isolation", choices=ISOLATION_LEVELS, default=None)
    run.add_argument("--runtime", choices=RUNTIME_NAMES, default=None, help="runtime preference")
    run.add_argument(
        "--memory", type=parse_size, default=None, help="memory limit: 256M, 1G or bytes"
    )
    run.add_argument("--cpu", type=float, default=None, help="CPU limit in cores (e.g. 0.5)")
    run.add_argument(
        "--keep",
        action="store_true",
        help="keep the sandbox after the run (300 s idle; see --keep-alive); id goes to stderr",
    )
    run.add_argument(
        "--keep-alive",
        type=int,
        default=None,
        metavar="SECONDS",
        help="keep the sandbox SECONDS idle after the run (implies --keep)",
    )

    exec_ = sub.add_parser(
        "exec",
        parents=[common, streaming],
        help="run a command in an existing sandbox, streaming its output",
        description="Run CMD in sandbox ID: sandstorm exec sbx_... -- sh -c 'echo $X'",
    )
    exec_.add_argument("sandbox_id", metavar="ID")
    exec_.add_argument("argv", metavar="CMD", nargs="+", help="the command (after --)")
    exec_.add_argument("--cwd", default=None, help="working directory (absolute)")

    ls = sub.add_parser("ls", parents=[common], help="list sandboxes")
    ls.add_argument("--all", "-a", action="store_true", help="include destroyed and failed ones")
    ls.add_argument("--json", action="store_true", help="print the gateway's JSON")

    rm = sub.add_parser("rm", parents=[common], help="destroy sandboxes")
    rm.add_argument("sandbox_ids", metavar="ID", nargs="+")

    status = sub.add_parser("status", parents=[common], help="show one sandbox (JSON)")
    status.add_argument("sandbox_id", metavar="ID")

    snapshot = sub.add_parser("snapshot", parents=[common], help="snapshot a sandbox")
    snapshot.add_argument("sandbox_id", metavar="ID")
    snapshot.add_argument(
        "--stop", action="store_true", help="destroy the sandbox once the snapshot is written"
    )

    snapshots = sub.add_parser("snapshots", parents=[common], help="list snapshots")
    snapshots.add_argument("--json", action="store_true", help="print the gateway's JSON")

    resume = sub.add_parser("resume", parents=[common], help="start a sandbox from a snapshot")
    resume.add_argument("snapshot_id", metavar="SNAPSHOT")
    resume.add_argument("--keep-alive", type=int, default=300, metavar="SECONDS")


# --------------------------------------------------------------------------- entry point


def main(args: argparse.Namespace) -> int:
    """Run one client subcommand; returns the process exit code."""
    url: str = getattr(args, "url", None) or default_url()
    handler: Callable[[AsyncClient, argparse.Namespace], Any] = _HANDLERS[args.command]
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
        _note(str(exc))
        return EXIT_USAGE
    if isinstance(exc, SandstormError):
        _note(exc.message)
        if exc.status == 401:
            _note("the gateway needs an API key: set $SANDSTORM_API_KEY (sandstorm keys create)")
        return EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILURE
    if isinstance(exc, httpx.TransportError | OSError | ConnectionClosed):
        _note(f"cannot reach the gateway at {url}: {exc}")
        return EXIT_FAILURE
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return None


async def _with_client(
    url: str, handler: Callable[[AsyncClient, argparse.Namespace], Any], args: argparse.Namespace
) -> int:
    async with AsyncClient(url) as client:
        return int(await handler(client, args))


def _note(message: str) -> None:
    print(f"sandstorm: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- run / exec


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
    }
    session = _Session(forward_stdin=forward_stdin)
    return await session.run(client, body, keep=keep)


async def cmd_exec(client: AsyncClient, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {
        "command": list(args.argv),
        "environment": dict(args.env),
        "cwd": args.cwd,
        "timeout": args.timeout,
    }
    session = _Session(forward_stdin=not args.no_stdin)
    return await session.exec(client, args.sandbox_id, fields)


@dataclass
class _Session:
    """One streamed exec: output to the terminal, stdin and Ctrl-C to the program."""

    forward_stdin: bool
    stream: Stream | None = None
    exec_id: str | None = None
    sandbox_id: str | None = None
    interrupts: int = 0
    forwarded: set[str] = field(default_factory=set)
    stdout_broken: bool = False

    async def run(self, client: AsyncClient, body: dict[str, Any], *, keep: bool) -> int:
        code = 128 + signal.SIGINT  # unless the program gets to exit
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._signals, sigs, nursery.cancel_scope)
                    created = await client.run(**body)
                    self.sandbox_id, self.exec_id = created.id, created.exec_id
                    if keep:
                        _note(f"sandbox {created.id} ({created.runtime})")
                    # since=0 replays the log from seq 1: nothing is lost before we connect.
                    async with client.stream(created.id, 0) as stream:
                        self.stream = stream
                        code = await self._follow(client, nursery, [])
                    nursery.cancel_scope.cancel()
            finally:
                if self.stream is None and self.sandbox_id is not None and not keep:
                    # Interrupted between the create and the stream: do not leave it running.
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(10),
                        contextlib.suppress(SandstormError, httpx.TransportError, OSError),
                    ):
                        await client.delete(self.sandbox_id)
        return code

    async def exec(self, client: AsyncClient, sandbox_id: str, fields: dict[str, Any]) -> int:
        self.sandbox_id = sandbox_id
        code = 128 + signal.SIGINT  # unless the program gets to exit
        state = (await client.status(sandbox_id)).state
        if state in ("destroyed", "failed", "stopping"):
            # Its stream would just close: say why, as POST exec's 409 does.
            message = f"sandbox {sandbox_id} is {state}"
            raise SandstormError(409, "sandbox_not_running", message, {"state": state})
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, sigs, nursery.cancel_scope)
                # Live events only; the exec frame's output can arrive before its exec_accepted
                # reply, so events are held back until the exec id is known.
                async with client.stream(sandbox_id, LIVE_ONLY) as stream:
                    self.stream = stream
                    request_id = uuid.uuid4().hex
                    await stream.exec(request_id, **fields)
                    pending: list[Any] = []
                    async for event in stream:
                        if isinstance(event, ExecAcceptedEvent) and event.id == request_id:
                            self.exec_id = event.exec_id
                            break
                        if isinstance(event, ErrorEvent):
                            status = 503 if event.code in SERVER_ERRORS else 400
                            raise SandstormError(status, event.code, event.message, {})
                        if isinstance(event, StdoutEvent | StderrEvent | ExitEvent):
                            if len(pending) >= MAX_PENDING_EVENTS:
                                raise SandstormError(
                                    502, "overflow", "no exec_accepted reply in time", {}
                                )
                            pending.append(event)
                    else:
                        raise SandstormError(
                            502, "stream_closed", f"the stream of {sandbox_id} closed", {}
                        )
                    code = await self._follow(client, nursery, pending)
                nursery.cancel_scope.cancel()
        return code

    async def _follow(self, client: AsyncClient, nursery: trio.Nursery, pending: list[Any]) -> int:
        """Write the exec's output until its exit event; returns the exit code."""
        assert self.stream is not None and self.exec_id is not None
        if self.forward_stdin:
            nursery.start_soon(self._forward_stdin, self.stream, self.exec_id)
        for event in pending:
            result = self._handle(event)
            if result is not None:
                return self._finish(result)
        async for event in self.stream:
            result = self._handle(event)
            if result is not None:
                return self._finish(result)
            if self.stdout_broken and "SIGKILL" not in self.forwarded:
                # The reader went away (``sandstorm run x.py | head``): stop the program.
                self.forwarded.add("SIGKILL")
                with contextlib.suppress(ConnectionClosed, trio.ClosedResourceError):
                    await self.stream.signal(self.exec_id, "SIGKILL")
        # The socket closed without our exit event (sandbox destroyed, or we lagged too far).
        assert self.sandbox_id is not None
        summary = await client.exec_result(self.sandbox_id, self.exec_id)
        if summary.result is not None:
            return self._finish(summary.result)
        _note(f"the stream closed (code {self.stream.close_code}) before {self.exec_id} ended")
        return EXIT_FAILURE

    def _handle(self, event: Any) -> ExecResult | None:
        if isinstance(event, StdoutEvent | StderrEvent):
            if event.exec_id == self.exec_id:
                data = (
                    base64.b64decode(event.data_b64)
                    if event.data_b64 is not None
                    else (event.data or "").encode()
                )
                self._write(sys.stdout if isinstance(event, StdoutEvent) else sys.stderr, data)
        elif isinstance(event, ExitEvent):
            if event.exec_id == self.exec_id:
                return event.result
        elif isinstance(event, LaggedEvent):
            _note(f"output lost: events {event.missed_from}..{event.missed_to} were dropped")
        elif isinstance(event, ErrorEvent) and event.code != "exec_not_running":
            # exec_not_running: stdin or a signal that raced the program's exit.
            _note(f"{event.code}: {event.message}")
        return None

    def _write(self, out: Any, data: bytes) -> None:
        if out is sys.stdout and self.stdout_broken:
            return
        try:
            out.buffer.write(data)
            out.buffer.flush()
        except BrokenPipeError:
            if out is sys.stdout:
                self.stdout_broken = True
                with contextlib.suppress(OSError):  # no error at interpreter exit's flush
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def _finish(self, result: ExecResult) -> int:
        if self.stdout_broken:
            return EXIT_SIGPIPE
        if result.verdict == "timeout":
            _note(f"timed out after {result.duration_ms / 1000:.1f} s (verdict timeout)")
            return EXIT_TIMEOUT
        if result.verdict == "oom":
            _note("out of memory (verdict oom)")
        elif result.verdict == "output_limit":
            _note("output limit reached (verdict output_limit)")
        elif result.verdict == "killed" and result.signal is not None:
            name = _signal_name(result.signal)
            if name not in self.forwarded:
                _note(f"killed by {name} (verdict killed)")
        if result.exit_code is not None:
            return result.exit_code & 0xFF
        if result.signal is not None:
            return 128 + result.signal
        return EXIT_FAILURE

    async def _forward_stdin(self, stream: Stream, exec_id: str) -> None:
        with contextlib.suppress(ConnectionClosed, trio.ClosedResourceError):
            while True:
                # A thread, not FdStream: O_NONBLOCK on a terminal's fd 0 would also make the
                # shared stdout/stderr non-blocking. The thread is abandoned at exit.
                data = await trio.to_thread.run_sync(_read_stdin, abandon_on_cancel=True)
                if not data:
                    break
                await stream.send_stdin(exec_id, data)
            await stream.close_stdin(exec_id)

    async def _signals(self, sigs: Any, cancel_scope: trio.CancelScope) -> None:
        async for signum in sigs:
            if self.stream is None or self.exec_id is None:
                cancel_scope.cancel()  # not started yet: give up
                return
            # The first Ctrl-C (or SIGTERM, SIGHUP) is passed on; a second one kills.
            self.interrupts += 1
            name = signal.Signals(signum).name if self.interrupts == 1 else "SIGKILL"
            self.forwarded.add(name)
            with contextlib.suppress(ConnectionClosed, trio.ClosedResourceError):
                await self.stream.signal(self.exec_id, name)


def _read_stdin() -> bytes:
    try:
        return os.read(0, STDIN_CHUNK)
    except OSError:
        return b""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --------------------------------------------------------------------------- the rest


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _short_time(stamp: str | None) -> str:
    if not stamp:
        return "-"
    return stamp.replace("T", " ").split(".")[0].rstrip("Z")


async def cmd_ls(client: AsyncClient, args: argparse.Namespace) -> int:
    sandboxes: list[SandboxStatus] = await client.sandboxes()
    if not args.all:
        sandboxes = [s for s in sandboxes if s.state not in ("destroyed", "failed")]
    if args.json:
        print(msgspec.json.encode({"sandboxes": sandboxes}).decode())
        return 0
    rows = [["ID", "STATE", "RUNTIME", "CREATED", "EXPIRES"]]
    for s in sandboxes:
        rows.append(
            [s.id, s.state, s.runtime, _short_time(s.created_at), _short_time(s.expires_at)]
        )
    _table(rows)
    return 0


async def cmd_rm(client: AsyncClient, args: argparse.Namespace) -> int:
    code = 0
    for sandbox_id in args.sandbox_ids:
        try:
            deleted = await client.delete(sandbox_id)
        except SandstormError as exc:
            _note(exc.message)
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
        rows.append([s.snapshot_id, s.sandbox_id, s.runtime, size, _short_time(s.created_at)])
    _table(rows)
    return 0


async def cmd_resume(client: AsyncClient, args: argparse.Namespace) -> int:
    status = await client.resume(args.snapshot_id, keep_alive=args.keep_alive)
    print(status.id)
    return 0


_HANDLERS: dict[str, Callable[[AsyncClient, argparse.Namespace], Any]] = {
    "run": cmd_run,
    "exec": cmd_exec,
    "ls": cmd_ls,
    "rm": cmd_rm,
    "status": cmd_status,
    "snapshot": cmd_snapshot,
    "snapshots": cmd_snapshots,
    "resume": cmd_resume,
}
