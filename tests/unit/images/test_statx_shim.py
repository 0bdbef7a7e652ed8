"""Bookworm's coreutils work inside a real runsc sandbox booted from the default image.

Debian's runsc (0.0~20221219) rejects ``statx(2)`` with AT_NO_AUTOMOUNT, which ``ls``, ``stat``
and friends always pass; without the image's statx shim ``ls -la /`` prints "cannot access '/':
Invalid argument". This runs them in a sandbox made from a minimal OCI bundle of its own, so it
checks the image and runsc only, not the gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sandstorm.images import image_rootfs, load_manifest

_DATA_DIR = Path(os.environ.get("SANDSTORM_TEST_DATA_DIR", "/var/lib/sandstorm"))
_CGROUP_PARENT = "sandstorm-shimtest"
_SCRIPT = "ls -la / && stat /tmp && ls -la /workspace && cp -a /etc/apt /tmp/apt && ls -l /tmp/apt"


def _unusable() -> str | None:
    if shutil.which("runsc") is None:
        return "runsc is not installed (run scripts/install.sh)"
    if os.geteuid() != 0:
        return "runsc sandboxes need root"
    if load_manifest(_DATA_DIR) is None:
        return f"no default image in {_DATA_DIR} (run `sandstorm image build`)"
    return None


pytestmark = [
    pytest.mark.runsc,
    pytest.mark.skipif(_unusable() is not None, reason=_unusable() or ""),
]


def _bundle(bundle: Path, cgroup: str) -> None:
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 1000, "gid": 1000},
            "args": ["sh", "-c", _SCRIPT],
            "env": ["PATH=/usr/bin:/bin", "HOME=/workspace", "LANG=C.UTF-8"],
            "cwd": "/workspace",
            "noNewPrivileges": True,
        },
        "root": {"path": str(image_rootfs(_DATA_DIR)), "readonly": False},
        "hostname": "statx-shim-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
        ],
        "linux": {
            "cgroupsPath": cgroup,
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        },
    }
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(config))


@pytest.fixture
def sandbox_id() -> Iterator[str]:
    sid = f"statx-{secrets.token_hex(4)}"
    yield sid
    # cgroup v1 has one hierarchy per controller, v2 a single one; remove ours from all.
    cgroup_root = Path("/sys/fs/cgroup")
    for parent in [cgroup_root / _CGROUP_PARENT, *cgroup_root.glob(f"*/{_CGROUP_PARENT}")]:
        for d in (parent / sid, parent):
            # Absent, or the parent still holds another test's sandbox.
            with contextlib.suppress(OSError):
                d.rmdir()


async def test_coreutils_stat_files_in_a_sandbox(tmp_path: Path, sandbox_id: str) -> None:
    bundle = tmp_path / "bundle"
    _bundle(bundle, f"/{_CGROUP_PARENT}/{sandbox_id}")
    runsc = ["runsc", "--root", str(tmp_path / "runsc-root"), "--network=none"]
    try:
        with trio.fail_after(60):
            result = await trio.run_process(
                [*runsc, "--overlay2=root:memory", "run", "-bundle", str(bundle), sandbox_id],
                capture_stdout=True,
                capture_stderr=True,
                stdin=subprocess.DEVNULL,
                check=False,
            )
    finally:
        with trio.move_on_after(30) as scope:
            scope.shield = True
            await trio.run_process(
                [*runsc, "delete", "-force", sandbox_id],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    out = result.stdout.decode("utf-8", "replace")
    err = result.stderr.decode("utf-8", "replace")
    assert "Invalid argument" not in out + err, err
    assert result.returncode == 0, f"status {result.returncode}\n{out}\n{err}"
    assert " workspace\n" in out  # `ls -la /` listed the root directory
    assert "File: /tmp" in out  # stat printed its report
    assert "sources.list.d" in out  # cp -a copied a tree that ls could list
