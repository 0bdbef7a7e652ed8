"""The runtime selection rules of SPEC §1, as one pure function.

Which levels each runtime supports is not written here: every runtime declares its own
(``isolation_levels`` on its class), and the registry passes those declarations in as
``supported``. The rules themselves (each level's default, the fallback order) live here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from sandstorm.api.types import IsolationLevel, RuntimeName, SelectionReason

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
    *,
    supported: Mapping[RuntimeName, Collection[IsolationLevel]],
) -> Selected | NoRuntime:
    """Pick the runtime for a request.

    ``unavailable`` maps each runtime that cannot be used right now to the reason; a runtime not
    in it is available. ``supported`` maps each runtime to the isolation levels it declares.
    Never returns a runtime that does not list ``level``.
    """

    def lists_level(name: RuntimeName) -> bool:
        return level in supported.get(name, ())

    def usable(name: RuntimeName) -> bool:
        return name not in unavailable and lists_level(name)

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
        if not lists_level(name):
            candidates[name] = f"does not support isolation level {level!r}"
        else:
            candidates[name] = unavailable[name]
    return NoRuntime(level, candidates)
