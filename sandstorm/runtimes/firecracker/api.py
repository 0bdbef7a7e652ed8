"""Firecracker's API over its Unix socket, and the host side of its vsock device.

Every endpoint and field used here is in Firecracker's published OpenAPI document
(``src/firecracker/swagger/firecracker.yaml``; a copy is vendored under
``tests/data/firecracker/`` and every request below is validated against it in
``tests/unit/runtimes/firecracker/test_api.py``). Firecracker answers 204 to a successful PUT/PATCH
and ``{"fault_message": "..."}`` with 400 (bad input) or 500 to a failed one; that message is
what :class:`FirecrackerApiError` carries, so a failed start names Firecracker's own reason.

Sockets live inside the jail, whose path can be longer than the 108 bytes ``sun_path`` holds;
they are reached through ``/proc/self/fd/<fd of the jail root>/<name>``, which is always short.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import msgspec
import trio

from sandstorm.runtimes.base import RuntimeStartError

#: Firecracker's replies are a few hundred bytes; a fault message is cut to this.
MAX_FAULT: Final = 2000
#: The vsock acknowledgement is ``OK <host-side port>\n`` (docs/vsock.md): a few bytes.
MAX_ACK: Final = 32
API_TIMEOUT_S: Final = 30.0

# Paths as the jailed Firecracker sees them (its root is the jail's chroot).
API_SOCKET: Final = "api.sock"
VSOCK_SOCKET: Final = "v.sock"
KERNEL: Final = "vmlinux"
INITRD: Final = "initrd.cpio"
ROOTFS: Final = "root.ext4"
SNAPSHOT_DIR: Final = "snapshot"
SNAPSHOT_STATE: Final = "vmstate"
SNAPSHOT_MEMORY: Final = "memory"
#: Guest context id: any value from 3 up (0-2 are reserved); each VM has its own device.
GUEST_CID: Final = 3


class FirecrackerApiError(RuntimeStartError):
    """Firecracker refused a request; the message carries its ``fault_message``."""


# ------------------------------------------------------------------ request bodies


def boot_source(boot_args: str) -> dict[str, Any]:
    """``PUT /boot-source`` (BootSource)."""
    return {"kernel_image_path": f"/{KERNEL}", "initrd_path": f"/{INITRD}", "boot_args": boot_args}


def root_drive() -> dict[str, Any]:
    """``PUT /drives/rootfs`` (Drive): the image read-only. Not ``is_root_device``: the guest's
    initramfs mounts it itself under a memory-backed overlay (Firecracker would otherwise add
    ``root=/dev/vda`` to the command line)."""
    return {
        "drive_id": "rootfs",
        "path_on_host": f"/{ROOTFS}",
        "is_root_device": False,
        "is_read_only": True,
    }


def machine_config(vcpus: int, mem_mib: int) -> dict[str, Any]:
    """``PUT /machine-config`` (MachineConfiguration). No SMT: with it the vCPU count must be
    1 or even, and a sandbox's vCPUs come from its cpu_limit."""
    return {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": False}


def vsock_device() -> dict[str, Any]:
    """``PUT /vsock`` (Vsock); ``vsock_id`` is deprecated, so left out."""
    return {"guest_cid": GUEST_CID, "uds_path": f"/{VSOCK_SOCKET}"}


def instance_start() -> dict[str, Any]:
    """``PUT /actions`` (InstanceActionInfo)."""
    return {"action_type": "InstanceStart"}


def vm_state(state: str) -> dict[str, Any]:
    """``PATCH /vm`` (Vm): ``Paused`` or ``Resumed``."""
    return {"state": state}


def snapshot_create() -> dict[str, Any]:
    """``PUT /snapshot/create`` (SnapshotCreateParams): a full snapshot inside the jail."""
    return {
        "snapshot_type": "Full",
        "snapshot_path": f"/{SNAPSHOT_DIR}/{SNAPSHOT_STATE}",
        "mem_file_path": f"/{SNAPSHOT_DIR}/{SNAPSHOT_MEMORY}",
    }


def snapshot_load() -> dict[str, Any]:
    """``PUT /snapshot/load`` (SnapshotLoadParams): ``mem_backend`` (``mem_file_path`` is
    deprecated), resumed at once. The vsock socket keeps the path it had (``/v.sock`` in the
    new jail), so no ``vsock_override`` is needed."""
    return {
        "snapshot_path": f"/{SNAPSHOT_DIR}/{SNAPSHOT_STATE}",
        "mem_backend": {
            "backend_type": "File",
            "backend_path": f"/{SNAPSHOT_DIR}/{SNAPSHOT_MEMORY}",
        },
        "resume_vm": True,
    }


# ------------------------------------------------------------------ the client


@contextlib.contextmanager
def short_path(directory: Path, name: str) -> Iterator[str]:
    """A path to ``directory/name`` that fits ``sun_path`` whatever the directory's depth,
    valid while the context is open."""
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def fault_message(status: int, body: bytes) -> str:
    """Firecracker's ``fault_message`` from an error body, or a description of the body."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("fault_message"), str):
        message: str = decoded["fault_message"]
    else:
        message = body.decode("utf-8", "replace").strip() or "(no body)"
    return f"HTTP {status}: {message[:MAX_FAULT]}"


class FirecrackerApi:
    """One HTTP/1.1 client on a Firecracker API socket. Use as ``async with``."""

    def __init__(self, root: Path, *, timeout: float = API_TIMEOUT_S) -> None:
        self.root = root
        self.timeout = timeout
        self._stack = contextlib.ExitStack()
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> FirecrackerApi:
        path = self._stack.enter_context(short_path(self.root, API_SOCKET))
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=path),
            base_url="http://localhost",
            timeout=self.timeout,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._client is not None:
                with trio.CancelScope(shield=True):
                    await self._client.aclose()
        finally:
            self._stack.close()

    async def request(self, method: str, path: str, body: dict[str, Any]) -> None:
        """Send one request; anything but 2xx raises :class:`FirecrackerApiError` with
        Firecracker's ``fault_message``."""
        assert self._client is not None, "use as async with"
        try:
            response = await self._client.request(
                method,
                path,
                content=msgspec.json.encode(body),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise FirecrackerApiError(f"firecracker {method} {path}: {exc!r}") from exc
        if not 200 <= response.status_code < 300:
            reason = fault_message(response.status_code, response.content)
            raise FirecrackerApiError(f"firecracker {method} {path} failed: {reason}")

    async def put(self, path: str, body: dict[str, Any]) -> None:
        await self.request("PUT", path, body)

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        await self.request("PATCH", path, body)


# ------------------------------------------------------------------ life-cycle sequences


async def configure_and_start(
    api: FirecrackerApi, *, boot_args: str, vcpus: int, mem_mib: int
) -> None:
    """Everything a fresh Firecracker needs before the guest runs, then InstanceStart."""
    await api.put("/boot-source", boot_source(boot_args))
    await api.put("/drives/rootfs", root_drive())
    await api.put("/machine-config", machine_config(vcpus, mem_mib))
    await api.put("/vsock", vsock_device())
    await api.put("/actions", instance_start())


async def pause_and_snapshot(api: FirecrackerApi) -> None:
    """Pause the guest, then write a full snapshot into the jail's snapshot directory."""
    await api.patch("/vm", vm_state("Paused"))
    await api.put("/snapshot/create", snapshot_create())


async def load_and_resume(api: FirecrackerApi) -> None:
    """On a fresh Firecracker: load the snapshot in its jail and resume the guest."""
    await api.put("/snapshot/load", snapshot_load())


# ------------------------------------------------------------------ vsock


async def vsock_connect(root: Path, port: int) -> trio.SocketStream:
    """One host-initiated vsock connection (docs/vsock.md): connect to the device's Unix
    socket, send ``CONNECT <port>\\n``, read ``OK <host-side port>\\n``. The bytes after the
    acknowledgement belong to the guest, so it is read one byte at a time (it is a few bytes,
    once per connection). Raises ``OSError`` when nobody listens in the guest yet (Firecracker
    then closes the connection) or on a malformed answer."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(root, VSOCK_SOCKET) as path:
            await sock.connect(path)
        await sock.send(f"CONNECT {port}\n".encode())
        ack = b""
        while not ack.endswith(b"\n"):
            byte = await sock.recv(1)
            if not byte:
                raise ConnectionResetError(f"vsock port {port}: closed before OK ({ack!r})")
            ack += byte
            if len(ack) > MAX_ACK:
                raise ConnectionError(f"vsock port {port}: answer too long ({ack!r})")
        words = ack.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            raise ConnectionError(f"vsock port {port}: unexpected answer {ack!r}")
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def vsock_connect_retrying(
    root: Path, port: int, exited: Callable[[], bool]
) -> trio.SocketStream:
    """:func:`vsock_connect` until the guest listens; gives up once ``exited()`` (the
    Firecracker process ended). The caller bounds the time (the boot timeout)."""
    delay = 0.005
    while True:
        try:
            return await vsock_connect(root, port)
        except OSError:
            if exited():
                raise
        await trio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def wait_for_socket(root: Path, name: str, exited: Callable[[], bool]) -> None:
    """Wait until Firecracker has created ``name`` in its jail (its API server is up)."""
    delay = 0.002
    while not await trio.Path(root / name).exists():
        if exited():
            raise RuntimeStartError("firecracker exited before its API socket appeared")
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)
