"""The per-sandbox shim: a small process that holds a runtime's stdio, so sandboxes outlive the
gateway (the containerd-shim and conmon idea). ``shim.c`` is the shim, a small C program that
``build.py`` compiles once per source; ``wire.py`` holds its wire format's numbers and
``client.py`` is the gateway side. Wire format: ``protocol/shim.md``."""

from .client import (
    DEFAULT_JOURNAL_MAX,
    Handshake,
    ShimChannel,
    ShimInstance,
    ShimPaths,
    attach,
    end_shim,
    is_shim_process,
    live_shims,
    prepare_shim,
    read_exit_status,
    read_pids,
    remove_socket,
    shim_paths,
    shim_process_ids,
    short_socket_dir,
    spawn_shim,
)

__all__ = [
    "DEFAULT_JOURNAL_MAX",
    "Handshake",
    "ShimChannel",
    "ShimInstance",
    "ShimPaths",
    "attach",
    "end_shim",
    "is_shim_process",
    "live_shims",
    "prepare_shim",
    "read_exit_status",
    "read_pids",
    "remove_socket",
    "shim_paths",
    "shim_process_ids",
    "short_socket_dir",
    "spawn_shim",
]
