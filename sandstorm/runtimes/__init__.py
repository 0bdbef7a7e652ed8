"""The runtimes: the drivers that build, snapshot and tear down sandboxes.

``base.py`` holds what every runtime declares (name, isolation levels, capabilities) and shares;
``shimmed.py`` the life cycle of the runtimes whose sandboxes a shim holds (gVisor, Kata, QEMU);
``registry.py`` which runtimes exist and what detection found. One package per driver:
``gvisor/``, ``kata/``, ``qemu/``, ``firecracker/``; ``guest.py`` is what the two microVM
drivers share, ``oci.py`` what the two container drivers share.
"""
