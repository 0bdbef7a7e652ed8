"""Kata Containers through containerd: ``ctr run --runtime io.containerd.kata.v2``.

The same shape as the gVisor driver: one OCI spec per sandbox (the agent as PID 1 on the
container's stdio), and ``ctr run`` kept in the foreground of a per-sandbox shim
(``shimmed.py``) whose stdin/stdout are the agent channel, so a sandbox outlives its gateway
and a new one reattaches. containerd owns the container; the gateway owns the cgroup above it
(limits, OOM evidence) and the writable root (an overlay on a tmpfs; see ``spec.py``).

The runtime type is configurable: with ``io.containerd.runc.v2`` the very same driver runs
containers on the host kernel, which is how the tests exercise everything but the VM on a host
without Kata. Snapshots are not offered: containerd's checkpoint needs CRIU and Kata has none.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import ClassVar

import msgspec

from sandstorm.api.types import IsolationLevel, RuntimeCapabilities
from sandstorm.runtimes.base import HOST_ENV, Detection, RuntimeStartError, SandboxSpec, run_control
from sandstorm.runtimes.cgroups import Limits, SandboxCgroups
from sandstorm.runtimes.detection import first_executable, not_found, read_version
from sandstorm.runtimes.kata import spec as kata_spec
from sandstorm.runtimes.shimmed import ShimInstance, ShimmedRuntime
from sandstorm.shim import DEFAULT_JOURNAL_MAX

CONTROL_TIMEOUT_S = 15.0
DEFAULT_CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"


class ContainerdError(RuntimeStartError):
    pass


class KataRuntime(ShimmedRuntime):
    name = "kata"
    isolation_levels: ClassVar[tuple[IsolationLevel, ...]] = ("strong", "maximum")
    capabilities = RuntimeCapabilities(snapshot=False, exec=True, streaming=True, network=False)
    log_name = "ctr.log"
    # The container runtime binds each mount itself, read-only where the spec says so.
    guard_read_only_mounts = False

    def __init__(
        self,
        search_paths: list[str],
        data_dir: Path,
        cgroups: SandboxCgroups,
        *,
        runtime_type: str = kata_spec.KATA_RUNTIME_TYPE,
        address: str = DEFAULT_CONTAINERD_ADDRESS,
        journal_max: int = DEFAULT_JOURNAL_MAX,
        ctr_paths: tuple[str, ...] = ("ctr",),
    ) -> None:
        # Everything of this driver under one directory of its own, its shims too.
        self.root = data_dir / "containerd"
        super().__init__(
            cgroups, workdirs=self.root / "sandboxes", shim_root=self.root, journal_max=journal_max
        )
        self.search_paths = search_paths
        self.data_dir = data_dir
        self.state_root = self.root / "runc"
        self.runtime_type = runtime_type
        self.address = address
        self.ctr_paths = list(ctr_paths)
        self.gateway_tag = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
        self.ctr: str | None = None

    # ------------------------------------------------------------------ detection

    async def detect(self) -> Detection:
        ctr = first_executable(self.ctr_paths)
        if ctr is None:
            reason = f"ctr (containerd's client) {not_found(self.ctr_paths)} (PATH)"
            return Detection(False, None, None, reason)
        try:
            shim_name = kata_spec.shim_binary(self.runtime_type)
        except ValueError as exc:
            return Detection(False, None, None, str(exc))
        # containerd finds a runtime's shim on its PATH, which this one approximates.
        shim = first_executable([shim_name])
        if shim is None:
            return Detection(
                False, None, None,
                f"{shim_name} (runtime type {self.runtime_type}) not found on PATH",
            )  # fmt: skip
        shim_version = await read_version([shim, "-v"])
        if shim_version is not None and shim_version.endswith(":"):
            shim_version = None  # the runc shim's first line is just its name
        details = {"runtime_type": self.runtime_type, "containerd_address": self.address}
        if os.geteuid() != 0:
            return Detection(False, shim, shim_version, "containerd's runtimes need root")
        if "://" not in self.address and not os.path.exists(self.address):
            reason = f"containerd does not answer at {self.address}: no socket there"
            return Detection(False, shim, shim_version, reason, details)
        self.ctr = ctr
        try:
            server = await self._server_version()
        except ContainerdError as exc:
            self.ctr = None
            return Detection(False, shim, shim_version, str(exc), details)
        details["containerd"] = server
        if kata_spec.is_vm(self.runtime_type) and not os.path.exists("/dev/kvm"):
            self.ctr = None
            return Detection(False, shim, shim_version, "/dev/kvm does not exist", details)
        kata = first_executable(self.search_paths)
        if kata is not None:
            details["kata_runtime"] = kata
        for d in (self.workdirs, self.shims_dir, self.state_root):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        version = f"{shim_version or shim_name}; containerd {server}"
        return Detection(True, shim, version, None, details)

    async def _server_version(self) -> str:
        out = await self._ctr("version", check=True)
        lines = out.decode(errors="replace").splitlines()
        try:
            server = lines.index("Server:")
            return lines[server + 1].split(":", 1)[1].strip()
        except (ValueError, IndexError):
            raise ContainerdError(f"unexpected `ctr version` output: {lines[:6]}") from None

    def _ctr_prefix(self) -> list[str]:
        assert self.ctr is not None, "detect() first"
        return [self.ctr, "--address", self.address, "--namespace", kata_spec.NAMESPACE]

    async def _ctr(self, *args: str, check: bool = False) -> bytes:
        """A short ``ctr`` subcommand, bounded in time, output captured."""
        return await run_control(
            [*self._ctr_prefix(), "--connect-timeout", "2s", *args],
            name=f"ctr {args[0]}",
            env=HOST_ENV,
            timeout_s=CONTROL_TIMEOUT_S,
            error=ContainerdError,
            check=check,
            failed=f"containerd does not answer at {self.address}: ",
            tail=300,
        )

    # ------------------------------------------------------------------ lifecycle

    async def _boot(self, spec: SandboxSpec) -> ShimInstance:
        bundle = self._workdir(spec.sandbox_id)
        rootfs = kata_spec.mount_rootfs(spec.rootfs, bundle, spec.memory_limit)
        config = kata_spec.oci_spec(
            spec, rootfs, self.cgroups.runtime_path(spec.sandbox_id), self.runtime_type
        )
        spec_path = bundle / "spec.json"
        spec_path.write_bytes(msgspec.json.encode(config))
        (bundle / "fifo").mkdir(mode=0o700)
        argv = kata_spec.ctr_run_argv(
            self._ctr_prefix(),
            sandbox_id=spec.sandbox_id,
            spec_path=spec_path,
            runtime_type=self.runtime_type,
            fifo_dir=bundle / "fifo",
            gateway_tag=self.gateway_tag,
            runc_root=self.state_root,
        )
        return await self._spawn(spec.sandbox_id, argv)

    async def _stop_runtime(self, sandbox_id: str) -> list[str]:
        if self.ctr is None:
            return []
        if self._workdir(sandbox_id).exists() or sandbox_id in await self.list_containers():
            # Kill and delete the task; the foreground ``ctr run`` then sees the exit, removes
            # the container (--rm) and exits, and so does its shim.
            await self._ctr("task", "delete", "--force", sandbox_id)
            return [f"containerd task {sandbox_id}"]
        return []

    async def _free_runtime(self, sandbox_id: str) -> list[str]:
        if self.ctr is not None:
            # A ``ctr run`` that was killed (or never got that far) did not remove it.
            await self._ctr("task", "delete", "--force", sandbox_id)
            await self._ctr("containers", "delete", sandbox_id)
        return kata_spec.unmount_rootfs(self._workdir(sandbox_id))

    async def list_containers(self) -> set[str]:
        if self.ctr is None:
            return set()
        out = await self._ctr(
            "containers", "list", "--quiet",
            f'labels."{kata_spec.GATEWAY_LABEL}"=={self.gateway_tag}',
        )  # fmt: skip
        return {line.strip() for line in out.decode(errors="replace").splitlines() if line}

    async def _runtime_held(self) -> set[str]:
        return await self.list_containers()

    def host_limits(self, spec: SandboxSpec) -> Limits:
        return kata_spec.host_limits(spec, self.runtime_type)
