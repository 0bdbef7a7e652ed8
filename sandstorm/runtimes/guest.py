"""What the microVM runtimes (QEMU, Firecracker) share about their guest: its RAM, and the
initramfs every sandbox boots, the image's own plus a part that carries the agent.

The image (kernel, initramfs, root filesystem) is built by ``sandstorm image build --vm``
(``sandstorm/images/vm.py``); the agent and its command line travel in a small cpio appended to
the image's initramfs, so the agent is the gateway's own, read-only at ``/.sandstorm`` as in
gVisor.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

from sandstorm.agent import agent_files
from sandstorm.api.types import MIB
from sandstorm.images.vm import CpioWriter
from sandstorm.runtimes.base import AGENT_ENV, SandboxSpec

#: Below this the guest kernel and its own page cache leave a program too little.
MIN_GUEST_RAM = 128 * MIB


def guest_ram(spec: SandboxSpec) -> int:
    """Guest RAM: the memory limit (at least MIN_GUEST_RAM), whole MiB. Inside the guest the
    kernel enforces the memory limit: it has no more RAM."""
    return max(MIN_GUEST_RAM, spec.memory_limit) // MIB * MIB


def add_agent(cpio: CpioWriter) -> None:
    """The agent's binary and the zygote, under ``agent/`` (mounted at /.sandstorm)."""
    for name, data, mode in agent_files():
        if data is None:
            cpio.add_dir(f"agent/{name}", mode)
        else:
            cpio.add_file(f"agent/{name}", data, mode)


def agent_initrd(
    base: Path,
    cache_dir: Path,
    command: Sequence[str],
    extra_files: Sequence[tuple[str, bytes, int]] = (),
    *,
    prune: bool,
) -> Path:
    """The image's initramfs ``base`` plus a part with the agent, ``extra_files`` (name, data,
    mode) and the ``launch`` file the guest init reads (``command``, a blank line, the agent's
    environment). Cached in ``cache_dir`` by content, so every sandbox of this gateway boots
    the same file; ``prune`` removes the cached files of other contents (a new agent's
    initramfs replaces the last one). Blocking."""
    extra = CpioWriter()
    add_agent(extra)
    for name, data, mode in extra_files:
        extra.add_file(name, data, mode)
    launch = "\n".join(command) + "\n\n" + "\n".join(AGENT_ENV) + "\n"
    extra.add_file("launch", launch.encode(), 0o644)
    tail = extra.finish()
    stat = base.stat()
    digest = hashlib.sha256(tail + f"{stat.st_ino}:{stat.st_mtime_ns}".encode()).hexdigest()
    path = cache_dir / f"initrd-{digest[:16]}.cpio"
    if path.exists():
        return path
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    with open(base, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.write(tail)
    tmp.rename(path)
    if prune:
        for old in cache_dir.glob("initrd-*.cpio"):
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()
    return path
