"""The runtime registry: which runtimes exist, what each declares, what detection found, how fast
each starts.

Adding a runtime: a package ``runtimes/<name>/`` whose runtime class declares its ``name``,
``isolation_levels`` and ``capabilities`` (``base.SandboxRuntime``), and its line in
``build_registry``. The selection rules read the declarations from here.
"""

from __future__ import annotations

import statistics
from collections import deque
from pathlib import Path

from sandstorm.api.selection import LEVEL_DEFAULTS, NoRuntime, Selected, select_runtime
from sandstorm.api.types import (
    RUNTIME_NAMES,
    IsolationLevel,
    RuntimeInfo,
    RuntimeName,
)
from sandstorm.config import Config
from sandstorm.errors import RuntimeUnavailable
from sandstorm.runtimes.base import Detection, SandboxRuntime
from sandstorm.runtimes.cgroups import SandboxCgroups
from sandstorm.runtimes.firecracker import FirecrackerRuntime
from sandstorm.runtimes.gvisor import GvisorRuntime
from sandstorm.runtimes.kata import KataRuntime
from sandstorm.runtimes.qemu import QemuRuntime

STARTUP_SAMPLES = 256


class RuntimeRegistry:
    def __init__(self, drivers: dict[RuntimeName, SandboxRuntime]) -> None:
        self.drivers = drivers
        #: What each runtime declares it supports, for the selection rules.
        self.supported: dict[RuntimeName, tuple[IsolationLevel, ...]] = {
            name: driver.isolation_levels for name, driver in drivers.items()
        }
        self.detections: dict[RuntimeName, Detection] = {}
        self._startup_ms: dict[RuntimeName, deque[float]] = {
            n: deque(maxlen=STARTUP_SAMPLES) for n in RUNTIME_NAMES
        }
        self.detected = False

    async def detect_all(self) -> None:
        for name in RUNTIME_NAMES:
            self.detections[name] = await self.drivers[name].detect()
        self.detected = True

    def select(self, level: IsolationLevel, preference: RuntimeName | None) -> Selected | NoRuntime:
        """The runtime for a request, by SPEC §1's rules over what the runtimes declare and
        what detection found (``selection.select_runtime``)."""
        return select_runtime(level, preference, self.unavailable(), supported=self.supported)

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
            driver = self.drivers[name]
            samples = self._startup_ms[name]
            infos.append(
                RuntimeInfo(
                    name=name,
                    available=det.available,
                    binary=det.binary,
                    version=det.version,
                    isolation_levels=list(driver.isolation_levels),
                    default_for=[lv for lv, rt in LEVEL_DEFAULTS.items() if rt == name],
                    capabilities=driver.capabilities,
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
        drivers={"gvisor": gvisor, "qemu": qemu, "firecracker": firecracker, "kata": kata}
    )
