"""200 concurrent run requests: each completes or is refused promptly
(503 at_capacity / 429), none hangs or is lost, admission keeps the sandboxes within the memory
budget, and afterwards nothing is left on the host."""

from __future__ import annotations

import httpx
import trio

from tests.hoststate import HostState, settled_state

MIB = 1024 * 1024


async def test_two_hundred_concurrent_runs(start_gateway) -> None:  # type: ignore[no-untyped-def]
    budget, per_sandbox = 1024 * MIB, 128 * MIB  # at most 8 sandboxes at once
    async with start_gateway(memory_budget=budget) as gw:
        statuses: list[int] = []
        latencies: list[float] = []
        peak_live = 0
        done = trio.Event()

        async def one(client: httpx.AsyncClient) -> None:
            start = trio.current_time()
            response = await client.post(
                "/v1/sandboxes/run",
                json={"code": "print('hi')", "language": "python", "keep_alive": 0,
                      "memory_limit": per_sandbox},
            )  # fmt: skip
            latencies.append(trio.current_time() - start)
            statuses.append(response.status_code)
            if response.status_code == 201:
                assert response.json()["result"]["stdout"] == "hi\n"
            else:
                error = response.json()["error"]
                assert (response.status_code, error["code"]) in (
                    (503, "at_capacity"), (429, "quota_exceeded"),
                ), response.text  # fmt: skip
                assert int(response.headers["Retry-After"]) >= 1

        async def watch_live() -> None:
            nonlocal peak_live
            while not done.is_set():
                listed = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
                live = [s for s in listed if s["state"] not in ("destroyed", "failed")]
                peak_live = max(peak_live, len(live))
                await trio.sleep(0.05)

        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        with trio.fail_after(180):
            async with httpx.AsyncClient(base_url=gw.url, timeout=120, limits=limits) as client:
                async with trio.open_nursery() as watchers:
                    watchers.start_soon(watch_live)
                    async with trio.open_nursery() as nursery:
                        for _ in range(200):
                            nursery.start_soon(one, client)
                    done.set()
        assert len(statuses) == 200  # none lost
        assert statuses.count(201) >= 8, statuses
        assert set(statuses) <= {201, 429, 503}
        # Admission kept the live sandboxes inside the memory budget.
        assert peak_live <= budget // per_sandbox, peak_live
        # Refusals are prompt: they do not wait for a sandbox to finish.
        refused = sorted(t for t, s in zip(latencies, statuses, strict=True) if s != 201)
        if refused:
            assert refused[len(refused) // 2] < 5.0, refused
        state = await settled_state(
            gw.data_dir, gw.config.cgroup_parent or "", HostState.is_empty, seconds=30
        )
        assert state.is_empty(), state
