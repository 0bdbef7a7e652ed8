"""Detection of the VM-tier runtimes (Kata, Firecracker, QEMU) that have no driver registered.

Each function finds the binary on the configured search paths, reads its version and says exactly
why the runtime cannot be used; until a driver is registered a found binary is reported with that
as the reason, never as available. QEMU has its driver (``runtimes/qemu.py``), whose own
``detect`` also probes the accelerator (KVM only if a VM really boots under it, else TCG) and
needs the VM image; ``detect_qemu`` stays for a registry built without it. Kata has only its
driver (``runtimes/kata.py``): it is found through containerd, not by a binary of its own.
"""

from __future__ import annotations

import os
import shutil

import trio

from sandstorm.runtimes.base import Detection
from sandstorm.runtimes.kvm_probe import kvm_runs_guests

_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def first_executable(paths: list[str]) -> str | None:
    for path in paths:
        resolved = path if os.sep in path else shutil.which(path, path=_ENV["PATH"])
        if resolved and os.path.isfile(resolved) and os.access(resolved, os.X_OK):
            return os.path.abspath(resolved)
    return None


def not_found(paths: list[str]) -> str:
    return "not found at " + ", ".join(paths)


async def read_version(argv: list[str]) -> str | None:
    """First non-empty line a ``--version`` style command prints, or None if it fails."""
    try:
        with trio.move_on_after(5):
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False, env=_ENV
            )
            for line in (result.stdout + result.stderr).decode(errors="replace").splitlines():
                if line.strip():
                    return line.strip()
    except OSError:
        return None
    return None


NO_DRIVER = "binary found, but this gateway has no {name} driver registered"


async def detect_firecracker(paths: list[str], jailer_paths: list[str]) -> Detection:
    binary = first_executable(paths)
    if binary is None:
        return Detection(False, None, None, not_found(paths))
    version = await read_version([binary, "--version"])
    if first_executable(jailer_paths) is None:
        return Detection(False, binary, version, "jailer " + not_found(jailer_paths))
    if not os.path.exists("/dev/kvm"):
        return Detection(False, binary, version, "/dev/kvm does not exist")
    # /dev/kvm can exist and still not run guests: only running one says (kvm_probe.py).
    if (reason := await kvm_runs_guests()) is not None:
        return Detection(False, binary, version, reason)
    return Detection(False, binary, version, NO_DRIVER.format(name="firecracker"))


async def detect_qemu(paths: list[str]) -> Detection:
    binary = first_executable(paths)
    if binary is None:
        return Detection(False, None, None, not_found(paths) + " (PATH)")
    version = await read_version([binary, "--version"])
    return Detection(False, binary, version, NO_DRIVER.format(name="qemu"))
