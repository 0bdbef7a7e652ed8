"""Status, listing, delete, expiry, and the catalogue endpoints on a real gateway."""

from __future__ import annotations

import pytest
import trio

from tests.harness import RunningGateway


async def test_status_reports_limits_usage_and_execs(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code="print(1)", language="python", cpu_limit=0.5,
                               memory_limit=128 * 1024 * 1024, timeout=5000)  # fmt: skip
        status = await gw.status(body["id"])
    assert status["id"] == body["id"]
    assert status["state"] == "idle"
    assert status["runtime"] == gw.runtime and status["isolation_level"] == gw.isolation_level
    assert status["limits"] == {
        "cpu_limit": 0.5,
        "memory_limit": 128 * 1024 * 1024,
        "timeout": 5000,
    }
    assert status["usage"]["memory_bytes"] > 0
    assert status["usage"]["cpu_time_ms"] > 0
    assert status["restored_from"] is None and status["failure"] is None
    [summary] = status["execs"]
    assert summary["exec_id"] == body["exec_id"]
    assert summary["state"] == "finished"
    assert summary["argv"] == ["python3", "-c", "print(1)"]
    assert summary["started_at"].endswith("Z")


async def test_list_and_delete(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        ids = {(await gw.run_ok(command=["true"]))["id"] for _ in range(2)}
        listed = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
        assert {s["id"] for s in listed} == ids
        victim = sorted(ids)[0]
        first = await gw.client.delete(f"/v1/sandboxes/{victim}")
        assert first.status_code == 200
        assert first.json()["state"] == "destroyed"
        released = " ".join(first.json()["released"])
        assert "cgroup" in released and gw.directory_word in released
        second = await gw.client.delete(f"/v1/sandboxes/{victim}")
        assert second.status_code == 200
        assert second.json() == {"id": victim, "state": "destroyed", "released": []}
        assert (await gw.status(victim))["state"] == "destroyed"
        idle = (await gw.client.get("/v1/sandboxes", params={"state": "idle"})).json()
        assert [s["id"] for s in idle["sandboxes"]] == sorted(ids)[1:]
        response = await gw.client.post(f"/v1/sandboxes/{victim}/exec", json={"command": ["true"]})
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "sandbox_not_running"


async def test_keep_alive_expiry_destroys_an_idle_sandbox(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["true"], keep_alive=1)
        start = trio.current_time()
        await gw.wait_state(body["id"], "destroyed")
        # keep_alive (1 s), then the teardown (a VM's takes longer)
        assert trio.current_time() - start < 1.0 + gw.seconds(1.5)
        zero = await gw.run_ok(command=["sh", "-c", "sleep 0.5; echo late"], keep_alive=0)
        # keep_alive 0 lets the run finish, then the sandbox goes at once.
        assert zero["result"]["stdout"] == "late\n"
        await gw.wait_state(zero["id"], "destroyed", "stopping")


async def test_activity_extends_keep_alive(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"], keep_alive=1))["id"]
        for _ in range(4):
            await trio.sleep(0.5)
            response = await gw.client.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["true"]})
            assert response.status_code == 201
        # A long exec is activity throughout: keep_alive never cuts it off.
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec", json={"command": ["sleep", "1.5"]}
        )
        assert response.json()["result"]["verdict"] == "ok"
        assert (await gw.status(sid))["state"] == "idle"


async def test_runtimes_lists_all_four_truthfully(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        await gw.run_ok(command=["true"])
        runtimes = {r["name"]: r for r in (await gw.client.get("/v1/runtimes")).json()}
    assert list(runtimes) == ["gvisor", "kata", "firecracker", "qemu"]
    gvisor = runtimes["gvisor"]
    assert gvisor["available"] is True and gvisor["reason"] is None
    assert gvisor["binary"].endswith("runsc") and gvisor["version"]
    assert gvisor["isolation_levels"] == ["standard", "strong"]
    assert gvisor["default_for"] == ["standard"]
    assert gvisor["capabilities"]["snapshot"] is True
    # The start-up median is observed: the runtime that served the run above has one.
    assert runtimes[gw.runtime]["startup_ms_p50"] > 0
    for name in ("kata", "firecracker"):
        info = runtimes[name]
        assert info["available"] is False
        assert info["reason"], info
    # qemu runs wherever it and the VM image are installed; it says which accelerator it uses.
    qemu = runtimes["qemu"]
    if qemu["available"]:
        assert qemu["reason"] is None and qemu["binary"].endswith("qemu-system-x86_64")
        assert qemu["version"].endswith(("accel tcg", "accel kvm")), qemu
        assert qemu["isolation_levels"] == ["strong", "maximum"]
    else:
        assert qemu["reason"], qemu
    assert runtimes["kata"]["default_for"] == ["strong"]
    assert runtimes["firecracker"]["default_for"] == ["maximum"]


@pytest.mark.runtimes("gvisor")  # about selection, which this test drives itself
async def test_strong_isolation_falls_back_to_gvisor(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["true"], isolation_level="strong")
        assert body["runtime"] == "gvisor" and body["selection"] == "fallback"
        preferred = await gw.run_ok(command=["true"], runtime_preference="gvisor")
        assert preferred["selection"] == "preference"


@pytest.mark.runtimes("gvisor")  # creates no sandbox
async def test_health_and_ready(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(10)):
        health = await gw.client.get("/health")
        ready = await gw.client.get("/ready")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert ready.status_code == 200
    body = ready.json()
    # qemu joins gVisor wherever it and the VM image are installed (see "VM tier").
    assert body.pop("available_runtimes") in (["gvisor"], ["gvisor", "qemu"])
    assert body == {
        "ready": True,
        "store": True,
        "runtimes_detected": True,
        "image": True,
    }
