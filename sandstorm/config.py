"""Gateway configuration: defaults, a TOML file, then command-line flags, in that order.

Example ``sandstorm.toml``::

    data_dir = "/var/lib/sandstorm"
    mount_allow_list = ["/srv/datasets"]
    max_memory_limit = 4294967296

    [runtime_paths]
    gvisor = ["/opt/gvisor/runsc"]
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from sandstorm.protocol import MIB, RuntimeName

DEFAULT_DATA_DIR = Path("/var/lib/sandstorm")

# The seed's search paths (SPEC §1); the first hit wins.
DEFAULT_RUNTIME_PATHS: dict[RuntimeName, list[str]] = {
    "gvisor": ["/usr/local/bin/runsc", "/usr/bin/runsc", "./bin/runsc"],
    "kata": ["/usr/local/bin/kata-runtime", "/usr/bin/kata-runtime", "./bin/kata-runtime"],
    "firecracker": ["/usr/local/bin/firecracker"],
    "qemu": ["qemu-system-x86_64"],
}
DEFAULT_JAILER_PATHS = ["/usr/local/bin/jailer"]


class ConfigError(Exception):
    pass


Positive = Annotated[int, Meta(ge=1)]


class Config(Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 3000
    data_dir: str = str(DEFAULT_DATA_DIR)
    image: str = "default"
    runtime_paths: dict[RuntimeName, list[str]] = msgspec.field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_RUNTIME_PATHS.items()}
    )
    jailer_paths: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_JAILER_PATHS))
    # Mount sources must resolve under one of these roots; empty means no mounts at all.
    mount_allow_list: list[str] = []
    max_memory_limit: Annotated[int, Meta(ge=32 * MIB)] = 8192 * MIB
    max_timeout_ms: Positive = 10 * 60 * 1000
    max_keep_alive_s: Annotated[int, Meta(ge=0)] = 24 * 3600
    max_lifetime_s: Positive = 24 * 3600
    pids_limit: Annotated[int, Meta(ge=16)] = 256
    # Per stream (stdout, stderr) cap of the text returned in a result; the stream has it all.
    result_output_cap: Positive = 1 * MIB
    # Total bytes an exec may write (stdout + stderr) before it is killed: verdict output_limit.
    exec_output_limit: Positive = 256 * MIB
    replay_buffer_bytes: Positive = 4 * MIB
    # Live streams (WebSockets): caps, and how far one client may fall behind before it is cut
    # off with "lagged" and close code 1013.
    max_streams: Positive = 1024
    max_streams_per_sandbox: Positive = 16
    stream_outbox_events: Annotated[int, Meta(ge=4)] = 256
    stream_outbox_bytes: Annotated[int, Meta(ge=64 * 1024)] = 8 * MIB
    # A stream client whose full outbox takes nothing for this long has stopped reading.
    stream_stall_timeout_s: Annotated[float, Meta(gt=0)] = 1.0
    max_client_frame_bytes: Annotated[int, Meta(ge=1024)] = 1 * MIB
    max_body_bytes: Positive = 16 * MIB
    # A client that takes none of a response for this long is disconnected.
    write_timeout_s: Annotated[float, Meta(gt=0)] = 15.0
    # Admission control: refuse new sandboxes beyond these with 503 at_capacity.
    max_sandboxes: Positive = 64
    memory_budget: Annotated[int, Meta(ge=64 * MIB)] = 16 * 1024 * MIB
    max_execs_per_sandbox: Positive = 32
    # How long a sandbox may take to boot before its create fails.
    boot_timeout_s: Annotated[float, Meta(gt=0)] = 20.0
    # The cgroup (under each hierarchy) that holds one child group per sandbox. By default it
    # is derived from the data directory, so two gateways on one host never reap each other.
    cgroup_parent: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    # Network inside sandboxes: "none" (loopback only) is the only mode offered so far.
    network: str = "none"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: object) -> Config:
    """Build the configuration from a TOML file (optional) and explicit overrides (not None)."""
    raw: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
    for name, paths in DEFAULT_RUNTIME_PATHS.items():
        config.runtime_paths.setdefault(name, list(paths))
    config.data_dir = str(Path(config.data_dir).resolve())
    if config.cgroup_parent is None:
        digest = hashlib.sha256(config.data_dir.encode()).hexdigest()[:8]
        config.cgroup_parent = f"sandstorm-{digest}"
    config.mount_allow_list = [os.path.realpath(p) for p in config.mount_allow_list]
    if config.network != "none":
        raise ConfigError("network: only 'none' is supported")
    return config
