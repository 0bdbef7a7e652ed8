"""The shape the architecture keeps (docs/architecture.md): small modules, one-way imports, and a
test tree that mirrors the package, so a newcomer finds each thing where its name says."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sandstorm"
MAX_PYTHON_LINES = 500
MAX_C_LINES = 800
# Generated files are exempt from the size limits (none are Python or C today).
GENERATED: frozenset[Path] = frozenset()


def _tracked(pattern: str, *roots: str) -> list[Path]:
    found = []
    for root in roots:
        found += [p for p in (ROOT / root).rglob(pattern) if ".venv" not in p.parts]
    return sorted(p for p in found if p not in GENERATED)


def _line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def test_no_python_module_is_over_500_lines() -> None:
    big = {
        str(p.relative_to(ROOT)): n
        for p in _tracked("*.py", "sandstorm", "tests", "bench", "scripts")
        if (n := _line_count(p)) > MAX_PYTHON_LINES
    }
    assert big == {}, f"split these by concern (at most {MAX_PYTHON_LINES} lines): {big}"


def test_no_c_file_is_over_800_lines() -> None:
    sources = _tracked("*.c", "sandstorm") + _tracked("*.h", "sandstorm")
    big = {str(p.relative_to(ROOT)): n for p in sources if (n := _line_count(p)) > MAX_C_LINES}
    assert big == {}, f"split these by concern (at most {MAX_C_LINES} lines): {big}"


def test_imports_flow_one_way() -> None:
    """The contracts in pyproject.toml ([tool.importlinter]): the layers and the SDK's
    independence. import-linter also fails on any cycle that crosses a layer."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_no_two_test_modules_share_a_name() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in _tracked("test_*.py", "tests"):
        by_name[path.name].append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert shared == {}, shared


def test_unit_tests_mirror_the_package() -> None:
    """``tests/unit/<package>/test_<module>.py`` tests ``sandstorm/<package>/<module>``: a
    Python module, a subpackage, or a C source of that package (the agent, the shim)."""
    unit = ROOT / "tests" / "unit"
    strays = []
    for path in _tracked("test_*.py", "tests/unit"):
        package = PACKAGE / path.parent.relative_to(unit)
        subject = path.stem.removeprefix("test_")
        candidates = [package / f"{subject}.py", package / subject]
        candidates += list(package.rglob(f"{subject}.c")) if package.is_dir() else []
        if not any(c.exists() for c in candidates):
            strays.append(str(path.relative_to(ROOT)))
    assert strays == [], f"no module of that name where these sit: {strays}"
