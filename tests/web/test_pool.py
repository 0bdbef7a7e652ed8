"""The warm pool against a real gateway and real runsc: claims, refill, never reused, limits set
on claim, fallback to a cold boot, giving way to admission, invisible to tenants, nothing left
after shutdown or a crash."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from sandstorm.runtimes.cgroups import SandboxCgroups
from tests.harness import RunningGateway
from tests.hoststate import HostState, host_state, settled_state
from tests.integration.gateway_process import gateway_process
from tests.web.test_metrics import Samples, scrape, value

MIB = 1024 * 1024
POOL_1 = [{"size": 1}]  # one sandbox of the default limits (512 MiB, 1 CPU)


def pool_ready(samples: Samples) -> float:
    return value(samples, "sandstorm_pool_sandboxes", runtime="gvisor", state="ready")


def pool_event(samples: Samples, event: str) -> float:
    return value(samples, "sandstorm_pool_events_total", runtime="gvisor", event=event)


async def wait_ready(gw: RunningGateway, n: int) -> Samples:
    while pool_ready(samples := await scrape(gw)) != n:
        await trio.sleep(0.05)
    return samples


def shim_ids(data_dir: Path) -> set[str]:
    shims = data_dir / "shims"
    return {p.name for p in shims.iterdir()} if shims.is_dir() else set()


async def test_claimed_once_refilled_and_never_reused(start_gateway: Callable[..., Any]) -> None:
    async with start_gateway(warm_pool=POOL_1) as gw:
        with trio.fail_after(90):
            before = await wait_ready(gw, 1)
            pooled = shim_ids(gw.data_dir)
            assert len(pooled) == 1
            # Invisible: not listed, and its id is unknown to every tenant.
            listed = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
            assert listed == []
            (pool_id,) = pooled
            assert (await gw.client.get(f"/v1/sandboxes/{pool_id}/status")).status_code == 404

            first = await gw.run_ok(
                command=["sh", "-c", "echo secret > /workspace/left; echo $$"], keep_alive=300
            )
            assert first["id"] == pool_id  # served by the pool sandbox, which now is ours
            assert first["result"]["verdict"] == "ok"
            after = await wait_ready(gw, 1)  # refilled in the background
            assert pool_event(after, "claimed") - pool_event(before, "claimed") == 1
            assert pool_event(after, "booted") - pool_event(before, "booted") == 1
            status = await gw.status(pool_id)
            assert status["state"] == "idle" and status["limits"]["memory_limit"] == 512 * MIB
            listed = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
            assert [s["id"] for s in listed] == [pool_id]

            second = await gw.run_ok(
                command=["sh", "-c", "test -e /workspace/left && echo reused || echo fresh"],
                keep_alive=0,
            )
            assert second["id"] != pool_id
            assert second["result"]["stdout"] == "fresh\n"
            # The first one goes on as the tenant's own sandbox (and is destroyed, not reused).
            again = await gw.client.post(
                f"/v1/sandboxes/{pool_id}/exec", json={"command": ["cat", "/workspace/left"]}
            )
            assert again.json()["result"]["stdout"] == "secret\n"
            deleted = await gw.client.delete(f"/v1/sandboxes/{pool_id}")
            assert deleted.json()["released"], deleted.json()
            state = await settled_state(
                gw.data_dir, gw.config.cgroup_parent or "", lambda s: not s.mentioning(pool_id)
            )
            assert not state.mentioning(pool_id), state


async def test_limits_are_set_on_claim(start_gateway: Callable[..., Any]) -> None:
    async with start_gateway(warm_pool=POOL_1) as gw:
        with trio.fail_after(90):
            before = await wait_ready(gw, 1)
            (pool_id,) = shim_ids(gw.data_dir)
            cgroups = SandboxCgroups(gw.config.cgroup_parent or "")
            assert cgroups.memory_limit(pool_id) == 512 * MIB
            made = await gw.run_ok(
                command=["true"], memory_limit=128 * MIB, cpu_limit=0.5, keep_alive=300
            )
            assert made["id"] == pool_id
            after = await scrape(gw)
            assert pool_event(after, "adjusted") - pool_event(before, "adjusted") == 1
            assert cgroups.memory_limit(pool_id) == 128 * MIB
            status = await gw.status(pool_id)
            assert status["limits"]["memory_limit"] == 128 * MIB
            assert status["limits"]["cpu_limit"] == 0.5
            # Inside the sandbox the new limit holds: 200 MiB does not fit in 128.
            response = await gw.client.post(
                f"/v1/sandboxes/{pool_id}/exec",
                json={
                    "code": "b = []\nfor _ in range(25):\n    b.append(bytearray(8 << 20))\n",
                    "language": "python",
                },
            )
            assert response.json()["result"]["verdict"] == "oom", response.json()


async def test_falls_back_to_a_cold_boot_when_no_pool_sandbox_fits(
    start_gateway: Callable[..., Any], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.txt").write_text("from the host\n")
    async with start_gateway(warm_pool=POOL_1, mount_allow_list=[str(tmp_path)]) as gw:
        with trio.fail_after(90):
            before = await wait_ready(gw, 1)
            (pool_id,) = shim_ids(gw.data_dir)
            # Mounts are made at boot: a pool sandbox cannot take them.
            made = await gw.run_ok(
                command=["cat", "/workspace/shared/data.txt"],
                mounts=[{"source": str(shared), "destination": "/workspace/shared"}],
                keep_alive=0,
            )
            assert made["result"]["stdout"] == "from the host\n"
            assert made["id"] != pool_id
            # Nor can a memory limit below what the idle sandbox already holds be set safely.
            tiny = await gw.run_ok(command=["true"], memory_limit=32 * MIB, keep_alive=0)
            after = await scrape(gw)
            if tiny["id"] != pool_id:
                assert pool_event(after, "miss") - pool_event(before, "miss") == 2
                assert pool_ready(after) == 1 and shim_ids(gw.data_dir) >= {pool_id}
            else:  # it held so little that 32 MiB was safe
                assert pool_event(after, "adjusted") - pool_event(before, "adjusted") == 1


async def test_the_pool_gives_way_to_admission(start_gateway: Callable[..., Any]) -> None:
    async with start_gateway(warm_pool=[{"size": 2}], max_sandboxes=2) as gw:
        with trio.fail_after(120):
            before = await wait_ready(gw, 2)
            # A sandbox that must boot cold (a stream-less mount-free run that asks for a
            # memory limit too small to set on a pool sandbox would do too): a restore.
            kept = await gw.run_ok(command=["true"], keep_alive=300)  # claims one
            assert pool_ready(await scrape(gw)) == 1  # no room to refill: 2 admitted
            snap = await gw.client.post(f"/v1/sandboxes/{kept['id']}/snapshot", json={})
            assert snap.status_code == 201, snap.text
            # A resume boots cold and needs a slot: the idle pool sandbox is destroyed for it.
            resumed = await gw.client.post(
                "/v1/sandboxes/resume", json={"snapshot_id": snap.json()["snapshot_id"]}
            )
            assert resumed.status_code == 201, resumed.text
            after = await scrape(gw)
            assert pool_event(after, "evicted") - pool_event(before, "evicted") == 1
            assert pool_ready(after) == 0
            # Now the gateway is full of real sandboxes: the pool cannot help, 503.
            full = await gw.run(command=["true"])
            assert full.status_code == 503, full.text
            assert full.json()["error"]["code"] == "at_capacity"
            await gw.client.delete(f"/v1/sandboxes/{resumed.json()['id']}")
            await wait_ready(gw, 1)  # room again: refilled


async def test_no_pool_while_host_memory_is_low(start_gateway: Callable[..., Any]) -> None:
    async with start_gateway(warm_pool=POOL_1, warm_pool_min_available=1 << 50) as gw:
        with trio.fail_after(60):
            await trio.sleep(1.5)
            samples = await scrape(gw)
            assert pool_ready(samples) == 0 and pool_event(samples, "booted") == 0
            made = await gw.run_ok(command=["echo", "cold"], keep_alive=0)
            assert made["result"]["stdout"] == "cold\n"


async def test_a_kept_shutdown_still_destroys_the_pool(start_gateway: Callable[..., Any]) -> None:
    # on_shutdown "keep" hands sandboxes over to the next gateway: never the unclaimed pool
    # ones (no record, nobody's). The fixture then checks the host is empty.
    async with start_gateway(warm_pool=[{"size": 2}], on_shutdown="keep") as gw:
        with trio.fail_after(60):
            await wait_ready(gw, 2)
            assert len(shim_ids(gw.data_dir)) == 2


async def test_a_crash_leaves_no_pool_sandbox(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with trio.fail_after(120):
        async with (
            gateway_process(
                data_dir, tmp_path / "first", cgroup_parent=cgroup_parent, on_shutdown="keep",
                warm_pool=[{"size": 2}],
            ) as first,
            httpx.AsyncClient(base_url=first.url, timeout=60) as client,
        ):  # fmt: skip
            gw = RunningGateway(first.url, client, None, data_dir)  # type: ignore[arg-type]
            await wait_ready(gw, 2)
            made = await gw.run_ok(command=["sh", "-c", "echo kept > /workspace/f"])
            kept = made["id"]
            while len(shim_ids(data_dir)) < 3:  # the claimed one and two in the pool
                await trio.sleep(0.05)
            first.signal(signal.SIGKILL)
            await first.wait()
        async with (
            gateway_process(data_dir, tmp_path / "second", cgroup_parent=cgroup_parent) as second,
            httpx.AsyncClient(base_url=second.url, timeout=60) as client,
        ):
            # The claimed sandbox was recorded and is taken over; the pool ones were reaped.
            again = await client.post(
                f"/v1/sandboxes/{kept}/exec", json={"command": ["cat", "/workspace/f"]}
            )
            assert again.json()["result"]["stdout"] == "kept\n", again.text
            state = await host_state(data_dir, cgroup_parent)
            assert shim_ids(data_dir) == {kept}, state
        state = await settled_state(data_dir, cgroup_parent, HostState.is_empty, seconds=20)
        assert state.is_empty(), state
