"""The per-sandbox shim: a small process that holds a runtime's stdio, so sandboxes outlive the
gateway (the containerd-shim and conmon idea). ``shim.c`` is the shim, a small C program that
``build.py`` compiles once per source; ``wire.py`` holds its wire format's numbers. The gateway
side: ``process.py`` starts, finds and ends shim processes, ``channel.py`` is the connection to
one. Wire format: ``protocol/shim.md``."""

from .channel import Handshake, ShimAttachError, ShimChannel, attach
from .process import (
    DEFAULT_JOURNAL_MAX,
    ShimPaths,
    end_shim,
    is_shim_process,
    live_shims,
    pidfd_of_child,
    prepare_shim,
    read_exit_status,
    read_pids,
    remove_socket,
    shim_argv_directory,
    shim_paths,
    shim_process_ids,
    short_socket_dir,
    spawn_shim,
)

__all__ = [
    "DEFAULT_JOURNAL_MAX",
    "Handshake",
    "ShimAttachError",
    "ShimChannel",
    "ShimPaths",
    "attach",
    "end_shim",
    "is_shim_process",
    "live_shims",
    "pidfd_of_child",
    "prepare_shim",
    "read_exit_status",
    "read_pids",
    "remove_socket",
    "shim_argv_directory",
    "shim_paths",
    "shim_process_ids",
    "short_socket_dir",
    "spawn_shim",
]
