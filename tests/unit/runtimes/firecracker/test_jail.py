"""The jailer's command line (``firecracker/jail.py``) against Firecracker's docs/jailer.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sandstorm.api.types import MIB
from sandstorm.runtimes.cgroups import Limits
from sandstorm.runtimes.firecracker import api as fapi
from sandstorm.runtimes.firecracker.jail import jail_id, jailer_argv, sandbox_id_of
from tests.unit.runtimes.firecracker.test_api import SPEC

JAILER_FLAGS = {  # docs/jailer.md, "Jailer Usage"
    "--id", "--exec-file", "--uid", "--gid", "--parent-cgroup", "--cgroup-version", "--cgroup",
    "--chroot-base-dir", "--netns", "--resource-limit", "--daemonize", "--new-pid-ns",
}  # fmt: skip


VALUELESS = {"--daemonize", "--new-pid-ns"}


@pytest.mark.parametrize("v2", [False, True])
def test_jailer_argv_follows_the_jailer_docs(v2: bool) -> None:
    limits = Limits(cpu=1.5, memory_bytes=576 * MIB, pids=64)
    argv = jailer_argv(
        "/usr/local/bin/jailer",
        "/usr/local/bin/firecracker",
        jail_id(SPEC.sandbox_id),
        uid=65534,
        gid=65534,
        chroot_base=Path("/var/lib/sandstorm/firecracker/jail"),
        parent_cgroup=f"sandstorm-abc/{SPEC.sandbox_id}",
        limits=limits,
        cgroup_v2=v2,
    )
    split = argv.index("--")
    jailer, firecracker = argv[1:split], argv[split + 1 :]
    options: dict[str, list[str]] = {}
    i = 0
    while i < len(jailer):
        flag = jailer[i]
        assert flag in JAILER_FLAGS, flag
        value = "" if flag in VALUELESS else jailer[i + 1]
        options.setdefault(flag, []).append(value)
        i += 1 if flag in VALUELESS else 2
    for required in ("--id", "--exec-file", "--uid", "--gid"):
        assert len(options[required]) == 1
    # "alphanumeric characters and hyphens", at most 64
    assert re.fullmatch(r"[A-Za-z0-9-]{1,64}", options["--id"][0])
    assert sandbox_id_of(options["--id"][0]) == SPEC.sandbox_id
    # "The filename must include the string `firecracker`"
    assert "firecracker" in os.path.basename(options["--exec-file"][0])
    assert options["--cgroup-version"] == ["2" if v2 else "1"]
    assert not os.path.isabs(options["--parent-cgroup"][0])  # "a relative path"
    cgroups = dict(c.split("=", 1) for c in options["--cgroup"])
    for name in cgroups:  # "<cgroup_file>=<value>", the file being <controller>.<property>
        assert len(name.split(".")) == 2, name
    if v2:
        assert cgroups == {
            "memory.max": str(576 * MIB),
            "cpu.max": "150000 100000",
            "pids.max": "64",
        }
    else:
        assert cgroups["memory.limit_in_bytes"] == str(576 * MIB)
        assert cgroups["cpu.cfs_quota_us"] == "150000"
        assert cgroups["cpu.cfs_period_us"] == "100000"
    assert "--daemonize" not in options and "--netns" not in options
    # Firecracker's own flags after "--": its API socket in the chroot, seccomp as shipped.
    assert firecracker == ["--api-sock", f"/{fapi.API_SOCKET}"]
