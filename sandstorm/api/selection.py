"""The runtime selection rules of SPEC §1, as one pure function.

The support matrix lives here too: adding a runtime means one row in ``SUPPORTED_LEVELS`` and, if
it should be tried as a fallback, its place in ``FALLBACK_ORDER``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sandstorm.api.types import IsolationLevel, RuntimeName, SelectionReason

SUPPORTED_LEVELS: Mapping[RuntimeName, tuple[IsolationLevel, ...]] = {
    "gvisor": ("standard", "strong"),
    "kata": ("strong", "maximum"),
    "firecracker": ("maximum",),
    "qemu": ("strong", "maximum"),
}
LEVEL_DEFAULTS: Mapping[IsolationLevel, RuntimeName] = {
    "standard": "gvisor",
    "strong": "kata",
    "maximum": "firecracker",
}
FALLBACK_ORDER: tuple[RuntimeName, ...] = ("gvisor", "kata", "firecracker", "qemu")


@dataclass(frozen=True, slots=True)
class Selected:
    runtime: RuntimeName
    reason: SelectionReason


@dataclass(frozen=True, slots=True)
class NoRuntime:
    """Nothing can serve the level; ``candidates`` says why each runtime was not usable."""

    level: IsolationLevel
    candidates: Mapping[RuntimeName, str]


def select_runtime(
    level: IsolationLevel,
    preference: RuntimeName | None,
    unavailable: Mapping[RuntimeName, str],
) -> Selected | NoRuntime:
    """Pick the runtime for a request.

    ``unavailable`` maps each runtime that cannot be used right now to the reason; a runtime not
    in it is available. Never returns a runtime that does not list ``level``.
    """

    def usable(name: RuntimeName) -> bool:
        return name not in unavailable and level in SUPPORTED_LEVELS[name]

    if preference is not None and usable(preference):
        return Selected(preference, "preference")
    default = LEVEL_DEFAULTS[level]
    if usable(default):
        return Selected(default, "default")
    for name in FALLBACK_ORDER:
        if usable(name):
            return Selected(name, "fallback")
    candidates: dict[RuntimeName, str] = {}
    for name in FALLBACK_ORDER:
        if level not in SUPPORTED_LEVELS[name]:
            candidates[name] = f"does not support isolation level {level!r}"
        else:
            candidates[name] = unavailable[name]
    return NoRuntime(level, candidates)
