"""The VM tier through the API: ``strong`` and ``maximum`` served by real QEMU microVMs (TCG where
there is no KVM), with exec, streaming, stdin, signals, timeouts, the memory limit, snapshots and
resume. Every boot costs seconds under TCG, so each test does several things in one VM."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from tests.conftest import VM_OVERRIDES, require, vm_image_missing
from tests.harness import RunningGateway
from tests.hoststate import host_state
from tests.web.test_stream import collect_until_exit, next_frame

T = 180


@pytest.fixture
async def qgw(start_gateway: Callable[..., Any]) -> AsyncIterator[RunningGateway]:
    """A gateway whose requests without a level are served by qemu (and that fails the test
    at once when qemu cannot run here)."""
    async with start_gateway(sandbox_runtime="qemu") as running:
        yield running


async def _exec(gw: RunningGateway, sid: str, script: str, **body: Any) -> dict[str, Any]:
    response = await gw.client.post(
        f"/v1/sandboxes/{sid}/exec", json={"command": ["sh", "-c", script], **body}
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["result"]
    return result


async def test_maximum_and_strong_run_in_a_microvm(qgw: RunningGateway) -> None:
    with trio.fail_after(T):
        info = {r["name"]: r for r in (await qgw.client.get("/v1/runtimes")).json()}["qemu"]
        assert info["isolation_levels"] == ["strong", "maximum"]
        assert "accel tcg" in info["version"] or "accel kvm" in info["version"]

        # maximum: kata and firecracker are missing here, so selection falls back to qemu.
        body = await qgw.run_ok(
            code="import os; print('hello from', os.uname().release, os.getuid())",
            language="python",
            isolation_level="maximum",
            keep_alive=0,
        )
        assert (body["runtime"], body["selection"]) == ("qemu", "fallback")
        assert body["result"]["verdict"] == "ok", body
        # A real Linux kernel (Debian's), not gVisor's emulated one; the agent runs as 1000.
        assert body["result"]["stdout"].startswith("hello from 6.")
        assert body["result"]["stdout"].endswith(" 1000\n")
        await qgw.wait_state(body["id"], "destroyed")
        assert not (await host_state(qgw.data_dir, qgw.config.cgroup_parent or "")).mentioning(
            body["id"]
        )

        # strong defaults to gVisor here; asking for qemu gets a VM.
        body = await qgw.run_ok(
            code="grep NoNewPrivs /proc/self/status; cat /proc/net/dev | tail -n +3 | cut -d: -f1",
            language="bash",
            isolation_level="strong",
            runtime_preference="qemu",
        )
        assert (body["runtime"], body["selection"]) == ("qemu", "preference")
        result = body["result"]
        assert result["verdict"] == "ok", result
        # no_new_privs, and no network interface at all: only loopback.
        assert result["stdout"].split() == ["NoNewPrivs:", "1", "lo"]


async def test_exec_stream_stdin_signals_and_timeout(qgw: RunningGateway) -> None:
    program = (
        "import sys\nfor line in sys.stdin:\n    print('echo:', line.strip()[::-1], flush=True)\n"
    )
    with trio.fail_after(T):
        body = await qgw.run_ok(command=["true"], isolation_level="maximum", keep_alive=120)
        sid = body["id"]
        assert body["runtime"] == "qemu"
        async with qgw.stream(sid) as ws:
            await ws.send_message(
                json.dumps({"type": "exec", "code": program, "language": "python"})
            )
            exec_id = (await next_frame(ws, "exec_accepted"))["exec_id"]
            for word in ("hello", "microvm"):
                await ws.send_message(
                    json.dumps({"type": "stdin", "exec_id": exec_id, "data": word + "\n"})
                )
                reply = ""
                while not reply.endswith("\n"):
                    reply += (await next_frame(ws, "stdout"))["data"]
                assert reply == f"echo: {word[::-1]}\n"
            await ws.send_message(json.dumps({"type": "stdin_close", "exec_id": exec_id}))
            assert (await collect_until_exit(ws, exec_id))[-1]["result"]["verdict"] == "ok"

            await ws.send_message(json.dumps({"type": "exec", "command": ["sleep", "60"]}))
            exec_id = (await next_frame(ws, "exec_accepted"))["exec_id"]
            await trio.sleep(0.5)
            await ws.send_message(
                json.dumps({"type": "signal", "exec_id": exec_id, "signal": "SIGTERM"})
            )
            done = (await collect_until_exit(ws, exec_id))[-1]["result"]
            assert (done["signal"], done["verdict"]) == (15, "killed")

        timed = await _exec(qgw, sid, "echo start; sleep 60", timeout=1500)
        assert timed["verdict"] == "timeout", timed
        assert timed["stdout"] == "start\n"
        # The VM is still there and serves the next exec.
        assert (await _exec(qgw, sid, "echo still here"))["stdout"] == "still here\n"
        response = await qgw.client.delete(f"/v1/sandboxes/{sid}")
        assert response.status_code == 200, response.text
        assert not (await host_state(qgw.data_dir, qgw.config.cgroup_parent or "")).mentioning(sid)


async def test_memory_limit_is_the_guest_ram(qgw: RunningGateway) -> None:
    hog = "b = []\nwhile True:\n    b.append(bytearray(16 << 20))\n"
    with trio.fail_after(T):
        body = await qgw.run_ok(
            code=hog,
            language="python",
            isolation_level="maximum",
            memory_limit=256 << 20,
            keep_alive=120,
        )
        sid = body["id"]
        result = body["result"]
        # The guest kernel has no more than memory_limit of RAM; its OOM killer ends the hog,
        # the agent sees the guest's oom_kill counter move: verdict oom, not killed.
        assert (result["verdict"], result["signal"]) == ("oom", 9), body
        # Only the hog died: the VM serves the next exec.
        after = await _exec(qgw, sid, "echo still here")
        assert (after["verdict"], after["stdout"]) == ("ok", "still here\n"), after
        response = await qgw.client.delete(f"/v1/sandboxes/{sid}")
        assert response.status_code == 200, response.text


async def test_snapshot_leave_running_then_resume(qgw: RunningGateway) -> None:
    counter = (
        "import os, time\nc = 0\nwhile True:\n    c += 1\n"
        "    open('/tmp/count.tmp', 'w').write(str(c))\n"
        "    os.rename('/tmp/count.tmp', '/tmp/count')\n    time.sleep(0.1)\n"
    )
    with trio.fail_after(T):
        body = await qgw.run_ok(
            command=["sh", "-c", 'python3 -c "$PROG" >/dev/null 2>&1 & echo started'],
            environment={"PROG": counter},
            background=True,
            isolation_level="maximum",
            keep_alive=120,
        )
        sid = body["id"]
        await _exec(
            qgw, sid, "echo kept > /workspace/note; while [ ! -s /tmp/count ]; do sleep 0.1; done"
        )
        response = await qgw.client.post(f"/v1/sandboxes/{sid}/snapshot")
        assert response.status_code == 201, response.text
        snapshot_id = response.json()["snapshot_id"]
        assert (await qgw.status(sid))["state"] in ("idle", "running")
        before = int((await _exec(qgw, sid, "cat /tmp/count"))["stdout"])
        await trio.sleep(0.5)
        assert int((await _exec(qgw, sid, "cat /tmp/count"))["stdout"]) > before

        response = await qgw.client.post("/v1/sandboxes/resume", json={"snapshot_id": snapshot_id})
        assert response.status_code == 201, response.text
        resumed = response.json()
        assert resumed["restored_from"] == snapshot_id and resumed["state"] == "idle"
        rid = resumed["id"]
        assert (await _exec(qgw, rid, "cat /workspace/note"))["stdout"] == "kept\n"
        first = int((await _exec(qgw, rid, "cat /tmp/count"))["stdout"])
        await trio.sleep(0.5)
        assert int((await _exec(qgw, rid, "cat /tmp/count"))["stdout"]) > first
        for victim in (sid, rid):
            response = await qgw.client.delete(f"/v1/sandboxes/{victim}")
            assert response.status_code == 200, response.text


async def test_mounts_are_shared_directories_and_block_snapshots(
    start_gateway: Callable[..., Any], tmp_path: Any
) -> None:
    """Mounts reach a VM as virtio-9p exports (the read/write behaviour is the API test
    ``test_read_only_and_writable_mounts_work``, which runs on qemu too); here, what is
    particular to them: files cannot be exported, and a VM with exports cannot be snapshotted."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "data.txt").write_text("shared\n")
    with trio.fail_after(T):
        async with start_gateway(mount_allow_list=[str(allowed)], sandbox_runtime="qemu") as gw:
            file_mount = {"source": str(allowed / "data.txt"), "destination": "/workspace/f"}
            response = await gw.run(command=["true"], mounts=[file_mount])
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "runtime_unavailable", error
            assert "directories only" in error["message"], error
            assert (await host_state(gw.data_dir, gw.config.cgroup_parent or "")).is_empty()

            body = await gw.run_ok(
                command=["cat", "/workspace/data/data.txt"],
                mounts=[{"source": str(allowed), "destination": "/workspace/data"}],
                keep_alive=120,
            )
            assert body["runtime"] == "qemu" and body["result"]["stdout"] == "shared\n", body
            sid = body["id"]
            # QEMU cannot migrate a VM with a 9p export mounted: refused up front, 422, and the
            # sandbox goes on as it was.
            response = await gw.client.post(f"/v1/sandboxes/{sid}/snapshot")
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "snapshot_unsupported"
            assert (await gw.status(sid))["state"] == "idle"
            assert (await _exec(gw, sid, "cat /workspace/data/data.txt"))["stdout"] == "shared\n"
            response = await gw.client.delete(f"/v1/sandboxes/{sid}")
            assert response.status_code == 200, response.text
            freed = response.json()
            assert any("read-only mount" in item for item in freed["released"]), freed
            assert not (await host_state(gw.data_dir, gw.config.cgroup_parent or "")).mentioning(
                sid
            )


async def test_admission_counts_the_vmm_memory(start_gateway: Callable[..., Any]) -> None:
    """A VM costs the host its RAM plus QEMU's own memory: the memory budget reserves both, so
    VMs cannot overcommit it (refused before anything boots)."""
    require(vm_image_missing())
    async with start_gateway(memory_budget=320 * 1024 * 1024, **VM_OVERRIDES) as gw:
        with trio.fail_after(60):
            refused = await gw.run(
                command=["true"], isolation_level="maximum", memory_limit=128 * 1024 * 1024
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "at_capacity"
            # The same limit in gVisor (no VMM on top) fits.
            body = await gw.run_ok(command=["true"], memory_limit=128 * 1024 * 1024, keep_alive=0)
            assert body["runtime"] == "gvisor"
