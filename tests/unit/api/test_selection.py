"""SPEC §1 selection rules, checked exhaustively against an independent reading of the SPEC.

Every isolation level x every preference (none and the four runtimes) x every subset of available
runtimes: 3 x 5 x 16 = 240 cases. The expected function below is written from the SPEC text
only (it does not import the fallback order from ``sandstorm.api.selection``). The support matrix
is data the selection function is given: here the SPEC's table, and the runtimes' own
declarations are checked to equal it.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import pytest

from sandstorm.api.selection import NoRuntime, Selected, select_runtime
from sandstorm.api.types import RUNTIME_NAMES, RuntimeCapabilities
from sandstorm.config import load_config
from sandstorm.runtimes.firecracker import FirecrackerRuntime
from sandstorm.runtimes.gvisor import GvisorRuntime
from sandstorm.runtimes.kata import KataRuntime
from sandstorm.runtimes.qemu import QemuRuntime
from sandstorm.runtimes.registry import build_registry

# SPEC §1, the runtime table: "isolation levels it supports".
SPEC_LEVELS: dict[str, set[str]] = {
    "gvisor": {"standard", "strong"},
    "kata": {"strong", "maximum"},
    "firecracker": {"maximum"},
    "qemu": {"strong", "maximum"},
}
# The same table, "snapshots": Kata's are "not offered (422)".
SPEC_SNAPSHOTS = {"gvisor": True, "kata": False, "firecracker": True, "qemu": True}
# Rule 2: "standard → gvisor, strong → kata, maximum → firecracker".
SPEC_DEFAULTS = {"standard": "gvisor", "strong": "kata", "maximum": "firecracker"}
# Rule 3: "in the order gvisor, kata, firecracker, qemu".
SPEC_ORDER = ["gvisor", "kata", "firecracker", "qemu"]
LEVELS = ["standard", "strong", "maximum"]
PREFERENCES: list[str | None] = [None, "gvisor", "kata", "firecracker", "qemu"]
SUBSETS: list[frozenset[str]] = [
    frozenset(combo) for n in range(5) for combo in itertools.combinations(SPEC_ORDER, n)
]


select = functools.partial(select_runtime, supported=SPEC_LEVELS)


def expected(
    level: str, preference: str | None, available: frozenset[str]
) -> tuple[str, str] | None:
    """(runtime, reason) per SPEC rules 1-3, or None for rule 4."""

    def can_serve(name: str) -> bool:
        return name in available and level in SPEC_LEVELS[name]

    # Rule 1: a preference that is available and supports the level wins.
    if preference is not None and can_serve(preference):
        return preference, "preference"
    # Rule 2: the level's default.
    if can_serve(SPEC_DEFAULTS[level]):
        return SPEC_DEFAULTS[level], "default"
    # Rule 3: the first other available runtime that supports the level.
    for name in SPEC_ORDER:
        if can_serve(name):
            return name, "fallback"
    return None


def unavailable_map(available: frozenset[str]) -> dict[Any, str]:
    return {name: f"reason-for-{name}" for name in SPEC_ORDER if name not in available}


CASES = [
    pytest.param(
        level,
        pref,
        avail,
        id=f"{level}-pref={pref or 'none'}-avail={'+'.join(sorted(avail)) or 'nothing'}",
    )
    for level in LEVELS
    for pref in PREFERENCES
    for avail in SUBSETS
]


def test_the_table_has_every_combination() -> None:
    assert len(SUBSETS) == 16 and len(set(SUBSETS)) == 16
    assert len(CASES) == 240


@pytest.mark.parametrize(("level", "preference", "available"), CASES)
def test_selection_matches_the_spec(
    level: str, preference: str | None, available: frozenset[str]
) -> None:
    unavailable = unavailable_map(available)
    got = select(level, preference, unavailable)  # type: ignore[arg-type]
    want = expected(level, preference, available)
    if want is None:
        assert isinstance(got, NoRuntime), got
        assert got.level == level
        # Rule 4: every runtime is listed, each with why it could not be used.
        assert set(got.candidates) == set(SPEC_ORDER)
        for name, reason in got.candidates.items():
            assert isinstance(reason, str) and reason.strip(), (name, reason)
            if level in SPEC_LEVELS[name]:
                # It supports the level, so it was refused for being unavailable: say why.
                assert unavailable[name] in reason, (name, reason)
            else:
                assert level in reason, (name, reason)
    else:
        assert isinstance(got, Selected), got
        assert (got.runtime, got.reason) == want
        # Never a runtime that does not list the level, never one that is unavailable.
        assert level in SPEC_LEVELS[got.runtime]
        assert got.runtime in available


def test_selection_is_pure() -> None:
    unavailable: dict[Any, str] = {"kata": "gone", "qemu": "gone"}
    snapshot = dict(unavailable)
    first = select("strong", "qemu", unavailable)
    second = select("strong", "qemu", unavailable)
    assert first == second
    assert unavailable == snapshot


# ----------------------------------------------------------------------- literal spot checks


def _down(*names: str) -> dict[Any, str]:
    return {n: f"{n} is not installed" for n in names}


def test_maximum_with_only_gvisor_is_no_runtime() -> None:
    got = select("maximum", None, _down("kata", "firecracker", "qemu"))
    assert isinstance(got, NoRuntime)
    assert got.level == "maximum"
    assert set(got.candidates) == {"gvisor", "kata", "firecracker", "qemu"}
    assert "maximum" in got.candidates["gvisor"]
    assert got.candidates["kata"] == "kata is not installed"
    assert got.candidates["firecracker"] == "firecracker is not installed"
    assert got.candidates["qemu"] == "qemu is not installed"


def test_maximum_preferring_gvisor_still_never_picks_gvisor() -> None:
    assert isinstance(select("maximum", "gvisor", _down("kata", "firecracker", "qemu")), NoRuntime)
    assert select("maximum", "gvisor", _down("firecracker")) == Selected("kata", "fallback")


def test_strong_without_kata_falls_back_to_gvisor() -> None:
    assert select("strong", None, _down("kata")) == Selected("gvisor", "fallback")
    assert select("strong", None, _down("kata", "firecracker", "qemu")) == Selected(
        "gvisor", "fallback"
    )


def test_strong_preferring_available_qemu_uses_it() -> None:
    assert select("strong", "qemu", {}) == Selected("qemu", "preference")
    assert select("strong", "qemu", _down("kata")) == Selected("qemu", "preference")


def test_strong_preferring_unavailable_qemu_uses_the_default() -> None:
    assert select("strong", "qemu", _down("qemu")) == Selected("kata", "default")


def test_preference_for_a_runtime_without_the_level_is_ignored() -> None:
    assert select("standard", "firecracker", {}) == Selected("gvisor", "default")
    assert select("standard", "kata", {}) == Selected("gvisor", "default")
    assert select("strong", "firecracker", {}) == Selected("kata", "default")


def test_preference_naming_the_default_says_preference() -> None:
    assert select("standard", "gvisor", {}) == Selected("gvisor", "preference")
    assert select("standard", None, {}) == Selected("gvisor", "default")


def test_standard_without_gvisor_has_no_runtime() -> None:
    got = select("standard", "qemu", _down("gvisor"))
    assert isinstance(got, NoRuntime)
    assert got.candidates["gvisor"] == "gvisor is not installed"
    for name in ("kata", "firecracker", "qemu"):
        assert "standard" in got.candidates[name]


def test_maximum_without_firecracker_falls_back_to_kata_then_qemu() -> None:
    assert select("maximum", None, _down("firecracker")) == Selected("kata", "fallback")
    assert select("maximum", None, _down("firecracker", "kata")) == Selected("qemu", "fallback")
    assert select("maximum", None, {}) == Selected("firecracker", "default")


# ----------------------------------------------------------------------- the declarations


def test_each_runtime_declares_the_spec_matrix() -> None:
    classes = (GvisorRuntime, KataRuntime, FirecrackerRuntime, QemuRuntime)
    assert tuple(cls.name for cls in classes) == RUNTIME_NAMES
    for cls in classes:
        assert set(cls.isolation_levels) == SPEC_LEVELS[cls.name], cls.name
        assert len(cls.isolation_levels) == len(set(cls.isolation_levels)), cls.name
        assert cls.capabilities == RuntimeCapabilities(
            snapshot=SPEC_SNAPSHOTS[cls.name], exec=True, streaming=True, network=False
        ), cls.name


def test_the_registry_selects_by_the_declarations(tmp_path: Path) -> None:
    registry = build_registry(load_config(None, data_dir=str(tmp_path)))
    assert {name: set(levels) for name, levels in registry.supported.items()} == SPEC_LEVELS
    for name, driver in registry.drivers.items():
        assert driver.name == name
    # Nothing detected yet: every runtime is unavailable, with that as the reason.
    got = registry.select("maximum", "gvisor")
    assert isinstance(got, NoRuntime)
    assert got.candidates == {
        "gvisor": "does not support isolation level 'maximum'",
        "kata": "not detected yet",
        "firecracker": "not detected yet",
        "qemu": "not detected yet",
    }
