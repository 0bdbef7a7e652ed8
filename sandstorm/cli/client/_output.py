"""What the client says on its own behalf: exit codes, one-line notes on stderr, tables."""

from __future__ import annotations

import signal
import sys

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_TIMEOUT = 124
EXIT_SIGPIPE = 128 + signal.SIGPIPE


class UsageError(Exception):
    """A bad command line: printed as ``sandstorm: …`` with exit code 2."""


class Failure(Exception):
    """A failure on this side (a local file that cannot be read or written): printed as
    ``sandstorm: …`` with exit code 1."""


def note(message: str) -> None:
    """One line on stderr, apart from the program's own output by its ``sandstorm:`` prefix."""
    print(f"sandstorm: {message}", file=sys.stderr, flush=True)


def table(rows: list[list[str]]) -> None:
    """*rows* (the first one the header) on stdout in left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def short_time(stamp: str | None) -> str:
    """An RFC 3339 UTC stamp as ``YYYY-MM-DD HH:MM:SS`` for a table; ``-`` for none."""
    if not stamp:
        return "-"
    return stamp.replace("T", " ").split(".")[0].rstrip("Z")
