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
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from sandstorm.api.types import MIB, RuntimeName

DEFAULT_DATA_DIR = Path("/var/lib/sandstorm")

# The seed's search paths (SPEC §1); the first hit wins.
DEFAULT_RUNTIME_PATHS: dict[RuntimeName, list[str]] = {
    "gvisor": ["/usr/local/bin/runsc", "/usr/bin/runsc", "./bin/runsc"],
    "kata": ["/usr/local/bin/kata-runtime", "/usr/bin/kata-runtime", "./bin/kata-runtime"],
    "firecracker": ["/usr/local/bin/firecracker"],
    "qemu": ["qemu-system-x86_64"],
}
DEFAULT_JAILER_PATHS = ["/usr/local/bin/jailer"]


# runsc --platform values; Config.gvisor_platform explains the default.
GvisorPlatform = Literal["ptrace", "systrap", "kvm"]
DEFAULT_GVISOR_PLATFORM: GvisorPlatform = "ptrace"


class ConfigError(Exception):
    pass


Positive = Annotated[int, Meta(ge=1)]


class WarmPoolClass(Struct, kw_only=True, forbid_unknown_fields=True):
    """One class of pre-booted sandboxes (``[[warm_pool]]`` in the TOML file): a run whose
    runtime and image match takes one; its limits are set on claim when they differ."""

    runtime: RuntimeName = "gvisor"
    memory_limit: Annotated[int, Meta(ge=32 * MIB)] = 512 * MIB
    cpu_limit: Annotated[float, Meta(ge=0.05)] = 1.0
    size: Annotated[int, Meta(ge=0, le=256)] = 2


class Config(Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 3000
    data_dir: str = str(DEFAULT_DATA_DIR)
    image: str = "default"
    runtime_paths: dict[RuntimeName, list[str]] = msgspec.field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_RUNTIME_PATHS.items()}
    )
    jailer_paths: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_JAILER_PATHS))
    # The uid/gid the jailer runs Firecracker as (its --uid/--gid); give it a user of its own.
    firecracker_uid: Annotated[int, Meta(ge=1)] = 65534
    firecracker_gid: Annotated[int, Meta(ge=1)] = 65534
    # Kata through containerd (docs/runtimes/kata.md): the runtime type containerd
    # runs (io.containerd.runc.v2 drives the same path without a VM, as the tests do) and
    # containerd's socket. Containers live in containerd namespace "sandstorm".
    kata_runtime_type: Annotated[str, Meta(pattern=r"^[a-z0-9_-]+(\.[a-z0-9_-]+)+$")] = (
        "io.containerd.kata.v2"
    )
    containerd_address: str = "/run/containerd/containerd.sock"
    # gVisor's platform (runsc --platform). systrap, runsc's own default, keeps every sandbox's
    # stub threads waking, so each idle sandbox (even `sleep`) costs host CPU all the time and
    # enough of them fill the host (gVisor issues 10793, 13361); ptrace costs next to nothing
    # while idle and starts interpreters faster. docs/performance.md has both measured.
    gvisor_platform: GvisorPlatform = DEFAULT_GVISOR_PLATFORM
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
    # A file or archive uploaded into a sandbox (streamed: the gateway never holds it whole).
    max_upload_bytes: Positive = 1024 * MIB
    # A client that takes none of a response for this long is disconnected.
    write_timeout_s: Annotated[float, Meta(gt=0)] = 15.0
    # Admission control: refuse new sandboxes beyond these with 503 at_capacity. The budget
    # counts each sandbox's host memory: memory_limit, plus a VMM's own memory for VM runtimes.
    max_sandboxes: Positive = 64
    memory_budget: Annotated[int, Meta(ge=64 * MIB)] = 16 * 1024 * MIB
    max_execs_per_sandbox: Positive = 32
    # How long a sandbox may take to boot before its create fails.
    boot_timeout_s: Annotated[float, Meta(gt=0)] = 20.0
    # Per sandbox: output its shim journals that the gateway has not acknowledged yet (what a
    # restarted gateway can replay). At this mark the shim stops reading: the sandbox waits.
    shim_journal_max: Annotated[int, Meta(ge=256 * 1024)] = 64 * MIB
    # The cgroup (under each hierarchy) that holds one child group per sandbox. By default it
    # is derived from the data directory, so two gateways on one host never reap each other.
    cgroup_parent: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    # Network inside sandboxes: "none" (loopback only) is the only mode offered so far.
    network: str = "none"
    # With no API key (`sandstorm keys create`) the gateway serves only on loopback; this lets
    # it serve an open API elsewhere (every caller is tenant "default"). Keys, once created,
    # are required whatever this says.
    insecure_no_auth: bool = False
    # SIGTERM/SIGINT: new sandboxes and execs are refused (503) while running execs get this
    # long to finish; then every sandbox is destroyed, or left running for the next gateway
    # ("keep": the actors detach, nothing is torn down).
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 10.0
    # After SIGTERM (what service managers and `kill` send): "keep" by default, so an upgrade
    # or restart loses no sandbox (each is held by its shim and the next gateway takes it over).
    # Until then nothing enforces their keep_alive or lifetime.
    on_shutdown: Literal["destroy", "keep"] = "keep"
    # After SIGINT (Ctrl-C in the terminal that runs `sandstorm serve`): "destroy" by default,
    # as whoever stops a program in a terminal expects everything it started to stop with it.
    on_interrupt: Literal["destroy", "keep"] = "destroy"
    # Warm pool (actors/pool.py): sandboxes booted ahead of demand, one class per entry; the
    # default is one class of the default limits. Pool sandboxes count against max_sandboxes
    # and memory_budget (and give way when a request needs the room).
    warm_pool: list[WarmPoolClass] = msgspec.field(default_factory=lambda: [WarmPoolClass()])
    # Host MemAvailable below this: the pool destroys its idle sandboxes and does not refill.
    warm_pool_min_available: Annotated[int, Meta(ge=0)] = 1024 * MIB

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
    if "warm_pool" not in raw:
        # The default pool gives way to small admission settings (it always leaves room for
        # one sandbox of its own size); a configured one that does not fit is an error.
        default = config.warm_pool[0]
        room = min(config.max_sandboxes - 1, config.memory_budget // default.memory_limit - 1)
        default.size = max(0, min(default.size, room))
    pooled = sum(c.size for c in config.warm_pool)
    pooled_memory = sum(c.size * c.memory_limit for c in config.warm_pool)
    if pooled > config.max_sandboxes or pooled_memory > config.memory_budget:
        raise ConfigError(
            f"warm_pool: {pooled} sandboxes of {pooled_memory} bytes in all do not fit "
            f"max_sandboxes {config.max_sandboxes} and memory_budget {config.memory_budget}"
        )
    return config
