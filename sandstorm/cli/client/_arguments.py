"""The client's command line: the subcommands, their options, and the option value parsers."""

from __future__ import annotations

import argparse
import math
import re

from sandstorm.api.types import ISOLATION_LEVELS, LANGUAGES, RUNTIME_NAMES

COMMANDS = (
    "run", "exec", "ls", "rm", "status", "snapshot", "snapshots", "resume", "cp", "files",
)  # fmt: skip

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    streaming.add_argument(
        "--background",
        action="store_true",
        help="processes the program leaves running (`server &`) run on after it ends, until "
        "the sandbox ends; by default they are killed with it",
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
    _add_file_commands(sub, common)


def _add_file_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    cp = sub.add_parser(
        "cp",
        parents=[common],
        help="copy files and directories in or out of a sandbox",
        description="Copy between this machine and a sandbox, as docker cp does: "
        "sandstorm cp ./data sbx_...:/workspace/data, sandstorm cp sbx_...:/workspace/out ./out. "
        "A directory copied to an existing directory lands inside it; SRC/. copies only its "
        "contents. '-' is stdin or stdout, for one file.",
    )
    cp.add_argument("source", metavar="SRC", help="local path, - (stdin) or sbx_...:/path")
    cp.add_argument("destination", metavar="DST", help="local path, - (stdout) or sbx_...:/path")

    files = sub.add_parser("files", parents=[common], help="list and change files in a sandbox")
    files_sub = files.add_subparsers(dest="files_command", required=True, metavar="COMMAND")
    ls = files_sub.add_parser("ls", parents=[common], help="list a directory")
    ls.add_argument("path", metavar="sbx_...:/PATH")
    ls.add_argument("--depth", type=int, default=1, help="levels to descend (1 to 16)")
    ls.add_argument("--json", action="store_true", help="print the gateway's JSON")
    stat = files_sub.add_parser("stat", parents=[common], help="show one entry (JSON)")
    stat.add_argument("path", metavar="sbx_...:/PATH")
    mkdir = files_sub.add_parser("mkdir", parents=[common], help="make directories")
    mkdir.add_argument("paths", metavar="sbx_...:/PATH", nargs="+")
    mkdir.add_argument(
        "--parents", "-p", action="store_true", help="make missing parents; an existing one is fine"
    )
    rm = files_sub.add_parser("rm", parents=[common], help="remove files and directories")
    rm.add_argument("paths", metavar="sbx_...:/PATH", nargs="+")
    rm.add_argument("--recursive", "-r", action="store_true", help="remove directories whole")
    mv = files_sub.add_parser("mv", parents=[common], help="rename or move within a sandbox")
    mv.add_argument("source", metavar="sbx_...:/SRC")
    mv.add_argument("destination", metavar="DST", help="the new path: /PATH or sbx_...:/PATH")
    mv.add_argument("--force", "-f", action="store_true", help="replace what is at DST")
