"""Host directories mounted into sandboxes (SPEC §5, ``mounts``), against a real server with real
sandboxes (gVisor and QEMU): without an allow-list every mount is a 403 ``mount_not_allowed``;
sources outside it (symlinks out, ``..``, the data directory) are 403s naming the mount's index;
inside it, read-only and writable mounts work. No request in this module may ever get a 500.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import RunningGateway, never_500
from tests.web.test_errors import assert_error, run_body


async def test_no_allow_list_refuses_every_mount(g: RunningGateway, tmp_path: Path) -> None:
    assert g.config.mount_allow_list == []
    with trio.fail_after(g.seconds(20)):
        for source in ("/tmp", str(tmp_path), "/", "/nonexistent"):
            response = await g.run(
                **run_body(mounts=[{"source": source, "destination": "/workspace/data"}])
            )
            details = assert_error(response, 403, "mount_not_allowed")
            assert details["field"] == "mounts[0].source"


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "data.txt").write_text("original\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret\n")
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "escape-file").symlink_to(tmp_path / "outside" / "secret.txt")
    (root / "to-root").symlink_to("/")
    return root


async def test_mounts_outside_the_allow_list_are_403(
    start_gateway: Callable[..., Any], allowed: Path, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with start_gateway(mount_allow_list=[str(allowed)]) as gw:
            never_500(gw)
            sources = [
                str(tmp_path / "outside"),
                str(allowed / "escape"),
                str(allowed / "escape-file"),
                str(allowed / "to-root"),
                str(allowed / ".." / "outside"),
                "/",
                "/proc",
                "/proc/self/root",
                str(gw.data_dir),
                str(gw.data_dir / "sandboxes"),
                str(tmp_path),
            ]
            for source in sources:
                response = await gw.run(
                    **run_body(mounts=[{"source": source, "destination": "/workspace/data"}])
                )
                details = assert_error(response, 403, "mount_not_allowed")
                assert details["field"] == "mounts[0].source", source
            # The second mount is the bad one: its index is named.
            response = await gw.run(
                **run_body(
                    mounts=[
                        {"source": str(allowed), "destination": "/a"},
                        {"source": "/etc", "destination": "/b"},
                    ]
                )
            )
            assert assert_error(response, 403, "mount_not_allowed")["field"] == "mounts[1].source"
            # Inside the allow-list but missing: a 400, not a mount.
            response = await gw.run(
                **run_body(mounts=[{"source": str(allowed / "nope"), "destination": "/d"}])
            )
            assert_error(response, 400, "invalid_request", "mounts[0].source")


async def test_read_only_and_writable_mounts_work(
    start_gateway: Callable[..., Any], allowed: Path, sandbox_runtime: str
) -> None:
    writable = allowed / "rw"
    writable.mkdir()
    os.chmod(writable, 0o777)
    os.chmod(allowed / "data.txt", 0o666)  # writable by anyone on the host: only `ro` stops it
    with trio.fail_after(60 if sandbox_runtime == "gvisor" else 240):
        async with start_gateway(
            mount_allow_list=[str(allowed)], sandbox_runtime=sandbox_runtime
        ) as gw:
            never_500(gw)
            body = await gw.run_ok(
                command=["sh", "-c", "cat /workspace/ro/data.txt; "
                         "echo hacked > /workspace/ro/data.txt && echo WROTE; "
                         "echo new > /workspace/ro/new.txt && echo CREATED; "
                         "cat /workspace/ro/data.txt"],
                mounts=[{"source": str(allowed), "destination": "/workspace/ro"}],
                keep_alive=0,
            )  # fmt: skip
            result = body["result"]
            assert result["stdout"] == "original\noriginal\n", result
            assert "WROTE" not in result["stdout"] and "CREATED" not in result["stdout"]
            assert "Read-only file system" in result["stderr"], result
            assert (allowed / "data.txt").read_text() == "original\n"
            assert not (allowed / "new.txt").exists()

            body = await gw.run_ok(
                command=["sh", "-c", "echo written > /mnt/rw/out.txt && cat /mnt/rw/out.txt"],
                mounts=[{"source": str(writable), "destination": "/mnt/rw", "read_only": False}],
                keep_alive=0,
            )
            assert body["result"]["verdict"] == "ok", body
            assert body["result"]["stdout"] == "written\n"
            assert (writable / "out.txt").read_text() == "written\n"
