"""The Kata runtime: containerd's ``ctr run`` under a per-sandbox shim (``runtime.py``), and the
OCI spec, command lines and writable root it builds (``spec.py``)."""

from .runtime import KataRuntime

__all__ = ["KataRuntime"]
