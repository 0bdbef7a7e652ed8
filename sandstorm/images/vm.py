"""The guest image of the VM tier: ``<data_dir>/images/<name>/vm/``, built from Debian packages.

``sandstorm image build --vm`` makes, next to the image's ``rootfs/`` and from it:

``vmlinuz``, ``vmlinux``
    The kernel of Debian's ``linux-image-amd64`` (fetched with ``apt-get download``, unpacked
    with ``dpkg-deb``), and the same kernel uncompressed (what Firecracker boots, found the way
    the kernel's ``scripts/extract-vmlinux`` does it: the compressed payload's magic, then
    decompression up to an ELF image).
``initramfs.cpio``
    A static init (``vm_init.c``, compiled with the host's gcc) and the kernel modules Debian
    does not build in (virtio-mmio, virtio-blk, virtio-console, ext4, overlay, the virtio
    vsock transport and their dependencies). The runtime appends a second, tiny cpio holding
    the agent and its command line, so a new agent never needs a new image.
``root.ext4``
    The rootfs as an ext4 filesystem image (``mkfs.ext4 -d``, no journal: it is only ever
    mounted read-only; the guest puts a memory-backed overlay over it).
``vm.json``
    A :class:`VmManifest`.

Built atomically (a temporary directory renamed into place) under the image builder's lock, once:
a second build with an up-to-date manifest does nothing.
"""

from __future__ import annotations

import logging
import lzma
import os
import re
import secrets
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec
import trio

from sandstorm.images.manifest import (
    DEFAULT_IMAGE,
    ImageBuildError,
    ImageError,
    image_dir,
    image_rootfs,
    images_root,
    load_manifest,
)
from sandstorm.images.staging import build_lock, remove_tree_or_warn, tree_size

VM_DIR: Final = "vm"
VM_MANIFEST: Final = "vm.json"
KERNEL_PACKAGE: Final = "linux-image-amd64"
#: What the guest init loads (their dependencies come first, read from each module's modinfo).
GUEST_MODULES: Final[tuple[str, ...]] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    # ext4 and jbd2 checksum their metadata with crc32c, which they find through the crypto API
    # (a request_module that finds no modprobe in the guest): load it up front.
    "crc32c_generic",
    "ext4",
    "overlay",
    # Firecracker's agent channel (vm_vsock_bridge.c). Under QEMU there is no vsock device, so
    # the transport registers its driver and binds nothing.
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
)
#: Loaded only by a guest that has shares to mount (mounts under QEMU: -fsdev local +
#: virtio-9p): under TCG every module costs boot time.
SHARE_MODULES: Final[tuple[str, ...]] = ("9p", "9pnet_virtio")
#: Bump when the layout or the init changes: a vm/ of another format then counts as not built.
VM_FORMAT: Final = 3
_INIT_SOURCE: Final = Path(__file__).with_name("vm_init.c")
_STEP_TIMEOUT_S: Final = 600.0
_log = logging.getLogger(__name__)
_ENV: Final = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


class VmManifest(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    created_at: str
    kernel_package: str
    kernel_version: str
    modules: tuple[str, ...]
    root_size_bytes: int


def vm_dir(data_dir: Path, name: str = DEFAULT_IMAGE) -> Path:
    return image_dir(data_dir, name) / VM_DIR


def load_vm_manifest(data_dir: Path, name: str = DEFAULT_IMAGE) -> VmManifest | None:
    """The VM image's manifest, or None when it is missing, unreadable or of an older format."""
    try:
        data = (vm_dir(data_dir, name) / VM_MANIFEST).read_bytes()
        manifest = msgspec.json.decode(data, type=VmManifest)
    except (OSError, msgspec.DecodeError):
        return None
    return manifest if manifest.format == VM_FORMAT else None


async def build_vm_image(
    data_dir: Path,
    name: str = DEFAULT_IMAGE,
    *,
    force: bool = False,
    log: Callable[[str], object] = _log.info,
) -> VmManifest:
    """Build ``images/<name>/vm`` from the image's rootfs (which must already be built)."""
    data_dir = Path(data_dir)
    if not force and (existing := load_vm_manifest(data_dir, name)) is not None:
        return existing
    if load_manifest(data_dir, name) is None:
        raise ImageError(f"image {name!r} is not built yet (sandstorm image build)")
    for tool, package in (
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("mkfs.ext4", "e2fsprogs"),
        ("gcc", "gcc libc6-dev"),
    ):
        if shutil.which(tool, path=_ENV["PATH"]) is None:
            raise ImageBuildError(f"{tool} not found (apt-get install {package})")
    async with build_lock(images_root(data_dir) / ".lock", log):
        if not force and (existing := load_vm_manifest(data_dir, name)) is not None:
            return existing
        parent = image_dir(data_dir, name)
        for leftover in await trio.Path(parent).glob(".vm-*"):
            await remove_tree_or_warn(Path(leftover), log)
        tmp = parent / f".vm-tmp-{secrets.token_hex(4)}"
        await trio.Path(tmp).mkdir(mode=0o755)
        try:
            manifest = await _build_into(tmp, image_rootfs(data_dir, name), log)
            final = parent / VM_DIR
            if await trio.Path(final).exists():
                old = parent / f".vm-old-{secrets.token_hex(4)}"
                await trio.Path(final).rename(old)
                await trio.Path(tmp).rename(final)
                await remove_tree_or_warn(old, log)
            else:
                await trio.Path(tmp).rename(final)
        except BaseException:
            with trio.CancelScope(shield=True):
                await remove_tree_or_warn(tmp, log)
            raise
    log(f"VM image ready at {parent / VM_DIR} (kernel {manifest.kernel_version})")
    return manifest


async def _build_into(tmp: Path, rootfs: Path, log: Callable[[str], object]) -> VmManifest:
    work = tmp / "work"
    await trio.Path(work).mkdir()
    kernel_pkg = await _kernel_package_name()
    log(f"VM image: downloading {kernel_pkg} (apt-get download)")
    await _run(["apt-get", "download", "-q", kernel_pkg], cwd=work)
    debs = [p for p in os.listdir(work) if p.endswith(".deb")]
    if len(debs) != 1:
        raise ImageBuildError(f"apt-get download {kernel_pkg} gave {debs}")
    unpacked = work / "pkg"
    await _run(["dpkg-deb", "-x", str(work / debs[0]), str(unpacked)])
    vmlinuz = next(iter(sorted((unpacked / "boot").glob("vmlinuz-*"))), None)
    if vmlinuz is None:
        raise ImageBuildError(f"{debs[0]} has no /boot/vmlinuz-*")
    kernel_version = vmlinuz.name.removeprefix("vmlinuz-")
    await trio.to_thread.run_sync(shutil.copyfile, vmlinuz, tmp / "vmlinuz")
    log("VM image: extracting vmlinux")
    await trio.to_thread.run_sync(_write_vmlinux, vmlinuz, tmp / "vmlinux")

    modules_root = unpacked / "lib/modules" / kernel_version
    order = await trio.to_thread.run_sync(resolve_modules, modules_root, GUEST_MODULES)
    share_order = [
        path
        for path in await trio.to_thread.run_sync(resolve_modules, modules_root, SHARE_MODULES)
        if path not in order
    ]
    initramfs = work / "initramfs"
    await trio.Path(initramfs / "modules").mkdir(parents=True)
    for path in order + share_order:
        await trio.to_thread.run_sync(shutil.copyfile, path, initramfs / "modules" / path.name)
    await trio.Path(initramfs / "modules/order").write_text("".join(p.name + "\n" for p in order))
    await trio.Path(initramfs / "modules/order.shares").write_text(
        "".join(p.name + "\n" for p in share_order)
    )
    log("VM image: compiling the guest init")
    await _run(
        ["gcc", "-static", "-Os", "-s", "-o", str(initramfs / "init"), str(_INIT_SOURCE)],
    )
    cpio = CpioWriter()
    for d in ("dev", "proc", "sys", "ro", "rw", "newroot", "agent", "modules"):
        cpio.add_dir(d)
    cpio.add_file("init", (initramfs / "init").read_bytes(), 0o755)
    for path in order + share_order:
        cpio.add_file(f"modules/{path.name}", path.read_bytes(), 0o644)
    for listing in ("order", "order.shares"):
        data = (initramfs / "modules" / listing).read_bytes()
        cpio.add_file(f"modules/{listing}", data, 0o644)
    await trio.Path(tmp / "initramfs.cpio").write_bytes(cpio.finish())

    size = await trio.to_thread.run_sync(tree_size, rootfs)
    # Room for metadata and inodes; the image is sparse, so the slack costs no disk.
    image_mib = size * 13 // 10 // (1 << 20) + 128
    log(f"VM image: mkfs.ext4 -d {rootfs} ({image_mib} MiB)")
    await _run(
        ["mkfs.ext4", "-q", "-F", "-L", "sandstorm-root", "-O", "^has_journal",
         "-d", str(rootfs), str(tmp / "root.ext4"), f"{image_mib}M"],
    )  # fmt: skip
    await trio.to_thread.run_sync(shutil.rmtree, work)
    manifest = VmManifest(
        format=VM_FORMAT,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        kernel_package=debs[0],
        kernel_version=kernel_version,
        modules=tuple(p.name for p in order + share_order),
        root_size_bytes=(tmp / "root.ext4").stat().st_size,
    )
    await trio.Path(tmp / VM_MANIFEST).write_bytes(msgspec.json.encode(manifest) + b"\n")
    return manifest


async def _kernel_package_name() -> str:
    """The versioned kernel package the ``linux-image-amd64`` metapackage depends on."""
    out = await _run(["apt-cache", "depends", KERNEL_PACKAGE])
    match = re.search(r"Depends: (linux-image-[0-9][^\s]*)", out)
    if match is None:
        raise ImageBuildError(
            f"apt-cache knows no {KERNEL_PACKAGE} (apt-get update, Debian sources)"
        )
    return match.group(1)


async def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        with trio.fail_after(_STEP_TIMEOUT_S):
            result = await trio.run_process(
                argv,
                cwd=cwd,
                env=_ENV,
                capture_stdout=True,
                capture_stderr=True,
                stdin=subprocess.DEVNULL,
                check=False,
            )
    except trio.TooSlowError:
        raise ImageBuildError(f"{argv[0]} did not finish in {_STEP_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise ImageBuildError(f"cannot run {argv[0]}: {exc}") from exc
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise ImageBuildError(f"{' '.join(argv[:3])} failed ({result.returncode}): {err}")
    return result.stdout.decode("utf-8", "replace")


# ----------------------------------------------------------------------------------- pieces


def resolve_modules(modules_root: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files for ``wanted`` and everything they depend on, dependencies first.

    Dependencies come from each module's own ``.modinfo`` (``depends=``), so no ``depmod`` run
    (and no kmod on the host) is needed.
    """
    by_name: dict[str, Path] = {}
    for path in modules_root.rglob("*.ko"):
        by_name[path.name.removesuffix(".ko").replace("-", "_")] = path
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:
            raise ImageBuildError(f"kernel module {name} not found under {modules_root}")
        for dep in module_depends(path.read_bytes()):
            visit(dep)
        ordered.append(path)

    for name in wanted:
        visit(name)
    return ordered


def module_depends(ko: bytes) -> list[str]:
    match = re.search(rb"\x00depends=([^\x00]*)\x00", ko)
    if match is None or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage: try each compressed stream's magic, keep the first one
    that decompresses to an ELF file (the method of the kernel's scripts/extract-vmlinux)."""
    candidates: list[tuple[bytes, Callable[[bytes], bytes]]] = [
        (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
        (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(31).decompress(b)),
    ]
    for magic, decompress in candidates:
        start = vmlinuz.find(magic)
        while start != -1:
            try:
                out = decompress(vmlinuz[start:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            start = vmlinuz.find(magic, start + 1)
    raise ImageBuildError("no xz or gzip compressed ELF kernel found in vmlinuz")


def _write_vmlinux(vmlinuz: Path, target: Path) -> None:
    target.write_bytes(extract_vmlinux(vmlinuz.read_bytes()))


class CpioWriter:
    """A ``newc`` cpio archive (what the kernel unpacks as an initramfs), in memory."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\x00"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        self._parts += [header, encoded, b"\x00" * (-(len(header) + len(encoded)) % 4)]
        self._parts += [data, b"\x00" * (-len(data) % 4)]

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode, b"")

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        out = b"".join(self._parts)
        return out + b"\x00" * (-len(out) % 512)
