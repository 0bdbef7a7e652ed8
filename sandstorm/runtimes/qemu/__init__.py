"""The QEMU microVM runtime: QEMU under a per-sandbox shim (``runtime.py``), its command line
(``argv.py``) and its QMP client (``qmp.py``)."""

from .runtime import QemuRuntime

__all__ = ["QemuRuntime"]
