"""The Firecracker runtime: jailed Firecracker microVMs (``runtime.py``), the jailer's
directories and command line (``jail.py``), Firecracker's API (``api.py``), and the probe that
says whether KVM really runs guests (``kvm_probe.py``)."""

from .runtime import FirecrackerRuntime

__all__ = ["FirecrackerRuntime"]
