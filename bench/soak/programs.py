"""Programs whose output the soak knows in advance: each prints a deterministic sequence (tagged
with a token of its own, so no two requests' outputs look alike) and, for python, its checksum.
A result is compared byte for byte with what the program wrote."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Program:
    body: dict[str, Any]  # the request fields that say what to run
    stdout: str  # exactly what it writes
    verdict: str = "ok"


def sequence_text(token: str, lines: int) -> str:
    return "".join(f"{token} {i}\n" for i in range(lines))


def python_sequence(lines: int, *, pause_every: int = 0) -> Program:
    """Prints ``lines`` lines, flushing (and sleeping 10 ms) every ``pause_every`` lines so that
    output is streamed while the program runs, then the sha256 of what it printed."""
    token = secrets.token_hex(6)
    pause = (
        f"    if {pause_every} and i % {pause_every} == {pause_every} - 1:\n"
        "        sys.stdout.flush(); time.sleep(0.01)\n"
    )
    code = (
        "import hashlib, sys, time\n"
        "h = hashlib.sha256()\n"
        f"for i in range({lines}):\n"
        f"    line = '{token} %d\\n' % i\n"
        "    sys.stdout.write(line); h.update(line.encode())\n"
        f"{pause}"
        "sys.stdout.write(h.hexdigest() + '\\n')\n"
    )
    text = sequence_text(token, lines)
    expected = text + hashlib.sha256(text.encode()).hexdigest() + "\n"
    return Program({"language": "python", "code": code}, expected)


def bash_sequence(lines: int) -> Program:
    token = secrets.token_hex(6)
    code = f'for i in $(seq 0 {lines - 1}); do echo "{token} $i"; done'
    return Program({"language": "bash", "code": code}, sequence_text(token, lines))


def stdin_echo(size: int) -> Program:
    """Reads stdin whole and prints its length and sha256."""
    data = secrets.token_hex(size // 2 + 1)[:size]
    code = (
        "import hashlib, sys\n"
        "d = sys.stdin.buffer.read()\n"
        "print(len(d), hashlib.sha256(d).hexdigest())\n"
    )
    expected = f"{len(data)} {hashlib.sha256(data.encode()).hexdigest()}\n"
    return Program({"language": "python", "code": code, "stdin": data}, expected)


def echo(text: str) -> Program:
    return Program({"command": ["echo", text]}, text + "\n")


def sleeper(seconds: int) -> Program:
    return Program({"command": ["sleep", str(seconds)]}, "", verdict="timeout")


def memory_hog(mib: int) -> Program:
    """Writes ``mib`` MiB (every page touched) and holds it."""
    code = f"b = b'x' * ({mib} << 20)\nimport time; time.sleep(5)\n"
    return Program({"language": "python", "code": code}, "", verdict="oom")


FORK_BOMB = {"command": ["bash", "-c", ":(){ :|:& };:"]}


def state_file(token: str) -> dict[str, Any]:
    return {"command": ["bash", "-c", f"echo {token} > /workspace/state"]}


CAT_STATE = {"command": ["cat", "/workspace/state"]}
