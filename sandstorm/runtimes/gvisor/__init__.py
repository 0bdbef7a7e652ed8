"""The gVisor runtime: ``runsc`` under a per-sandbox shim (``runtime.py``)."""

from .runtime import GvisorRuntime

__all__ = ["GvisorRuntime"]
