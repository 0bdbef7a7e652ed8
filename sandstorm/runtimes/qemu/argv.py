"""QEMU's command line for one microVM (``-M microvm``), and its host shares (virtio-9p).

No network device at all, no default devices, QEMU's own seccomp filter, and QEMU drops to
``QEMU_USER`` once its files are open. The agent channel is ``-chardev stdio`` wired to a
virtio-serial port the guest init hands to the agent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sandstorm.api.types import MIB
from sandstorm.images.vm import CpioWriter
from sandstorm.runtimes.base import MountSpec

#: The user QEMU drops to after opening its files (``-runas``); it owns nothing on the host.
QEMU_USER = "nobody"
PORT_NAME = "org.sandstorm.agent"  # the guest init looks for this name (vm_init.c)
TCG_TB_MIB = 64
KERNEL_ARGS = (
    "console=ttyS0 quiet loglevel=4 panic=-1 reboot=t pci=off edd=off mitigations=off "
    "i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable no_timer_check cryptomgr.notests"
)


def qemu_argv(
    binary: str,
    image: Path,
    directory: Path,
    vcpus: int,
    ram: int,
    nproc: int,
    initrd: Path,
    *,
    accel: str,
    probe: bool = False,
    shares: tuple[MountSpec, ...] = (),
) -> list[str]:
    """The command line of a VM booting the image in ``image`` with ``initrd``, its console
    log and pidfile in ``directory``; QEMU runs with ``directory`` as its working directory
    (its QMP socket is relative: see qmp.py)."""
    ram_mib = ram // MIB
    append = f"{KERNEL_ARGS} sandstorm.overlay={ram // 2} sandstorm.nproc={nproc}"
    if probe:
        append += " sandstorm.probe=1"
    if accel == "tcg" and (khz := host_tsc_khz()):
        # Under TCG the guest reads the host's TSC. Calibrating it against the emulated PIT
        # fails on a busy host (the kernel then marks the TSC unstable and boots without a
        # usable clock); the host knows the frequency, so say it.
        append += f" tsc_early_khz={khz}"
    accel_args = (
        ["-accel", "kvm", "-cpu", "host"]
        if accel == "kvm"
        else ["-accel", f"tcg,tb-size={TCG_TB_MIB}", "-cpu", "max"]
    )
    return [
        binary,
        "-M", "microvm",
        *accel_args,
        "-smp", str(vcpus),
        "-m", f"{ram_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        # The uncompressed kernel boots through PVH: no decompression (slow under TCG).
        "-kernel", str(image / "vmlinux"),
        "-initrd", str(initrd),
        "-append", append,
        "-serial", f"file:{directory / 'console.log'}",
        "-drive", f"id=root,file={image / 'root.ext4'},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", "stdio,id=agent,signal=off",
        "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
        # Relative: the VM directory may be too deep for sun_path (see qmp.py).
        "-qmp", "unix:qmp.sock,server=on,wait=off",
        "-pidfile", str(directory / "qemu.pid"),
        # No network device, no USB, no default devices: nothing but the above.
        "-nic", "none",
        *share_args(shares),
        # QEMU's own seccomp filter: no exec, no obsolete syscalls, no resource control.
        # (Snapshots go to a descriptor passed over QMP, so nothing needs to spawn.) It
        # drops root for QEMU_USER once its files are open; that drop is itself a set*id
        # call, so elevateprivileges stays allowed (as nobody there is nothing to elevate).
        "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
        "-runas", QEMU_USER,
    ]  # fmt: skip


def host_tsc_khz() -> int | None:
    """The host CPU's (constant) TSC frequency in kHz, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return round(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        return None
    return None


def share_args(shares: tuple[MountSpec, ...]) -> list[str]:
    """A virtio-9p export per mount, tagged ``share<N>`` (the guest init mounts them from the
    /mounts list that ``with_shares`` writes). ``security_model=none``: files are created as
    QEMU's user (``QEMU_USER``) and guest ownership changes are not stored on the host."""
    args: list[str] = []
    for number, share in enumerate(shares):
        tag = f"share{number}"
        # QEMU's option syntax: a comma inside a value is written twice.
        path = os.fspath(share.source).replace(",", ",,")
        fsdev = f"local,id={tag},path={path},security_model=none"
        if share.read_only:
            fsdev += ",readonly=on"
        args += ["-fsdev", fsdev, "-device", f"virtio-9p-device,fsdev={tag},mount_tag={tag}"]
    return args


def with_shares(base: Path, target: Path, shares: tuple[MountSpec, ...]) -> Path:
    """``base`` plus a cpio holding /mounts (one "<tag> <ro|rw> <destination>" line per share),
    written to ``target``: this sandbox's own initramfs."""
    listing = "".join(
        f"share{n} {'ro' if m.read_only else 'rw'} {m.destination}\n" for n, m in enumerate(shares)
    )
    extra = CpioWriter()
    extra.add_file("mounts", listing.encode(), 0o644)
    with open(base, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.write(extra.finish())
    return target
