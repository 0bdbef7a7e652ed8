"""The WebSocket client of the stream scenarios, in a process of its own.

``python -m bench.stream_client URL SANDBOX_ID throughput REQUEST_ID MEGABYTES TIMEOUT_S``
``python -m bench.stream_client URL SANDBOX_ID first-byte REQUEST_ID TIMEOUT_S``

Opens ``GET /v1/sandboxes/{id}/stream`` (live events only) with :class:`AsyncClient` (its key
from ``$SANDSTORM_API_KEY``, which the scenario passes on), starts one exec on the stream and
reads it to its exit event. Prints one JSON line: ``{"received": bytes, "elapsed_s": seconds}``
from the first stdout byte to the exit event (``throughput``), or ``{"samples_ms": [...]}``,
each line's time from its write inside the sandbox to its arrival here (``first-byte``). Any
other ending (an error frame, lost events, the socket closing, a wrong byte count, a non-zero
exit, no exit event within TIMEOUT_S) exits 1 with the reason on stderr.

A deployment's client is another process: run in the bench's own process and event loop, the
client's WebSocket parsing would take CPU from the gateway it measures.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sandstorm.api.types import ErrorEvent, ExitEvent, LaggedEvent, StdoutEvent
from sandstorm.sdk import AsyncClient

# ``since`` past any real seq: the stream carries only live events.
LIVE_ONLY = 10**15
# Prints a wall-clock timestamp (ns), one per line, every 10 ms; the reader takes the difference.
TICKS = 20
TICKER = (
    "import time, sys\n"
    f"for _ in range({TICKS}):\n"
    "    sys.stdout.write(str(time.time_ns()) + '\\n'); sys.stdout.flush(); time.sleep(0.01)\n"
)


def flood(megabytes: int) -> str:
    """A python program writing ``megabytes`` MiB of stdout as fast as it can."""
    return (
        "import sys\nb = b'x' * 65535 + b'\\n'\n"
        f"for _ in range({megabytes * 16}): sys.stdout.buffer.write(b)\n"
    )


class StreamFailed(Exception):
    """The exec's stream ended otherwise than with its exit event."""


def _check(event: Any, received: int) -> ExitEvent | None:
    """The exit event, or None to read on; raises on an ending that is not one."""
    if isinstance(event, ErrorEvent):
        raise StreamFailed(f"error frame {event.code}: {event.message}")
    if isinstance(event, LaggedEvent):
        raise StreamFailed(f"events {event.missed_from}..{event.missed_to} were dropped")
    if isinstance(event, ExitEvent):
        if event.result.exit_code != 0:
            raise StreamFailed(f"the exec exited {event.result.exit_code} after {received} bytes")
        return event
    return None


async def throughput(url: str, sandbox_id: str, request_id: str, megabytes: int) -> dict[str, Any]:
    """The flood's stdout bytes and the seconds from the first of them to the exit event."""
    async with AsyncClient(url) as client, client.stream(sandbox_id, LIVE_ONLY) as stream:
        await stream.exec(request_id, code=flood(megabytes), language="python", timeout=600_000)
        received, first = 0, 0.0
        async for event in stream:
            if isinstance(event, StdoutEvent) and event.data:
                first = first or time.perf_counter()
                received += len(event.data)  # ASCII: characters are bytes
            elif _check(event, received) is not None:
                break
        else:
            raise StreamFailed(f"the stream closed (code {stream.close_code}) before the exit")
        elapsed = time.perf_counter() - first
    if received != megabytes * 2**20:
        raise StreamFailed(f"received {received} bytes, expected {megabytes * 2**20}")
    return {"received": received, "elapsed_s": elapsed}


async def first_byte(url: str, sandbox_id: str, request_id: str) -> dict[str, Any]:
    """Each tick's milliseconds from its write inside the sandbox to its frame here."""
    samples: list[float] = []
    async with AsyncClient(url) as client, client.stream(sandbox_id, LIVE_ONLY) as stream:
        await stream.exec(request_id, code=TICKER, language="python")
        async for event in stream:
            now = time.time_ns()
            if isinstance(event, StdoutEvent) and event.data:
                samples.extend((now - int(line)) / 1e6 for line in event.data.splitlines())
            elif _check(event, len(samples)) is not None:
                break
        else:
            raise StreamFailed(f"the stream closed (code {stream.close_code}) before the exit")
    if len(samples) != TICKS:
        raise StreamFailed(f"received {len(samples)} ticks, expected {TICKS}")
    return {"samples_ms": samples}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream_client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("url")
    parser.add_argument("sandbox_id")
    modes = parser.add_subparsers(dest="mode", required=True)
    flooding = modes.add_parser("throughput")
    flooding.add_argument("request_id")
    flooding.add_argument("megabytes", type=int)
    flooding.add_argument("timeout_s", type=float)
    ticking = modes.add_parser("first-byte")
    ticking.add_argument("request_id")
    ticking.add_argument("timeout_s", type=float)
    return parser


def run_client(
    prog: str, work: Callable[[], Awaitable[dict[str, Any]]], timeout_s: float, missing: str
) -> int:
    """Run a bench client's ``work`` for at most ``timeout_s``: print its JSON line and return
    0, or print why it failed on stderr (``missing`` "within …" when it ran out of time) and
    return 1."""

    async def bounded() -> dict[str, Any]:
        try:
            with trio.fail_after(timeout_s):
                return await work()
        except trio.TooSlowError:
            raise TimeoutError(f"{missing} within {timeout_s} s") from None

    try:
        out = trio.run(bounded)
    except Exception as exc:
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on a bad command line
    if args.mode == "throughput":
        work = functools.partial(
            throughput, args.url, args.sandbox_id, args.request_id, args.megabytes
        )
    else:
        work = functools.partial(first_byte, args.url, args.sandbox_id, args.request_id)
    return run_client("bench.stream_client", work, args.timeout_s, "no exit event")


if __name__ == "__main__":
    sys.exit(main())
