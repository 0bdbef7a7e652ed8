"""Does KVM really run guests here? Run a small guest and time it.

``/dev/kvm`` can exist and still not run guests: a one-instruction guest may halt while every
instruction is emulated, far slower than hardware, and a Linux guest then never boots. So the
probe runs a real loop and requires it to finish at hardware speed. The guest is 64 KiB mapped
just under 4 GiB, where a fresh x86 vCPU starts (CS base 0xffff0000, IP 0xfff0, real mode): a
jump to the code, ``LOOP_COUNT`` turns of ``loop``, ``out 0x80`` of a marker byte (a
``KVM_EXIT_IO``), then ``hlt`` (``KVM_EXIT_HLT``). No register set-up is needed, so the only
layouts involved are ``kvm_userspace_memory_region`` and the head of ``kvm_run``.

Run as a script (``python -I kvm_probe.py``): in its own process, because a broken KVM can block
in ``KVM_RUN``, which no thread can be cancelled out of. It prints ``ok`` or the reason and exits
0 or 1.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys
import time

import trio

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(KVMIO, 0x46, 32 bytes)
KVM_RUN = 0xAE80
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_API_VERSION = 12
GUEST_BASE = 0xFFFF0000
GUEST_SIZE = 0x10000
RESET_IP = 0xFFF0
CODE_AT = 0xF000
LOOP_COUNT = 1 << 20
MARKER = 0x5A
# mov ecx, LOOP_COUNT; a32 loop $ (ECX, back to itself); mov al, MARKER; out 0x80, al; hlt
GUEST_CODE = (
    b"\x66\xb9" + LOOP_COUNT.to_bytes(4, "little") + b"\x67\xe2\xfd"
    + bytes([0xB0, MARKER]) + b"\xe6\x80\xf4"
)  # fmt: skip
#: Hardware runs LOOP_COUNT turns in a few milliseconds; an emulating KVM takes a quarter of a
#: second or more. The bound sits well away from both, so one probe's jitter cannot flip it.
MAX_LOOP_S = 0.05
PROBE_TIMEOUT_S = 5.0


def probe(device: str = "/dev/kvm") -> str | None:
    """None when a guest ran and halted, else why not."""
    try:
        kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return f"KVM API version {version}, expected {KVM_API_VERSION}"
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        memory = mmap.mmap(-1, GUEST_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory[CODE_AT : CODE_AT + len(GUEST_CODE)] = GUEST_CODE
        jump = CODE_AT - (RESET_IP + 3)  # jmp rel16 from the reset vector
        memory[RESET_IP : RESET_IP + 3] = b"\xe9" + jump.to_bytes(2, "little", signed=True)
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        region = struct.pack("=IIQQQ", 0, 0, GUEST_BASE, GUEST_SIZE, address)
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        started = time.monotonic()
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        elapsed = time.monotonic() - started
        (reason,) = struct.unpack_from("=I", run, 8)
        # kvm_run.io: direction u8, size u8, port u16, count u32, data_offset u64 (at 32).
        _, _, port, _, offset = struct.unpack_from("=BBHIQ", run, 32)
        if reason != KVM_EXIT_IO or port != 0x80 or run[offset] != MARKER:
            return f"a probe guest under KVM did not run its code (exit reason {reason})"
        if elapsed > MAX_LOOP_S:
            return (
                f"KVM emulates instead of running guests on the CPU: a {LOOP_COUNT}-turn "
                f"loop took {elapsed:.2f}s (hardware: a few ms)"
            )
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        (reason,) = struct.unpack_from("=I", run, 8)
        if reason != KVM_EXIT_HLT:
            return f"a probe guest under KVM did not halt (exit reason {reason})"
        return None
    except OSError as exc:
        return f"KVM cannot run a guest: {exc.strerror or exc}"
    finally:
        os.close(kvm)


async def kvm_runs_guests(python: str = sys.executable) -> str | None:
    """Run :func:`probe` in a child process under a deadline: None if KVM runs guests, else
    the reason."""
    try:
        with trio.move_on_after(PROBE_TIMEOUT_S) as scope:
            result = await trio.run_process(
                # Isolated, by its path: the probe needs nothing of the gateway's package.
                [python, "-I", os.path.abspath(__file__)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except OSError as exc:
        return f"cannot run the KVM probe: {exc}"
    if scope.cancelled_caught:
        return f"a probe guest did not halt under KVM within {PROBE_TIMEOUT_S:.0f}s"
    out = result.stdout.decode(errors="replace").strip()
    if result.returncode == 0 and out == "ok":
        return None
    return out or result.stderr.decode(errors="replace").strip()[-300:] or "KVM probe failed"


def main() -> int:
    reason = probe()
    print(reason or "ok")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
