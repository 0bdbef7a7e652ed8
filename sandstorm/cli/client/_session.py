"""One streamed exec on the terminal: its output to stdout and stderr, this terminal's stdin and
signals to the program, and the program's outcome as an exit code."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed

from sandstorm.api.types import (
    ErrorEvent,
    ExecAcceptedEvent,
    ExecResult,
    ExitEvent,
    LaggedEvent,
    StderrEvent,
    StdoutEvent,
)
from sandstorm.cli.client._output import EXIT_FAILURE, EXIT_SIGPIPE, EXIT_TIMEOUT, note
from sandstorm.sdk import AsyncClient, SandstormError, Stream

# ``since`` past any real seq: the stream replays nothing and carries only live events.
LIVE_ONLY = 10**15
STDIN_CHUNK = 64 * 1024
# Stream ``error`` codes that are the gateway's trouble, not the caller's (exit 1, not 2).
SERVER_ERRORS = frozenset({"runtime_unavailable", "at_capacity", "internal"})
# Events held back while an ``exec`` frame waits for its ``exec_accepted`` reply.
MAX_PENDING_EVENTS = 100_000


@dataclass
class Session:
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
                        note(f"sandbox {created.id} ({created.runtime})")
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
        note(f"the stream closed (code {self.stream.close_code}) before {self.exec_id} ended")
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
            note(f"output lost: events {event.missed_from}..{event.missed_to} were dropped")
        elif isinstance(event, ErrorEvent) and event.code != "exec_not_running":
            # exec_not_running: stdin or a signal that raced the program's exit.
            note(f"{event.code}: {event.message}")
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
            note(f"timed out after {result.duration_ms / 1000:.1f} s (verdict timeout)")
            return EXIT_TIMEOUT
        if result.verdict == "oom":
            note("out of memory (verdict oom)")
        elif result.verdict == "output_limit":
            note("output limit reached (verdict output_limit)")
        elif result.verdict == "killed" and result.signal is not None:
            name = _signal_name(result.signal)
            if name not in self.forwarded:
                note(f"killed by {name} (verdict killed)")
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
