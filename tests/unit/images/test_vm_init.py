"""The guest init's (vm_init.c) command-line handling, compiled and run on the host, and the
built initramfs. Booting it under Firecracker (sandstorm.channel=vsock, virtio_mmio.device=...)
needs Firecracker and KVM: tests/unit/runtimes/test_firecracker.py covers that where they exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sandstorm.images.vm import (
    _INIT_SOURCE,
    GUEST_MODULES,
    SHARE_MODULES,
    load_vm_manifest,
    vm_dir,
)
from tests.conftest import IMAGE_DATA_DIR

# The init's own functions, with its main() renamed away: nothing of the init runs but the
# parsing under test (argv[1] is the command line, argv[2] the module file name).
HARNESS = f"""
#define main vm_init_main
#include "{_INIT_SOURCE}"
#undef main
int main(int argc, char **argv) {{
    char out[96];
    if (argc != 3) return 2;
    snprintf(cmdline, sizeof cmdline, "%s", argv[1]);
    module_params(cmdline, argv[2], out, sizeof out);
    printf("%d|%s", vsock_channel(), out);
    return 0;
}}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found (apt-get install gcc libc6-dev)")
    work = tmp_path_factory.mktemp("vm_init")
    (work / "harness.c").write_text(HARNESS)
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-Wno-unused-function", "-o", str(work / "harness"),
         str(work / "harness.c")],
        check=True, timeout=120,
    )  # fmt: skip
    return work / "harness"


def _parse(harness: Path, cmdline: str, module: str) -> tuple[bool, str]:
    out = subprocess.run(
        [str(harness), cmdline, module], check=True, capture_output=True, timeout=10
    ).stdout.decode()
    vsock, _, params = out.partition("|")
    return vsock == "1", params


def test_module_parameters_from_the_command_line(harness: Path) -> None:
    # What Firecracker appends for two virtio-mmio devices, among other words.
    line = (
        "console=ttyS0 reboot=k virtio_mmio.device=4K@0xd0000000:5 quiet "
        "virtio_mmio.device=4K@0xd0001000:6 virtio_mmio=off sandstorm.overlay=1024"
    )
    assert _parse(harness, line, "virtio_mmio.ko") == (
        False,
        "device=4K@0xd0000000:5 device=4K@0xd0001000:6",
    )
    # Dashes and underscores name the same module; a bare name works like the file name.
    assert _parse(harness, "virtio-mmio.device=1K@0x1:1", "virtio_mmio")[1] == "device=1K@0x1:1"
    # Other modules get nothing; a dot inside a value does not make a module prefix.
    assert _parse(harness, line, "virtio_blk.ko") == (False, "")
    assert _parse(harness, "a=b.c=d virtio_blkx.q=1", "a.ko")[1] == ""
    assert _parse(harness, "virtio_blkx.q=1 ext4.", "virtio_blk.ko")[1] == ""
    # Quoted values keep their blanks (and their quotes, for the kernel's own parser).
    assert _parse(harness, 'm.x="a b" m.flag', "m.ko")[1] == 'x="a b" flag'


def test_a_word_that_does_not_fit_is_dropped_whole(harness: Path) -> None:
    long = "x" * 100  # the harness gives 96 bytes
    params = _parse(harness, f"m.a=1 m.b={long} m.c=3", "m.ko")[1]
    assert params == "a=1 c=3"


def test_vsock_channel_switch(harness: Path) -> None:
    assert _parse(harness, "quiet sandstorm.channel=vsock", "m.ko")[0] is True
    assert _parse(harness, "sandstorm.channel=vsockx", "m.ko")[0] is False
    assert _parse(harness, "sandstorm.channel=virtio", "m.ko")[0] is False
    assert _parse(harness, "quiet", "m.ko")[0] is False


def _cpio_files(data: bytes) -> dict[str, bytes]:
    """Name → content of each entry of a newc cpio (the kernel keeps the last of a name)."""
    files: dict[str, bytes] = {}
    pos = 0
    while pos + 110 <= len(data) and data[pos : pos + 6] == b"070701":
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        size, name_size = fields[6], fields[11]
        name_end = pos + 110 + name_size
        name = data[pos + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        files[name] = data[start : start + size]
        pos = start + size + (-(start + size) % 4)
        if name == "TRAILER!!!":
            break
    return files


def test_built_initramfs_loads_the_vsock_transport() -> None:
    manifest = load_vm_manifest(IMAGE_DATA_DIR)
    if manifest is None:
        pytest.skip(f"no VM image in {IMAGE_DATA_DIR} (sandstorm image build --vm)")
    files = _cpio_files((vm_dir(IMAGE_DATA_DIR) / "initramfs.cpio").read_bytes())
    order = files["modules/order"].decode().split()
    shares = files["modules/order.shares"].decode().split()
    assert order + shares == list(manifest.modules)
    # The 9p modules (and their dependencies) only for guests with shares, after their own.
    for name in SHARE_MODULES:
        assert f"{name}.ko" in shares and f"{name}.ko" not in order, name
        assert files[f"modules/{name}.ko"].startswith(b"\x7fELF")
    assert shares.index("9pnet.ko") < shares.index("9p.ko") < shares.index("9pnet_virtio.ko")
    for name in GUEST_MODULES:
        assert f"{name}.ko" in order, name
        assert files[f"modules/{name}.ko"].startswith(b"\x7fELF")
    # Dependencies first: the transport after vsock and its common part.
    assert order.index("vsock.ko") < order.index("vmw_vsock_virtio_transport_common.ko")
    assert order.index("vmw_vsock_virtio_transport_common.ko") < order.index(
        "vmw_vsock_virtio_transport.ko"
    )
    assert files["init"].startswith(b"\x7fELF")
