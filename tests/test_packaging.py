"""A non-editable install (the Containerfile's `pip install .`) carries every file the package
reads at run time: the C sources it compiles on the host (the shim, the agent, the VM init, the
statx shim), the agent's zygote, the console's static files. Anything that is not a module of a
package must be package data."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Made at run time (bytecode, the compiled shim and agent), never shipped.
BUILT = ("__pycache__", "shim/bin", "agent/guest/bin")


def test_every_file_the_package_reads_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sandstorm"]
    package = ROOT / "sandstorm"
    missing = []
    for path in package.rglob("*"):
        relative = path.relative_to(package).as_posix()
        if not path.is_file() or relative.startswith(BUILT):
            continue
        if path.suffix == ".py" and (path.parent / "__init__.py").exists():
            continue  # a module of a package: shipped as such
        if "/__pycache__/" in f"/{relative}":
            continue
        if not any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
            missing.append(relative)
    assert missing == [], f"not package data in pyproject.toml: {missing}"
    assert any(fnmatch.fnmatch("shim/shim.c", pattern) for pattern in patterns)
    assert any(fnmatch.fnmatch("agent/src/main.c", pattern) for pattern in patterns)
    assert any(fnmatch.fnmatch("agent/src/agent.h", pattern) for pattern in patterns)
    assert any(fnmatch.fnmatch("agent/guest/zygote.py", pattern) for pattern in patterns)
