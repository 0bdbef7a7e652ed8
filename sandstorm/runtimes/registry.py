"""The runtime registry: which runtimes exist, what detection found, how fast each starts.

Adding a runtime: write ``runtimes/<name>.py`` implementing ``SandboxRuntime``, add one line to
``build_registry`` and its row in ``selection.SUPPORTED_LEVELS``.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from sandstorm.api.selection import LEVEL_DEFAULTS, SUPPORTED_LEVELS
from sandstorm.api.types import (
    RUNTIME_NAMES,
    RuntimeCapabilities,
    RuntimeInfo,
    RuntimeName,
)
from sandstorm.config import Config
from sandstorm.errors import RuntimeUnavailable
from sandstorm.runtimes import detection
from sandstorm.runtimes.base import Detection, SandboxRuntime
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.firecracker import FirecrackerRuntime
from sandstorm.runtimes.gvisor import GvisorRuntime
from sandstorm.runtimes.kata import KataRuntime
from sandstorm.runtimes.qemu import QemuRuntime

_NO_CAPABILITIES = RuntimeCapabilities(snapshot=False, exec=False, streaming=False, network=False)
_VM_CAPABILITIES: dict[RuntimeName, RuntimeCapabilities] = {
    "kata": RuntimeCapabilities(snapshot=False, exec=True, streaming=True, network=False),
    "firecracker": RuntimeCapabilities(snapshot=True, exec=True, streaming=True, network=False),
    "qemu": RuntimeCapabilities(snapshot=True, exec=True, streaming=True, network=False),
}
STARTUP_SAMPLES = 256


class RuntimeRegistry:
    def __init__(
        self,
        drivers: dict[RuntimeName, SandboxRuntime],
        detectors: dict[RuntimeName, Callable[[], Awaitable[Detection]]],
    ) -> None:
        self.drivers = drivers
        self.detectors = detectors
        self.detections: dict[RuntimeName, Detection] = {}
        self._startup_ms: dict[RuntimeName, deque[float]] = {
            n: deque(maxlen=STARTUP_SAMPLES) for n in RUNTIME_NAMES
        }
        self.detected = False

    async def detect_all(self) -> None:
        for name in RUNTIME_NAMES:
            driver = self.drivers.get(name)
            if driver is not None:
                self.detections[name] = await driver.detect()
            else:
                self.detections[name] = await self.detectors[name]()
        self.detected = True

    def unavailable(self) -> dict[RuntimeName, str]:
        """Reasons keyed by runtime, for ``selection.select_runtime``."""
        out: dict[RuntimeName, str] = {}
        for name in RUNTIME_NAMES:
            det = self.detections.get(name)
            if det is None:
                out[name] = "not detected yet"
            elif not det.available:
                out[name] = det.reason or "unavailable"
        return out

    def driver(self, name: RuntimeName) -> SandboxRuntime:
        det = self.detections.get(name)
        driver = self.drivers.get(name)
        if driver is None or det is None or not det.available:
            raise RuntimeUnavailable(
                f"runtime {name} is not available",
                runtime=name,
                reason=det.reason if det else "not detected",
            )
        return driver

    def record_startup(self, name: RuntimeName, ms: float) -> None:
        self._startup_ms[name].append(ms)

    def infos(self) -> list[RuntimeInfo]:
        infos = []
        for name in RUNTIME_NAMES:
            det = self.detections.get(name) or Detection(False, None, None, "not detected yet")
            driver = self.drivers.get(name)
            samples = self._startup_ms[name]
            infos.append(
                RuntimeInfo(
                    name=name,
                    available=det.available,
                    binary=det.binary,
                    version=det.version,
                    isolation_levels=list(SUPPORTED_LEVELS[name]),
                    default_for=[lv for lv, rt in LEVEL_DEFAULTS.items() if rt == name],
                    capabilities=(
                        driver.capabilities
                        if driver is not None
                        else _VM_CAPABILITIES.get(name, _NO_CAPABILITIES)
                    ),
                    reason=det.reason,
                    startup_ms_p50=round(statistics.median(samples), 1) if samples else None,
                )
            )
        return infos


def build_registry(config: Config, cgroups: SandboxCgroups | None = None) -> RuntimeRegistry:
    paths = config.runtime_paths
    data_dir = Path(config.data_dir)
    cgroups = cgroups or SandboxCgroups(config.cgroup_parent or "sandstorm")
    gvisor = GvisorRuntime(
        paths["gvisor"],
        data_dir,
        cgroups,
        journal_max=config.shim_journal_max,
        platform=config.gvisor_platform,
    )
    qemu = QemuRuntime(
        paths["qemu"], data_dir, config.image, cgroups, journal_max=config.shim_journal_max
    )
    firecracker = FirecrackerRuntime(
        paths["firecracker"],
        config.jailer_paths,
        data_dir,
        config.image,
        cgroups,
        uid=config.firecracker_uid,
        gid=config.firecracker_gid,
    )
    kata = KataRuntime(
        paths["kata"],
        data_dir,
        cgroups,
        runtime_type=config.kata_runtime_type,
        address=config.containerd_address,
        journal_max=config.shim_journal_max,
    )
    return RuntimeRegistry(
        drivers={"gvisor": gvisor, "qemu": qemu, "firecracker": firecracker, "kata": kata},
        detectors={
            "firecracker": lambda: detection.detect_firecracker(
                paths["firecracker"], config.jailer_paths
            ),
            "qemu": lambda: detection.detect_qemu(paths["qemu"]),
        },
    )
