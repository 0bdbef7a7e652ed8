"""The per-sandbox shim: a small process that holds a runtime's stdio, so sandboxes outlive the
gateway (the containerd-shim idea). ``main.py`` is the shim (standard library only, run by path);
``client.py`` is the gateway side. Wire format: ``protocol/shim.md``."""

from .client import (
    DEFAULT_JOURNAL_MAX,
    SHIM_MAIN,
    Handshake,
    ShimChannel,
    ShimInstance,
    ShimPaths,
    attach,
    end_shim,
    is_shim_process,
    live_shims,
    prepare_shim_bytecode,
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
    "SHIM_MAIN",
    "Handshake",
    "ShimChannel",
    "ShimInstance",
    "ShimPaths",
    "attach",
    "end_shim",
    "is_shim_process",
    "live_shims",
    "prepare_shim_bytecode",
    "read_exit_status",
    "read_pids",
    "remove_socket",
    "shim_paths",
    "shim_process_ids",
    "short_socket_dir",
    "spawn_shim",
]
