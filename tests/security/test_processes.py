"""Process limits: many processes are fine, a fork bomb stops at the limit, the sandbox lives."""

from __future__ import annotations

import trio

from tests.harness import RunningGateway

FORK = """
import os, time
pids = []
try:
    for _ in range({n}):
        pid = os.fork()
        if pid == 0:
            time.sleep({sleep})
            os._exit(0)
        pids.append(pid)
except OSError as exc:
    print('stopped', exc.errno)
print('forked', len(pids))
"""


async def test_a_hundred_processes_are_fine(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        body = await gw.run_ok(code=FORK.format(n=100, sleep=5), language="python")
    assert body["result"]["stdout"] == "forked 100\n"
    assert body["result"]["verdict"] == "ok"


async def test_a_fork_bomb_stops_at_the_pids_limit_and_the_next_request_succeeds(
    start_gateway,  # type: ignore[no-untyped-def]
) -> None:
    async with start_gateway(pids_limit=64) as gw:
        with trio.fail_after(60):
            body = await gw.run_ok(code=FORK.format(n=1000, sleep=1), language="python")
            out = body["result"]["stdout"].splitlines()
            assert out[0] == "stopped 11"  # EAGAIN
            forked = int(out[1].split()[1])
            assert 32 <= forked < 64
            sid = body["id"]
            # The sandbox survives its fork bomb: once the bomb's processes are gone, it works.
            await trio.sleep(1.5)
            again = await gw.client.post(
                f"/v1/sandboxes/{sid}/exec", json={"command": ["echo", "alive"]}
            )
            assert again.status_code == 201, again.text
            assert again.json()["result"]["stdout"] == "alive\n"
            bomb = await gw.run_ok(command=["sh", "-c", ":(){ :|:& };:; sleep 1; echo done"],
                                   timeout=5000)  # fmt: skip
            assert bomb["result"]["verdict"] in ("ok", "timeout", "error")
            after = await gw.run_ok(code="print('next')", language="python")
            assert after["result"]["stdout"] == "next\n"


async def _exec(gw: RunningGateway, sid: str, **body: object) -> dict[str, object]:
    response = await gw.client.post(f"/v1/sandboxes/{sid}/exec", json=body)
    assert response.status_code in (201, 202), response.text
    result: dict[str, object] = response.json()
    return result


async def test_a_fork_bomb_an_exec_leaves_behind_dies_with_it_and_the_sandbox_goes_on(
    gw: RunningGateway,
) -> None:
    """The shell returns at once while its children fork on: they are what the exec left
    behind, killed when it ends, so the same kept sandbox serves the next execs."""
    with trio.fail_after(gw.seconds(90)):
        sid = (await gw.run_ok(command=["true"], keep_alive=120))["id"]
        bomb = await _exec(gw, sid, command=["bash", "-c", ":(){ :|:& };:"])
        assert bomb["result"]["verdict"] == "ok", bomb  # type: ignore[index]
        for _ in range(3):
            await trio.sleep(0.5)
            again = await _exec(gw, sid, command=["echo", "alive"])
            assert again["result"]["stdout"] == "alive\n", again  # type: ignore[index]
        assert (await gw.status(sid))["state"] == "idle"


async def test_an_exec_at_the_pids_limit_says_so_and_the_sandbox_recovers(
    start_gateway,  # type: ignore[no-untyped-def]
    sandbox_runtime: str,
) -> None:
    """A bomb whose shell lives on holds the sandbox at its pids limit: an exec that cannot
    start says why. When the bomb's exec ends (its timeout), its processes go with it."""
    async with start_gateway(pids_limit=64, sandbox_runtime=sandbox_runtime) as gw:
        with trio.fail_after(gw.seconds(90)):
            sid = (await gw.run_ok(command=["true"], keep_alive=120))["id"]
            script = ":(){ :|:& };: ; sleep 60"
            await _exec(gw, sid, command=["bash", "-c", script], timeout=4000, wait=False)
            while True:  # until the bomb has filled the sandbox
                refused = (await _exec(gw, sid, command=["echo", "no room"]))["result"]
                if refused["verdict"] != "ok":  # type: ignore[index]
                    break
                await trio.sleep(0.2)
            assert refused["verdict"] == "error", refused  # type: ignore[index]
            assert "pids limit" in refused["stderr"], refused  # type: ignore[index]
            assert refused["exit_code"] == 126, refused  # type: ignore[index]
            while True:  # the bomb's exec times out; its processes are swept away
                after = (await _exec(gw, sid, command=["echo", "room"]))["result"]
                if after["verdict"] == "ok":  # type: ignore[index]
                    break
                await trio.sleep(0.5)
            assert after["stdout"] == "room\n"
            assert (await gw.status(sid))["state"] in ("idle", "running")
