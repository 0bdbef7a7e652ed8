"""A real ``sandstorm serve`` in a subprocess, for what only a whole process shows: signals,
exit codes and its log output on stderr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[2]


@dataclass
class GatewayProcess:
    proc: trio.Process
    url: str = ""
    stderr: bytearray = field(default_factory=bytearray)
    exited: trio.Event = field(default_factory=trio.Event)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stderr line, each parsed as the JSON object it must be."""
        return [json.loads(line) for line in self.stderr.decode().splitlines() if line.strip()]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    async def wait(self) -> int:
        await self.exited.wait()
        code = await self.proc.wait()
        return code


@asynccontextmanager
async def gateway_process(
    data_dir: Path, tmp_path: Path, *extra_args: str, **config: Any
) -> AsyncIterator[GatewayProcess]:
    """Start ``sandstorm serve --port 0`` with ``config`` written to a TOML file; yields once it
    serves. On exit it is killed if still running, and always reaped."""
    config.setdefault("on_shutdown", "destroy")
    config.setdefault("warm_pool", [])  # no warm pool unless a test asks for one
    toml = tmp_path / "sandstorm.toml"
    toml.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
    argv = [sys.executable, "-m", "sandstorm", "serve", "--port", "0", "--data-dir",
            str(data_dir), "--config", str(toml), *extra_args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDSTORM_")}
    proc = await trio.lowlevel.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env
    )
    gp = GatewayProcess(proc)
    serving = trio.Event()

    async def read_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.receive_some():
            gp.stderr += chunk
            if not serving.is_set() and b"serving on" in gp.stderr:
                for line in gp.stderr.decode(errors="replace").splitlines():
                    if "serving on" in line:
                        message = json.loads(line)["message"]
                        gp.url = message.rsplit(" ", 1)[-1].rstrip(",")
                        serving.set()
        gp.exited.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stderr)
            with trio.fail_after(30):
                while not serving.is_set():
                    if gp.exited.is_set():
                        raise AssertionError(f"the gateway exited: {gp.stderr.decode()[-2000:]}")
                    with trio.move_on_after(0.1):
                        await serving.wait()
            yield gp
            if not gp.exited.is_set():
                gp.signal(signal.SIGTERM)
            with trio.move_on_after(60):
                await gp.exited.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def _toml(value: Any) -> str:
    """A TOML value: JSON's spelling, except tables (inline, ``{key = value}``)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)
