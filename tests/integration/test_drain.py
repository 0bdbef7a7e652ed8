"""SIGTERM drains a real ``sandstorm serve`` process: new work is refused with 503 while running
execs get the grace period, then sandboxes are destroyed (or left for the next gateway)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.hoststate import HostState, cgroup_parent_dirs, host_state, settled_state
from tests.integration.gateway_process import GatewayProcess, gateway_process

GRACE_S = 6.0


async def _exec(client: httpx.AsyncClient, sid: str, command: list[str]) -> httpx.Response:
    return await client.post(
        f"/v1/sandboxes/{sid}/exec", json={"command": command, "timeout": 120_000}
    )


async def _wait_running(client: httpx.AsyncClient, sid: str, count: int) -> None:
    while True:
        execs = (await client.get(f"/v1/sandboxes/{sid}/status")).json()["execs"]
        if sum(e["state"] == "running" for e in execs) >= count:
            return
        await trio.sleep(0.05)


async def test_sigterm_drains_then_destroys(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    results: dict[str, httpx.Response] = {}
    with trio.fail_after(90):
        async with (
            gateway_process(
                data_dir, tmp_path, cgroup_parent=cgroup_parent, shutdown_grace_s=GRACE_S,
                on_shutdown="destroy",
            ) as gp,
            httpx.AsyncClient(base_url=gp.url, timeout=60) as client,
        ):  # fmt: skip
            created = (await client.post("/v1/sandboxes/run", json={"command": ["true"]})).json()
            sid = created["id"]
            assert (await client.get("/ready")).status_code == 200

            async def call(name: str, command: list[str]) -> None:
                results[name] = await _exec(client, sid, command)

            async with trio.open_nursery() as nursery:
                # One exec ends inside the grace period, one would outlive it.
                nursery.start_soon(call, "short", ["sh", "-c", "sleep 2; echo done"])
                nursery.start_soon(call, "long", ["sleep", "100"])
                await _wait_running(client, sid, 2)
                gp.signal()
                signalled = time.monotonic()
                # Meanwhile: new sandboxes and execs get a clear 503, and the gateway is not ready.
                await trio.sleep(0.3)
                refused = await client.post("/v1/sandboxes/run", json={"command": ["true"]})
                assert refused.status_code == 503, refused.text
                error = refused.json()["error"]
                assert error["code"] == "at_capacity"
                assert "shutting down" in error["message"]
                assert refused.headers["retry-after"].isdigit()
                refused_exec = await _exec(client, sid, ["true"])
                assert refused_exec.status_code == 503, refused_exec.text
                assert (await client.get("/ready")).status_code == 503
                assert (await client.get("/health")).status_code == 200
            code = await gp.wait()
            stopped = time.monotonic() - signalled
    assert code == 0, gp.stderr.decode()[-3000:]
    short = results["short"].json()["result"]
    assert (short["verdict"], short["stdout"]) == ("ok", "done\n"), short
    # The long exec was cut at the end of the grace period, when its sandbox was destroyed.
    long = results["long"].json()["result"]
    assert long["verdict"] == "killed", long
    assert GRACE_S - 0.5 <= long["duration_ms"] / 1000 < GRACE_S + 5, long
    assert stopped < GRACE_S + 10, stopped
    with trio.fail_after(30):
        left = await settled_state(data_dir, cgroup_parent, HostState.is_empty, seconds=10)
    assert left.is_empty(), left
    assert cgroup_parent_dirs(cgroup_parent) == []  # the gateway's own group went last
    messages = [line["message"] for line in gp.log_lines()]
    assert any("draining" in m for m in messages), messages


async def _stop_with_a_kept_sandbox(
    data_dir: Path, cgroup_parent: str, tmp_path: Path, signum: int
) -> tuple[str, GatewayProcess]:
    """A ``sandstorm serve`` with ``on_shutdown = "keep"`` and one kept sandbox, stopped by
    ``signum``; the sandbox's id and the ended process."""
    async with (
        gateway_process(
            data_dir, tmp_path, cgroup_parent=cgroup_parent, shutdown_grace_s=1.0,
            on_shutdown="keep",
        ) as gp,
        httpx.AsyncClient(base_url=gp.url, timeout=60) as client,
    ):  # fmt: skip
        created = await client.post(
            "/v1/sandboxes/run", json={"command": ["true"], "keep_alive": 600}
        )
        sid: str = created.json()["id"]
        assert (await host_state(data_dir, cgroup_parent)).mentioning(sid)
        gp.signal(signum)
        assert await gp.wait() == 0, gp.stderr.decode()[-3000:]
    return sid, gp


async def test_sigterm_with_keep_leaves_sandboxes_for_the_next_gateway(
    data_dir: Path, cgroup_parent: str, tmp_path: Path, start_gateway: Callable[..., Any]
) -> None:
    with trio.fail_after(90):
        sid, _ = await _stop_with_a_kept_sandbox(data_dir, cgroup_parent, tmp_path, signal.SIGTERM)
        # Nothing was torn down: the sandbox still runs, held by its shim.
        held = await host_state(data_dir, cgroup_parent)
        assert any(sid in b for b in held.bundles), held
        assert held.mentioning(sid), held
        # The next gateway on this data directory takes it over and it serves as before; the
        # fixture's gateway destroys it at the end and proves that nothing remains.
        async with start_gateway() as gw:
            status = (await gw.client.get(f"/v1/sandboxes/{sid}/status")).json()
            assert status["state"] == "idle", status
            again = await gw.client.post(
                f"/v1/sandboxes/{sid}/exec", json={"command": ["echo", "kept"]}
            )
            assert again.json()["result"]["stdout"] == "kept\n", again.text
            assert (await gw.client.get("/ready")).status_code == 200


async def test_ctrl_c_stops_the_gateway_and_its_sandboxes(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    """Ctrl-C in the terminal that runs ``sandstorm serve`` (SIGINT) destroys the sandboxes
    even though SIGTERM would keep them: nothing is left running with no gateway to end it."""
    with trio.fail_after(90):
        _, gp = await _stop_with_a_kept_sandbox(data_dir, cgroup_parent, tmp_path, signal.SIGINT)
        left = await settled_state(data_dir, cgroup_parent, HostState.is_empty, seconds=10)
    assert left.is_empty(), left
    messages = [line["message"] for line in gp.log_lines()]
    assert any("SIGINT" in m and "destroyed" in m for m in messages), messages
