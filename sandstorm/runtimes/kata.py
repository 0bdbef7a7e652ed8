"""Kata Containers through containerd: ``ctr run --runtime io.containerd.kata.v2``.

The same shape as the gVisor driver: one OCI spec per sandbox (the agent as PID 1 on the
container's stdio), and ``ctr run`` kept in the foreground of a per-sandbox shim
(``sandstorm/shim``) whose stdin/stdout are the agent channel, so a sandbox outlives its gateway
and a new one reattaches. containerd owns the container; the gateway owns the cgroup above it
(limits, OOM evidence) and the writable root (an overlay on a tmpfs; see ``kata_spec``).

The runtime type is configurable: with ``io.containerd.runc.v2`` the very same driver runs
containers on the host kernel, which is how the tests exercise everything but the VM on a host
without Kata. Snapshots are not offered: containerd's checkpoint needs CRIU and Kata has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from sandstorm.api.types import IsolationLevel, RuntimeCapabilities, RuntimeName
from sandstorm.ids import is_id
from sandstorm.runtimes import kata_spec
from sandstorm.runtimes.base import Detection, RuntimeStartError, SandboxSpec, run_control
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.detection import first_executable, not_found, read_version
from sandstorm.runtimes.gvisor import RUNSC_ENV, SHIM_EXIT_GRACE_S, GvisorRuntime
from sandstorm.shim import (
    DEFAULT_JOURNAL_MAX,
    ShimInstance,
    ShimPaths,
    attach,
    shim_paths,
    shim_process_ids,
    spawn_shim,
)

CONTROL_TIMEOUT_S = 15.0
DEFAULT_CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"


class ContainerdError(RuntimeStartError):
    pass


class KataRuntime(GvisorRuntime):
    """A :class:`GvisorRuntime` in its shim handling (surviving, reattach, ending a shim);
    everything that touches the runtime itself is containerd's here."""

    name: RuntimeName = "kata"
    isolation_levels: tuple[IsolationLevel, ...] = ("strong", "maximum")
    capabilities = RuntimeCapabilities(snapshot=False, exec=True, streaming=True, network=False)
    # A VM: the host cgroup holds the guest's RAM, so its peak says nothing about the exec.
    allocations_fail_at_limit = False

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
        super().__init__(search_paths, data_dir, cgroups, journal_max=journal_max)
        # Everything of this driver under one directory, apart from gVisor's: its shims too,
        # so neither driver ever takes the other's sandboxes for its own.
        self.root = data_dir / "containerd"
        self.state_root = self.root / "runc"
        self.sandboxes_dir = self.root / "sandboxes"
        self.shims_dir = self.root / "shims"
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
        for d in (self.sandboxes_dir, self.shims_dir, self.state_root):
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
            env=RUNSC_ENV,
            timeout_s=CONTROL_TIMEOUT_S,
            error=ContainerdError,
            check=check,
            failed=f"containerd does not answer at {self.address}: ",
            tail=300,
        )

    # ------------------------------------------------------------------ lifecycle

    def _log(self, sandbox_id: str) -> Path:
        return self._bundle_dir(sandbox_id) / "ctr.log"

    def _shim_paths(self, sandbox_id: str) -> ShimPaths:
        return shim_paths(self.root, sandbox_id)

    async def _spawn_argv(self, sandbox_id: str, argv: list[str], log: Path) -> ShimInstance:
        """Start the shim that runs ``argv`` (``ctr run``) and attach to it."""
        paths = self._shim_paths(sandbox_id)
        # ctr sees only PATH; the shim runs in a session of its own (see GvisorRuntime._spawn).
        process = await spawn_shim(
            paths, argv, env=RUNSC_ENV, journal_max=self.journal_max, log_path=log
        )
        try:
            stream, handshake = await attach(paths, 0, just_started=True)
        except BaseException:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
            raise
        return ShimInstance(
            paths, stream, handshake, log, process=process, ack_every=self._ack_every
        )

    async def reattach(self, sandbox_id: str, offset: int) -> ShimInstance:
        instance = await super().reattach(sandbox_id, offset)
        instance.log_path = self._log(sandbox_id)
        return instance

    async def start(self, spec: SandboxSpec) -> ShimInstance:
        try:
            self.cgroups.create(spec.sandbox_id, kata_spec.host_limits(spec, self.runtime_type))
            bundle = self._bundle_dir(spec.sandbox_id)
            bundle.mkdir(mode=0o700)  # a fresh random id: one that exists is refused
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
            return await self._spawn_argv(spec.sandbox_id, argv, self._log(spec.sandbox_id))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy(spec.sandbox_id)
            raise

    async def checkpoint(self, spec: SandboxSpec, image_dir: Path) -> None:
        raise RuntimeStartError("the kata runtime does not offer snapshots")

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> ShimInstance:
        raise RuntimeStartError("the kata runtime does not offer snapshots")

    async def destroy(self, sandbox_id: str) -> list[str]:
        released: list[str] = []
        bundle = self._bundle_dir(sandbox_id)
        if self.ctr is not None and (bundle.exists() or sandbox_id in await self.list_containers()):
            # Kill and delete the task; the foreground ``ctr run`` then sees the exit, removes
            # the container (--rm) and exits, and so does its shim.
            await self._ctr("task", "delete", "--force", sandbox_id)
            released.append(f"containerd task {sandbox_id}")
        released += await self._end_shim(self._shim_paths(sandbox_id), grace=SHIM_EXIT_GRACE_S)
        if self.ctr is not None:
            # A ``ctr run`` that was killed (or never got that far) did not remove it.
            await self._ctr("task", "delete", "--force", sandbox_id)
            await self._ctr("containers", "delete", sandbox_id)
        released += kata_spec.unmount_rootfs(bundle)
        released += await self.cgroups.release(sandbox_id, tries=20)
        if bundle.exists():
            if left := kata_spec.mounts_under(bundle):
                # Never remove a tree with something mounted in it.
                raise RuntimeStartError(f"still mounted under {bundle}: {left}")
            await trio.to_thread.run_sync(shutil.rmtree, bundle)
            released.append(f"bundle directory {bundle}")
        return released

    async def list_containers(self) -> set[str]:
        if self.ctr is None:
            return set()
        out = await self._ctr(
            "containers", "list", "--quiet",
            f'labels."{kata_spec.GATEWAY_LABEL}"=={self.gateway_tag}',
        )  # fmt: skip
        return {line.strip() for line in out.decode(errors="replace").splitlines() if line}

    async def list_orphans(self, live: Callable[[], set[str]]) -> list[str]:
        held: set[str] = set()
        held |= await self.list_containers()
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.sandboxes_dir.iterdir()}
        with contextlib.suppress(OSError):
            held |= {p.name for p in self.shims_dir.iterdir()}
        held |= set(await trio.to_thread.run_sync(shim_process_ids, self.shims_dir))
        # Who is live is asked only now, after the last await (see GvisorRuntime).
        return sorted(i for i in held - live() if is_id(i, "sbx"))

    def host_memory(self, spec: SandboxSpec) -> int:
        return kata_spec.host_limits(spec, self.runtime_type).memory_bytes
