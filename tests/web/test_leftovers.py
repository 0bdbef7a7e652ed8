"""SPEC §3/§5: "Bad input never yields a 500, and never leaves anything behind".

What a sandbox can leave on the host, observed from outside the gateway: (a) runsc containers
under the gateway's state root, (b) bundle directories, (c) cgroup directories under the
gateway's cgroup parent, (d) runsc processes whose command line names the data directory.
Every check here runs well inside the reaper's 30 s interval, so the reaper cannot hide a leak.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from sandstorm.config import DEFAULT_RUNTIME_PATHS
from tests.harness import never_500
from tests.hoststate import CONTROLLERS, HostState, host_state, settled_state

MIB = 1024 * 1024


def assert_error_shape(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    return error


async def test_failed_creates_leave_nothing_behind(
    start_gateway: Callable[..., Any], tmp_path: Path, cgroup_parent: str
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "data.txt").write_text("x\n")
    (tmp_path / "outside").mkdir()
    (allowed / "escape").symlink_to(tmp_path / "outside")
    with trio.fail_after(90):
        # No VM runtime, so that "maximum" is a refused create (qemu may run VMs here).
        no_vms = {name: list(p) for name, p in DEFAULT_RUNTIME_PATHS.items()}
        no_vms["qemu"] = ["/nonexistent/qemu-system-x86_64"]
        async with start_gateway(
            mount_allow_list=[str(allowed)], max_sandboxes=2, runtime_paths=no_vms
        ) as gw:
            never_500(gw)
            assert gw.config.cgroup_parent == cgroup_parent
            # One sandbox alive throughout, so "before" is not trivially empty.
            keeper = await gw.run_ok(command=["true"])
            before = await host_state(gw.data_dir, cgroup_parent)
            assert before.mentioning(keeper["id"]), before
            assert keeper["id"] in before.containers and keeper["id"] in before.bundles

            def mount(source: str, destination: str = "/workspace/data") -> dict[str, Any]:
                return {"command": ["true"], "mounts": [{"source": source,
                                                         "destination": destination}]}  # fmt: skip

            failing: list[tuple[dict[str, Any], int, str]] = [
                ({"code": "x", "language": "cobol"}, 400, "invalid_request"),
                ({"command": ["true"], "runtime_preference": "docker"}, 400, "invalid_request"),
                ({"command": ["true"], "timeout": "5"}, 400, "invalid_request"),
                ({"command": ["true"], "memory_limit": True}, 400, "invalid_request"),
                ({"command": ["true"], "memory_limit": 32 * MIB - 1}, 400, "invalid_request"),
                ({"command": ["true"], "memory_limit": 1 << 40}, 400, "invalid_request"),
                ({"command": ["true"], "cpu_limit": 1000}, 400, "invalid_request"),
                ({"command": ["true"], "timeout": 1e308}, 400, "invalid_request"),
                ({"command": ["true"], "keep_alive": -1}, 400, "invalid_request"),
                ({"code": "1", "language": "python", "command": ["true"]}, 400, "invalid_request"),
                ({"code": "print(1)"}, 400, "invalid_request"),
                ({"command": ["true"], "environment": {"1BAD": "x"}}, 400, "invalid_request"),
                ({"command": ["true"], "environment": {"A": "\x00"}}, 400, "invalid_request"),
                ({"command": ["echo", "\x00"]}, 400, "invalid_request"),
                ({"command": ["true"], "timout": 1}, 400, "invalid_request"),
                ({"command": ["true"], "files": {"rel.txt": "x"}}, 400, "invalid_request"),
                (mount(str(allowed), "/proc/x"), 400, "invalid_request"),
                (mount(str(allowed), "/.sandstorm"), 400, "invalid_request"),
                (mount(str(allowed / "missing")), 400, "invalid_request"),
                (mount(str(tmp_path / "outside")), 403, "mount_not_allowed"),
                (mount(str(allowed / "escape")), 403, "mount_not_allowed"),
                (mount("/"), 403, "mount_not_allowed"),
                (mount(str(gw.data_dir)), 403, "mount_not_allowed"),
                ({"command": ["true"], "isolation_level": "maximum"}, 503, "runtime_unavailable"),
            ]
            for body, status, code in failing:
                response = await gw.run(**body)
                assert response.status_code == status, (body, response.text)
                assert assert_error_shape(response)["code"] == code

            raw_bodies = [b"", b"[]", b"{", b'{"code": "\\ud800", "language": "sh"}']
            for raw in raw_bodies:
                response = await gw.client.post(
                    "/v1/sandboxes/run",
                    content=raw,
                    headers={"content-type": "application/json"},
                )
                assert response.status_code == 400, (raw, response.text)

            # Failures after boot: the sandbox existed, so it must be torn down again.
            for files in (
                {"/etc/passwd": "root::0:0::/root:/bin/sh\n"},
                {"/workspace/ok.txt": "fine", "/proc/1/x": "no"},
                {"/workspace/ok.txt": "fine", "/usr/bin/python3": "no"},
            ):
                response = await gw.run(command=["true"], files=files)
                error = assert_error_shape(response)
                assert response.status_code == 400, response.text
                assert error["code"] == "invalid_request"
                assert error["details"]["field"].startswith("files."), error
            response = await gw.run(
                command=["true"],
                mounts=[{"source": str(allowed), "destination": "/workspace/ro"}],
                files={"/workspace/ro/new.txt": "into a read-only mount"},
            )
            assert response.status_code == 400, response.text
            assert not (allowed / "new.txt").exists()

            # At capacity: fill the second slot, be refused, free it again.
            second = await gw.run_ok(command=["true"])
            response = await gw.run(command=["true"])
            assert response.status_code == 503 and response.headers.get("retry-after")
            assert assert_error_shape(response)["code"] == "at_capacity"
            deleted = await gw.client.delete(f"/v1/sandboxes/{second['id']}")
            assert deleted.status_code == 200

            after = await settled_state(gw.data_dir, cgroup_parent, lambda s: s == before)
            assert after == before
            # The keeper is untouched by all that.
            response = await gw.client.post(
                f"/v1/sandboxes/{keeper['id']}/exec", json={"command": ["echo", "alive"]}
            )
            assert response.json()["result"]["stdout"] == "alive\n"


#: What a running sandbox holds on the host besides its cgroups, by runtime.
HELD_BY: dict[str, tuple[str, ...]] = {
    "gvisor": ("container", "bundle", "process"),
    "qemu": ("vm", "shim"),
}


async def test_delete_frees_everything_of_the_sandbox(
    start_gateway: Callable[..., Any], cgroup_parent: str, sandbox_runtime: str
) -> None:
    with trio.fail_after(60 if sandbox_runtime == "gvisor" else 180):
        async with start_gateway(sandbox_runtime=sandbox_runtime) as gw:
            never_500(gw)
            body = await gw.run_ok(command=["sh", "-c", "sleep 30 & echo started"], background=True)
            sid = body["id"]
            running = await host_state(gw.data_dir, cgroup_parent)
            held = running.mentioning(sid)
            for kind in HELD_BY[sandbox_runtime]:
                assert any(h.startswith(kind) for h in held), (kind, held)
            assert {f"{c}/{sid}" for c in CONTROLLERS} <= running.cgroups, running.cgroups

            response = await gw.client.delete(f"/v1/sandboxes/{sid}")
            assert response.status_code == 200, response.text
            after = await settled_state(gw.data_dir, cgroup_parent, lambda s: not s.mentioning(sid))
            assert after.mentioning(sid) == []
            assert after.is_empty(), after


async def test_shutdown_leaves_nothing_behind(
    start_gateway: Callable[..., Any], data_dir: Path, cgroup_parent: str, sandbox_runtime: str
) -> None:
    ids: list[str] = []
    with trio.fail_after(90 if sandbox_runtime == "gvisor" else 240):
        async with start_gateway(sandbox_runtime=sandbox_runtime) as gw:
            never_500(gw)
            for i in range(3):
                body = await gw.run_ok(
                    command=["sh", "-c", "sleep 60"] if i == 0 else ["true"], wait=i != 0
                )
                ids.append(body["id"])
            running = await host_state(gw.data_dir, cgroup_parent)
            for sid in ids:
                assert running.mentioning(sid), (sid, running)
        # The gateway is gone: leaving the block cancelled it, and it tore its sandboxes down.
        after = await settled_state(data_dir, cgroup_parent, HostState.is_empty)
    assert after.is_empty(), after


async def test_a_sandbox_that_never_boots_is_cut_at_the_boot_deadline_and_leaves_nothing(
    start_gateway: Callable[..., Any], data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    # A runsc whose `run` hangs before the sandbox exists: the shim starts and answers, the
    # agent never says HELLO. Everything else (detection, list) is the real runsc.
    hanging = tmp_path / "runsc"
    hanging.write_text(
        "#!/bin/sh\n"
        'for arg; do [ "$arg" = run ] && exec sleep 613.25; done\n'
        f'exec {shutil.which("runsc")} "$@"\n'
    )
    hanging.chmod(0o755)
    paths = {name: list(p) for name, p in DEFAULT_RUNTIME_PATHS.items()}
    paths["gvisor"] = [str(hanging)]
    paths["qemu"] = ["/nonexistent/qemu-system-x86_64"]
    with trio.fail_after(60):
        async with start_gateway(runtime_paths=paths, boot_timeout_s=3.0) as gw:
            never_500(gw)
            start = trio.current_time()
            response = await gw.run(command=["true"])
            assert 3.0 <= trio.current_time() - start < 10
            assert response.status_code == 503, response.text
            error = assert_error_shape(response)
            assert error["code"] == "runtime_unavailable"
            assert "did not boot within 3s" in error["message"], error
            after = await settled_state(data_dir, cgroup_parent, HostState.is_empty)
            assert after.is_empty(), after
            assert not any(b"sleep\x00613.25" in _cmdline(p) for p in os.listdir("/proc"))


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
