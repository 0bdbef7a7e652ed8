"""A sandbox that attacks its own agent channel fails only itself (SPEC §5: the agent is
untrusted). Code runs as the agent's user, so it can write anything into the agent's stdout
(/proc/<agent>/fd/1) — the gateway must treat every byte as hostile. The agent is PID 1 in gVisor;
in a VM it is the guest init's child, and its channel cannot be opened by the code at all (see
``run_attack``)."""

from __future__ import annotations

import trio

from tests.harness import AGENT_PID_PY, AGENT_PID_SH, RunningGateway
from tests.hoststate import settled_state

# A well-formed header (kind 4 = STDOUT, channel 999, length 4) — then nonsense.
FORGE = (
    AGENT_PID_PY.replace("{", "{{").replace("}", "}}")
    + r"""
import os, struct
fd = os.open('/proc/%d/fd/1' % agent_pid(), os.O_WRONLY)
{body}
"""
)


async def run_attack(gw: RunningGateway, body: str) -> tuple[dict, dict] | None:  # type: ignore[type-arg]
    """Run the attack in a fresh victim beside a bystander. In a VM the agent's channel is a
    virtio-serial port whose device node is root's (the init opened it before dropping
    privileges), and which the guest kernel lets one process hold at a time: the attack cannot
    even open it, and the victim goes on; None then."""
    victim = await gw.run_ok(command=["true"])
    bystander = await gw.run_ok(command=["true"])
    code = FORGE.format(body=body)
    response = await gw.client.post(
        f"/v1/sandboxes/{victim['id']}/exec",
        json={"code": code, "language": "python", "timeout": 10_000},
    )
    assert response.status_code == 201, response.text
    if gw.runtime == "gvisor":
        return victim, bystander
    result = response.json()["result"]
    refused = ("PermissionError", "Device or resource busy")
    assert any(word in result["stderr"] for word in refused), result
    again = await gw.client.post(
        f"/v1/sandboxes/{victim['id']}/exec", json={"command": ["echo", "fine"]}
    )
    assert again.json()["result"]["stdout"] == "fine\n", again.text
    await assert_others_unaffected(gw, bystander["id"])
    return None


async def assert_others_unaffected(gw: RunningGateway, bystander_id: str) -> None:
    again = await gw.client.post(
        f"/v1/sandboxes/{bystander_id}/exec", json={"command": ["echo", "fine"]}
    )
    assert again.json()["result"]["stdout"] == "fine\n"
    fresh = await gw.run_ok(code="print('new')", language="python", keep_alive=0)
    assert fresh["result"]["stdout"] == "new\n"


async def test_garbage_on_the_channel_fails_only_that_sandbox(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        attacked = await run_attack(
            gw, "os.write(fd, b'\\xff' * 9 + b'garbage that is not a frame')"
        )
        if attacked is None:
            return
        victim, bystander = attacked
        status = await gw.wait_state(victim["id"], "failed")
        assert "protocol" in status["failure"]["reason"], status["failure"]
        await assert_others_unaffected(gw, bystander["id"])
        # Failed means torn down: nothing of the victim is left on the host.
        state = await settled_state(
            gw.data_dir, gw.config.cgroup_parent or "", lambda s: not s.mentioning(victim["id"])
        )
        assert state.mentioning(victim["id"]) == []


async def test_an_oversized_frame_fails_only_that_sandbox(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        attacked = await run_attack(gw, "os.write(fd, struct.pack('!BII', 4, 1, 2**31))")
        if attacked is None:
            return
        victim, bystander = attacked
        status = await gw.wait_state(victim["id"], "failed")
        assert "protocol" in status["failure"]["reason"]
        await assert_others_unaffected(gw, bystander["id"])


async def test_forged_frames_for_unknown_execs_are_dropped(gw: RunningGateway) -> None:
    # Well-formed output frames for channels that do not exist: ignored, the sandbox lives on.
    body = (
        "frame = struct.pack('!BII', 4, 999999, 4) + b'fake'\n"
        "for _ in range(20000):\n    os.write(fd, frame)"
    )
    with trio.fail_after(gw.seconds(60)):
        attacked = await run_attack(gw, body)
        if attacked is None:
            return
        victim, _ = attacked
        status = await gw.status(victim["id"])
        assert status["state"] == "idle", status
        assert status["last_event_seq"] < 50  # none of the forged output reached the log
        await assert_others_unaffected(gw, victim["id"])


async def test_a_flood_of_agent_error_frames_does_not_flood_the_gateway(
    gw: RunningGateway,
    caplog,  # type: ignore[no-untyped-def]
) -> None:
    body = (
        "import json\nmsg = json.dumps({'message': 'CRITICAL forged line\\n' * 50}).encode()\n"
        "frame = struct.pack('!BII', 12, 0, len(msg)) + msg\n"
        "for _ in range(5000):\n    os.write(fd, frame)"
    )
    with trio.fail_after(gw.seconds(60)):
        attacked = await run_attack(gw, body)
        if attacked is not None:
            await assert_others_unaffected(gw, attacked[1]["id"])
    agent_lines = [r for r in caplog.records if "agent says" in r.getMessage()]
    assert len(agent_lines) <= 5
    assert all("\n" not in r.getMessage() for r in agent_lines)  # repr'd, one line each


async def test_catchable_signals_to_the_agent_are_ignored(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        body = await gw.run_ok(
            command=[
                "sh",
                "-c",
                f"agent={AGENT_PID_SH}; "
                "for s in TERM INT HUP QUIT USR1 USR2; do kill -$s $agent; done; echo sent",
            ]
        )
        assert body["result"]["stdout"] == "sent\n"
        again = await gw.client.post(
            f"/v1/sandboxes/{body['id']}/exec", json={"command": ["echo", "ok"]}
        )
        assert again.json()["result"]["stdout"] == "ok\n"


async def test_killing_the_agent_fails_only_that_sandbox(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        bystander = await gw.run_ok(command=["true"])
        body = await gw.run_ok(command=["sh", "-c", f"kill -KILL {AGENT_PID_SH}; sleep 5"])
        assert body["result"]["verdict"] == "killed"
        status = await gw.wait_state(body["id"], "failed")
        assert "exited unexpectedly" in status["failure"]["reason"]
        await assert_others_unaffected(gw, bystander["id"])


async def test_stopping_the_agent_fails_only_that_sandbox(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        bystander = await gw.run_ok(command=["true"])
        # (finding the agent takes a good part of a second under TCG: more time on a VM)
        body = await gw.run_ok(
            command=["sh", "-c", f"kill -STOP {AGENT_PID_SH}; sleep 5"],
            timeout=int(gw.seconds(1) * 1000),
        )
        assert body["result"]["verdict"] == "timeout"
        status = await gw.wait_state(body["id"], "failed")
        assert "did not answer" in status["failure"]["reason"]
        await assert_others_unaffected(gw, bystander["id"])
