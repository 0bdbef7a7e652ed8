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
