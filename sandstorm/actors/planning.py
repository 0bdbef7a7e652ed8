"""From a request to what the actors run: the runtime chosen for it, the sandbox's parameters
(and what the store keeps of them) and the plan of an exec.

Planning decides and checks; it changes nothing. Everything here runs before anything is
created or reserved, so a refused request leaves nothing behind. Every sandbox's parameters,
whatever made it (a run, a resume, a take-over, the warm pool), come from :meth:`Planner.params`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from sandstorm.actors.sandbox import ExecPlan, SandboxParams, StoredMount, StoredParams
from sandstorm.actors.tenancy import DEFAULT_TENANT, POOL_TENANT
from sandstorm.agent import MAX_GATEWAY_FRAME
from sandstorm.api.selection import NoRuntime, Selected
from sandstorm.api.types import (
    JSON_ENCODER,
    ExecRequest,
    IsolationLevel,
    Mount,
    RunRequest,
    RuntimeName,
)
from sandstorm.api.validation import (
    INLINE_CODE_LIMIT,
    check_code_or_command,
    check_environment,
    check_sandbox_path,
    code_argv,
)
from sandstorm.config import Config, WarmPoolClass
from sandstorm.errors import InvalidRequest, MountNotAllowed, RuntimeUnavailable
from sandstorm.ids import new_id
from sandstorm.metrics import Metrics
from sandstorm.runtimes.base import MountSpec, SandboxSpec
from sandstorm.store import SandboxRecord
from sandstorm.store.snapshots import SnapshotMeta

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/workspace",
    "LANG": "C.UTF-8",
    "USER": "sandbox",
    # Output should stream as it is written; Python block-buffers a pipe unless told otherwise.
    "PYTHONUNBUFFERED": "1",
}
# Host paths never mounted, whatever the allow-list says.
FORBIDDEN_SOURCES = ("/", "/proc", "/sys", "/dev", "/boot", "/etc", "/run", "/var/run")
# What a warm pool sandbox runs with until a request claims it (and gives it its own).
POOL_TIMEOUT_MS = 30_000


def resolve_mount(mount: Mount, index: int, config: Config) -> MountSpec:
    check_sandbox_path(mount.destination, f"mounts[{index}].destination")
    field = f"mounts[{index}].source"
    if "\x00" in mount.source or "\n" in mount.source:
        raise InvalidRequest("path must not contain NUL or newlines", field=field)
    if not mount.source.startswith("/"):
        raise InvalidRequest(f"{mount.source!r} is not an absolute path", field=field)
    # Resolve symlinks first: the check is on where the path really leads.
    real = os.path.realpath(mount.source)
    data_dir = os.path.realpath(config.data_dir)
    refused = (
        real in FORBIDDEN_SOURCES
        or _under(real, data_dir)
        or _under(data_dir, real)
        or any(_under(real, p) for p in ("/proc", "/sys", "/dev"))
        or not any(_under(real, root) for root in config.mount_allow_list)
    )
    if refused:
        raise MountNotAllowed(
            f"mount source {mount.source!r} (resolves to {real!r}) is not under an allowed root",
            field=field,
            allowed_roots=list(config.mount_allow_list),
        )
    if not os.path.exists(real):
        raise InvalidRequest(f"mount source {mount.source!r} does not exist", field=field)
    return MountSpec(Path(real), mount.destination, mount.read_only)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_run(req: RunRequest, config: Config) -> tuple[MountSpec, ...]:
    """Validate a run request fully; returns the resolved mounts."""
    check_code_or_command(req)
    check_environment(req.environment)
    cpus = os.cpu_count() or 1
    if req.cpu_limit > cpus:
        raise InvalidRequest(f"cpu_limit is above the host's {cpus} CPUs", field="cpu_limit")
    if req.memory_limit > config.max_memory_limit:
        raise InvalidRequest(
            f"memory_limit is above the maximum {config.max_memory_limit}", field="memory_limit"
        )
    if req.timeout > config.max_timeout_ms:
        raise InvalidRequest(
            f"timeout is above the maximum {config.max_timeout_ms}", field="timeout"
        )
    if req.keep_alive > config.max_keep_alive_s:
        raise InvalidRequest(
            f"keep_alive is above the maximum {config.max_keep_alive_s}", field="keep_alive"
        )
    for path in req.files:
        check_sandbox_path(path, f"files.{path}")
    destinations = [m.destination for m in req.mounts]
    if len(set(destinations)) != len(destinations):
        raise InvalidRequest("two mounts share a destination", field="mounts")
    return tuple(resolve_mount(m, i, config) for i, m in enumerate(req.mounts))


@dataclass(frozen=True, slots=True)
class RunPlan:
    """A run request, decided: its sandbox, what the store keeps of it, and its first exec."""

    params: SandboxParams
    stored: StoredParams
    first_exec: ExecPlan


class Planner:
    def __init__(
        self,
        config: Config,
        rootfs: Path,
        languages: set[str],
        metrics: Metrics,
        select: Callable[[IsolationLevel, RuntimeName | None], Selected | NoRuntime],
    ) -> None:
        self.config = config
        self.rootfs = rootfs
        # The selection rules over the runtimes' declarations and detections (the registry's).
        self.select = select
        self.languages = languages
        self.metrics = metrics

    def params(
        self,
        stored: StoredParams,
        *,
        runtime: RuntimeName,
        tenant: str,
        mounts: tuple[MountSpec, ...],
        sandbox_id: str | None = None,
        pids_limit: int | None = None,
        first_channel: int = 1,
    ) -> SandboxParams:
        """A sandbox's parameters and its runtime's spec, from what its row keeps (or will
        keep) and what the row does not: the runtime, the tenant, the resolved mounts. A new
        id unless given; the configured pids limit unless given."""
        sandbox_id = sandbox_id or new_id("sbx")
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            rootfs=self.rootfs,
            cpu_limit=stored.cpu_limit,
            memory_limit=stored.memory_limit,
            pids_limit=self.config.pids_limit if pids_limit is None else pids_limit,
            mounts=mounts,
        )
        return SandboxParams(
            sandbox_id=sandbox_id,
            runtime_name=runtime,
            isolation_level=stored.isolation_level,
            selection=stored.selection,
            spec=spec,
            image=self.config.image if stored.image is None else stored.image,
            timeout_ms=stored.timeout,
            keep_alive_s=stored.keep_alive,
            restored_from=stored.restored_from,
            first_channel=first_channel,
            tenant=tenant,
        )

    def choose(self, level: IsolationLevel, preference: RuntimeName | None) -> Selected:
        choice = self.select(level, preference)
        if isinstance(choice, NoRuntime):
            self.metrics.refused("runtime_unavailable", "sandbox")
            raise RuntimeUnavailable(
                f"no available runtime supports isolation level {level!r}",
                isolation_level=level,
                candidates=dict(choice.candidates),
            )
        return choice

    def run(self, req: RunRequest, tenant: str = DEFAULT_TENANT) -> RunPlan:
        """Check a run request and decide it: InvalidRequest, MountNotAllowed or
        RuntimeUnavailable when it cannot run."""
        mounts = check_run(req, self.config)
        choice = self.choose(req.isolation_level, req.runtime_preference)
        first_exec = self.exec(req, req.timeout)
        stored = StoredParams(
            isolation_level=req.isolation_level,
            cpu_limit=req.cpu_limit,
            memory_limit=req.memory_limit,
            timeout=req.timeout,
            keep_alive=req.keep_alive,
            # As the request gave them (a row never needs them resolved again).
            mounts=tuple(
                StoredMount(source=m.source, destination=m.destination, read_only=m.read_only)
                for m in req.mounts
            ),
            selection=choice.reason,
            image=self.config.image,
            runtime_preference=req.runtime_preference,
            language=req.language,
            environment_names=tuple(sorted(req.environment)),
            files=tuple(sorted(req.files)),
        )
        params = self.params(stored, runtime=choice.runtime, tenant=tenant, mounts=mounts)
        return RunPlan(params, stored, first_exec)

    def resume(
        self, meta: SnapshotMeta, keep_alive: int, tenant: str
    ) -> tuple[SandboxParams, StoredParams]:
        """A sandbox restored from a snapshot, with the snapshot's limits and mounts (checked
        again: the allow-list may have changed since)."""
        mounts = tuple(
            resolve_mount(
                Mount(source=m.source, destination=m.destination, read_only=m.read_only),
                i,
                self.config,
            )
            for i, m in enumerate(meta.mounts)
        )
        stored = StoredParams(
            isolation_level=meta.isolation_level,
            cpu_limit=meta.cpu_limit,
            memory_limit=meta.memory_limit,
            timeout=meta.timeout,
            keep_alive=keep_alive,
            mounts=tuple(
                StoredMount(source=str(m.source), destination=m.destination, read_only=m.read_only)
                for m in mounts
            ),
            image=meta.image,
            restored_from=meta.info.snapshot_id,
        )
        params = self.params(
            stored,
            runtime=meta.info.runtime,
            tenant=tenant,
            mounts=mounts,
            pids_limit=meta.pids_limit,
            first_channel=meta.next_channel,
        )
        return params, stored

    def taken_over(self, record: SandboxRecord) -> SandboxParams:
        """The parameters of a sandbox an earlier gateway left running, from its row;
        ``msgspec.ValidationError`` when the row cannot give them."""
        stored = StoredParams.from_record(record.params)
        runtime: RuntimeName = msgspec.convert(record.runtime, RuntimeName)
        # Checked when it was created; kept as it was even if the allow-list changed since (the
        # sandbox has it mounted either way).
        mounts = tuple(MountSpec(Path(m.source), m.destination, m.read_only) for m in stored.mounts)
        return self.params(
            stored, runtime=runtime, tenant=record.tenant, mounts=mounts, sandbox_id=record.id
        )

    def pooled(self, cls: WarmPoolClass, image: str) -> SandboxParams:
        """A warm pool sandbox of ``cls``: owned by no tenant until claimed; its keep_alive is the
        longest allowed (an unclaimed one is held, and only max_lifetime ends it)."""
        stored = StoredParams(
            isolation_level="standard",
            cpu_limit=cls.cpu_limit,
            memory_limit=cls.memory_limit,
            timeout=POOL_TIMEOUT_MS,
            keep_alive=self.config.max_keep_alive_s,
            selection="default",
            image=image,
        )
        return self.params(stored, runtime=cls.runtime, tenant=POOL_TENANT, mounts=())

    def exec(
        self, req: RunRequest | ExecRequest, timeout_ms: int, *, interactive: bool = False
    ) -> ExecPlan:
        env = dict(BASE_ENV)
        env.update(req.environment)
        files = {path: content.encode() for path, content in getattr(req, "files", {}).items()}
        if req.code is not None:
            assert req.language is not None
            if req.language not in self.languages:
                raise InvalidRequest(
                    f"language {req.language} is not in the image", field="language"
                )
            if len(req.code.encode()) <= INLINE_CODE_LIMIT:
                argv = code_argv(req.language, req.code, is_file=False)
            else:
                path = f"/tmp/.sandstorm-code-{os.urandom(6).hex()}"
                files[path] = req.code.encode()
                argv = code_argv(req.language, path, is_file=True)
        else:
            assert req.command is not None
            argv = list(req.command)
        cwd = getattr(req, "cwd", None) or "/workspace"
        # argv, environment and cwd travel in one agent frame, JSON-encoded (escaping can grow
        # them): refuse what cannot fit rather than fail after the sandbox exists.
        size = len(JSON_ENCODER.encode({"argv": argv, "env": env, "cwd": cwd}))
        if size > MAX_GATEWAY_FRAME - 1024:
            field = "command" if req.command is not None else "environment"
            raise InvalidRequest(
                f"command, environment and cwd take {size} bytes encoded; the limit is "
                f"{MAX_GATEWAY_FRAME - 1024}",
                field=field,
            )
        stdin = req.stdin.encode() if req.stdin is not None else None
        return ExecPlan(
            argv=argv,
            env=env,
            cwd=cwd,
            timeout_ms=timeout_ms,
            files=files,
            stdin=stdin,
            close_stdin=not (interactive or req.stdin_open),
            background=req.background,
        )
