"""The qemu runtime driven directly (real QEMU, TCG here), and the VM image's pure pieces."""

from __future__ import annotations

import lzma
import os
import secrets
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sandstorm.agent import Frame, FrameKind
from sandstorm.api.types import MIB
from sandstorm.ids import new_id
from sandstorm.images.vm import (
    CpioWriter,
    build_vm_image,
    extract_vmlinux,
    load_vm_manifest,
    module_depends,
)
from sandstorm.runtimes.base import SandboxSpec
from sandstorm.runtimes.cgroups import V1_ALL, SandboxCgroups
from sandstorm.runtimes.guest import MIN_GUEST_RAM, guest_ram
from sandstorm.runtimes.qemu.runtime import QEMU_OVERHEAD, QemuInstance, QemuRuntime
from tests.conftest import IMAGE_DATA_DIR, require, vm_image_missing
from tests.hoststate import qemu_state

T = 180


def _spec(sandbox_id: str, memory: int = 256 * MIB) -> SandboxSpec:
    return SandboxSpec(sandbox_id, Path("/nonexistent"), 1.0, memory, 64)


# ------------------------------------------------------------------------- pure pieces


def test_guest_ram_and_host_limits() -> None:
    assert guest_ram(_spec("sbx_x", 32 * MIB)) == MIN_GUEST_RAM
    assert guest_ram(_spec("sbx_x", 512 * MIB + 5)) == 512 * MIB
    limits = QemuRuntime.host_limits(_spec("sbx_x", 512 * MIB))
    assert limits.memory_bytes == 512 * MIB + QEMU_OVERHEAD and limits.cpu == 1.0


def test_module_depends_reads_modinfo() -> None:
    ko = b"\x7fELF junk\x00license=GPL\x00depends=jbd2,mbcache,crc16\x00name=ext4\x00"
    assert module_depends(ko) == ["jbd2", "mbcache", "crc16"]
    assert module_depends(b"\x00depends=\x00name=crc16\x00") == []


def test_extract_vmlinux_finds_the_compressed_elf() -> None:
    elf = b"\x7fELF" + os.urandom(4096)
    # A decoy magic before the real stream, as in a real bzImage's setup code.
    bz = b"MZ setup \xfd7zXZ\x00 not a stream " + lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert extract_vmlinux(bz) == elf


def test_cpio_is_newc_and_aligned() -> None:
    cpio = CpioWriter()
    cpio.add_dir("agent")
    cpio.add_file("agent/a.py", b"print(1)\n")
    data = cpio.finish()
    assert data.startswith(b"070701") and len(data) % 512 == 0
    assert b"agent/a.py\x00" in data and b"TRAILER!!!\x00" in data


# ------------------------------------------------------------------------- real VMs


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[QemuRuntime]:
    require("the qemu runtime needs root" if os.geteuid() != 0 else vm_image_missing())
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(IMAGE_DATA_DIR / "images")
    cgroups = SandboxCgroups(f"sandstorm-test-{secrets.token_hex(4)}")
    yield QemuRuntime(["qemu-system-x86_64"], data, "default", cgroups)
    for sid in cgroups.list_ids():
        cgroups.remove(sid)
    for d in cgroups._dirs("", V1_ALL):
        if d.is_dir():
            os.rmdir(d)


async def test_vm_image_build_is_idempotent(runtime: QemuRuntime) -> None:
    image = IMAGE_DATA_DIR / "images/default/vm"
    mtimes = {p.name: p.stat().st_mtime_ns for p in image.iterdir()}
    with trio.fail_after(30):
        manifest = await build_vm_image(IMAGE_DATA_DIR)
    assert manifest == load_vm_manifest(IMAGE_DATA_DIR)
    assert {p.name: p.stat().st_mtime_ns for p in image.iterdir()} == mtimes
    assert set(mtimes) >= {"vmlinuz", "vmlinux", "initramfs.cpio", "root.ext4", "vm.json"}
    assert (image / "vmlinux").read_bytes()[:4] == b"\x7fELF"


async def _until(instance: QemuInstance, kind: FrameKind) -> list[Frame]:
    frames = []
    while True:
        frame = await instance.channel.receive_frame()
        assert frame is not None, f"agent channel closed; console: {instance.diagnostics()}"
        frames.append(frame)
        if frame.kind == kind:
            return frames


async def _run(instance: QemuInstance, channel: int, script: str) -> bytes:
    await instance.channel.send_exec(channel, ["/bin/sh", "-c", script], {}, "/workspace")
    frames = await _until(instance, FrameKind.EXIT)
    return b"".join(f.payload for f in frames if f.kind == FrameKind.STDOUT)


async def test_boot_exec_checkpoint_restore_destroy(runtime: QemuRuntime, tmp_path: Path) -> None:
    with trio.fail_after(T):
        detection = await runtime.detect()
        assert detection.available, detection
        assert detection.details["accel"] in ("kvm", "tcg")
        sid = new_id("sbx")
        spec = _spec(sid)
        instance = await runtime.start(spec)
        hello = await instance.channel.wait_hello()
        assert hello.protocol == 1
        # QEMU itself dropped root (-runas nobody) once its files were open.
        status = Path(f"/proc/{instance.runtime_pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4, uid_line
        out = await _run(instance, 1, "id -u; grep NoNewPrivs /proc/self/status; echo x > /tmp/f")
        assert out.split() == [b"1000", b"NoNewPrivs:", b"1"]
        # The agent is read-only in the guest, as in gVisor.
        assert b"Read-only" in await _run(instance, 2, "touch /.sandstorm/x 2>&1; true")
        assert runtime.usage(sid).memory_bytes > 0

        image = tmp_path / "snapshot"
        await runtime.checkpoint(spec, image)
        assert await instance.channel.receive_frame() is None  # QEMU quit after the migration
        assert await instance.wait() == 0
        assert (image / "memory.qemu").stat().st_size > 0

        restored = await runtime.restore(spec, image)
        await restored.channel.send_ping(b"back")
        pong = (await _until(restored, FrameKind.PONG))[-1]
        assert pong.payload == b"back"
        assert await _run(restored, 3, "cat /tmp/f") == b"x\n"

        # A gateway that lost track of the VM: the reaper finds it and destroy frees it all.
        assert await runtime.list_orphans(set) == [sid]
        assert await runtime.list_orphans(lambda: {sid}) == []
        released = await runtime.destroy(sid)
        assert any(r.startswith("qemu process") for r in released), released
        await restored.wait()
        assert await runtime.destroy(sid) == []  # idempotent
        assert not qemu_state(runtime.data_dir)
        assert sid not in runtime.cgroups.list_ids()


async def test_vm_survives_a_dropped_gateway(runtime: QemuRuntime) -> None:
    """The shim holds QEMU's stdio: a gateway that lets go mid-exec (as a SIGKILLed one does)
    leaves the VM running, and a fresh runtime object resumes the stream at its offset."""
    with trio.fail_after(T):
        assert (await runtime.detect()).available
        sid = new_id("sbx")
        instance = await runtime.start(_spec(sid))
        shim = instance.process
        assert shim is not None
        await instance.channel.wait_hello()
        script = "for i in $(seq 1 30); do echo $i; sleep 0.05; done"
        await instance.channel.send_exec(1, ["/bin/sh", "-c", script], {}, "/workspace")
        seen = b""
        while b"5\n" not in seen:
            frame = await instance.channel.receive_frame()
            assert frame is not None, instance.diagnostics()
            if frame.kind == FrameKind.STDOUT:
                seen += frame.payload
        offset = instance.channel.offset
        await instance.detach()
        del instance
        await trio.sleep(0.5)  # the guest goes on printing into the shim's journal

        fresh = QemuRuntime(["qemu-system-x86_64"], runtime.data_dir, "default", runtime.cgroups)
        assert await fresh.surviving() == [sid]
        again = await fresh.reattach(sid, offset)
        assert again.handshake.end_offset > offset  # written while nobody was attached
        frames = await _until(again, FrameKind.EXIT)
        rest = b"".join(f.payload for f in frames if f.kind == FrameKind.STDOUT)
        assert (seen + rest).split() == [str(i).encode() for i in range(1, 31)]
        assert await _run(again, 2, "echo still here") == b"still here\n"

        assert await fresh.list_orphans(lambda: {sid}) == []
        released = await fresh.destroy(sid)
        assert any(r.startswith("qemu process") for r in released), released
        assert any(r.startswith("shim process") for r in released), released
        await again.wait()
        await shim.wait()  # the first "gateway's" child
        assert await fresh.surviving() == []
        assert not qemu_state(runtime.data_dir)


async def test_boot_to_first_output_median(runtime: QemuRuntime) -> None:
    """Boot-to-hello time, the figure docs/performance.md quotes (printed with -s)."""
    with trio.fail_after(T):
        assert (await runtime.detect()).available
        samples = []
        for _ in range(3):
            sid = new_id("sbx")
            started = trio.current_time()
            instance = await runtime.start(_spec(sid, 128 * MIB))
            await instance.channel.wait_hello()
            samples.append(trio.current_time() - started)
            await instance.channel.aclose()
            with trio.move_on_after(10):
                await instance.wait()
            await runtime.destroy(sid)
            await instance.wait()
    print(f"qemu {runtime.accel}: boot to first output, median {statistics.median(samples):.2f}s")
    assert not qemu_state(runtime.data_dir)
