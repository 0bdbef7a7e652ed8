"""The gateway under test: a real ``sandstorm serve`` subprocess on a data directory of its own,
which the soak can SIGKILL and start again on the same directory (the shims and their sandboxes
survive; the next gateway takes them over).

The data directory lives on a small tmpfs the soak mounts and unmounts itself, so that filling
it (the full-disk fault) touches nothing else on the host."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[2]
IMAGE_DATA_DIR = Path(os.environ.get("SANDSTORM_TEST_DATA_DIR", "/var/lib/sandstorm"))
#: How long a gateway may take from exec to "serving on" (a take-over of many sandboxes included).
START_TIMEOUT_S = 90.0


@dataclass
class DataDir:
    """``base/`` holds the config and the gateway logs; ``base/mnt`` is the tmpfs, and
    ``base/mnt/data`` the data directory (so a mount check under it sees only the gateway's)."""

    base: Path
    size_bytes: int

    @property
    def mount(self) -> Path:
        return self.base / "mnt"

    @property
    def data(self) -> Path:
        return self.mount / "data"

    async def create(self) -> None:
        self.mount.mkdir(parents=True)
        await _run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={self.size_bytes},mode=0755",
                "sandstorm-soak",
                str(self.mount),
            ]
        )
        self.data.mkdir()
        # The one built image is shared read-only; everything else is this soak's own.
        (self.data / "images").symlink_to(IMAGE_DATA_DIR / "images")

    async def remove(self) -> str | None:
        """Unmount and delete; what could not be removed, or None."""
        if os.path.ismount(self.mount):
            result = await trio.run_process(
                ["umount", str(self.mount)], capture_stdout=True, capture_stderr=True, check=False
            )
            if result.returncode != 0:
                return f"umount {self.mount}: {result.stderr.decode().strip()}"
        try:
            self.mount.rmdir()
        except OSError as exc:
            return f"rmdir {self.mount}: {exc}"
        return None


@dataclass
class GatewayConfig:
    data: Path
    cgroup_parent: str = field(default_factory=lambda: f"sandstorm-soak-{secrets.token_hex(4)}")
    warm_pool: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def toml(self) -> str:
        values: dict[str, Any] = {
            "data_dir": str(self.data),
            "cgroup_parent": self.cgroup_parent,
            "on_shutdown": "destroy",
            # A TCG boot takes seconds, more while the soak loads both cores.
            "boot_timeout_s": 90.0,
            **self.extra,
        }
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        if not self.warm_pool:
            lines.insert(0, "warm_pool = []")
        for pool in self.warm_pool:
            lines.append("[[warm_pool]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in pool.items()]
        return "\n".join(lines) + "\n"


class Gateway:
    """One gateway process at a time on one data directory; ``start`` again after a kill."""

    def __init__(self, config: GatewayConfig, base: Path) -> None:
        self.config = config
        self.base = base
        self.config_file = base / "sandstorm.toml"
        self.config_file.write_text(config.toml())
        self.proc: trio.Process | None = None
        self.url = ""
        self.starts = 0
        self.start_seconds: list[float] = []
        self.unexpected_exits: list[str] = []  # exits the soak did not cause
        self._killing = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def log_path(self, n: int) -> Path:
        return self.base / f"gateway-{n}.log"

    async def start(self) -> str:
        """Start a gateway and return its URL once it serves (its take-over done).

        Raises RuntimeError if it exits or does not serve within START_TIMEOUT_S."""
        self.starts += 1
        log = self.log_path(self.starts)
        argv = [
            sys.executable,
            "-m",
            "sandstorm",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(self.config.data),
            "--config",
            str(self.config_file),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDSTORM_")}
        began = time.monotonic()
        with log.open("wb") as stderr:
            # Its own session: a Ctrl-C of the soak reaches the soak, which then ends the
            # gateway deliberately.
            self.proc = await trio.lowlevel.open_process(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        with trio.move_on_after(START_TIMEOUT_S):
            while True:
                url = _serving_url(log)
                if url:
                    self.url = url
                    self.start_seconds.append(time.monotonic() - began)
                    return url
                if self.proc.returncode is not None or self.proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited: {log.read_text()[-3000:]}")
                await trio.sleep(0.05)
        raise RuntimeError(f"the gateway did not serve in {START_TIMEOUT_S} s: {log}")

    async def kill(self) -> None:
        """SIGKILL the gateway and reap it."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self._killing = True
        self.proc.kill()
        with trio.CancelScope(shield=True):
            await self.proc.wait()
        self._killing = False

    async def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (the gateway drains and, with on_shutdown = destroy, frees every sandbox);
        SIGKILL past ``grace``. Its exit status, or None if it had to be killed."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self._killing = True
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                return await self.proc.wait()
            await self.kill()
            return None
        return self.proc.returncode

    def check_alive(self) -> None:
        """Note an exit the soak did not cause (a crash, or the kernel's OOM killer)."""
        proc = self.proc
        if proc is None or self._killing or proc.poll() is None:
            return
        tail = self.log_path(self.starts).read_text(errors="replace")[-1500:]
        self.unexpected_exits.append(f"gateway exited with {proc.returncode}: {tail}")
        self.proc = None


def _serving_url(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    for line in text.splitlines():
        if "serving on" in line:
            try:
                message = str(json.loads(line)["message"])
            except (ValueError, KeyError):
                continue
            return message.rsplit(" ", 1)[-1].rstrip(",")
    return ""


def process_usage(pid: int) -> tuple[int, int]:
    """Open fds and RSS bytes of ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss_kb * 1024


async def _run(argv: list[str]) -> None:
    await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
