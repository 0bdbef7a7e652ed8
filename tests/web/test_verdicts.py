"""Every verdict, produced by real programs in real sandboxes."""

from __future__ import annotations

import pytest
import trio

from tests.harness import RunningGateway

MIB = 1024 * 1024


async def test_error_verdict_keeps_exit_code_and_stderr(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code="import sys; print('bad', file=sys.stderr); sys.exit(3)",
                               language="python")  # fmt: skip
    result = body["result"]
    assert result["verdict"] == "error"
    assert result["exit_code"] == 3 and result["signal"] is None
    assert result["stderr"] == "bad\n"


async def test_timeout_kills_the_group_and_the_sandbox_survives(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        start = trio.current_time()
        # The child ignores SIGTERM and runs in the background of the shell: the whole group dies.
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"command": ["sh", "-c", "trap '' TERM; sleep 100 & sleep 100"], "timeout": 500},
        )
        elapsed = trio.current_time() - start
        result = response.json()["result"]
        assert result["verdict"] == "timeout"
        assert result["signal"] == 9
        # timeout + 1 s, plus the HTTP round trip and the exec's start (slower in a TCG guest)
        assert elapsed < 0.5 + 1.0 + gw.seconds(0.5)
        # The sandbox is still usable, and nothing of the killed group is left.
        # (no ps in the image: read every process's name from /proc)
        names = "cat /proc/[0-9]*/comm"
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec", json={"command": ["sh", "-c", names]}
        )
        after = response.json()["result"]
        assert after["verdict"] == "ok"
        # The agent (its binary's name, cut to 15 characters): the listing works.
        assert "sandstorm-agent\n" in after["stdout"]
        assert "sleep" not in after["stdout"]


async def test_stopped_process_is_killed_on_time(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(
            code="import os, signal; os.kill(os.getpid(), signal.SIGSTOP)",
            language="python",
            timeout=400,
        )
    assert body["result"]["verdict"] == "timeout"


async def test_oom_verdict_and_failed_sandbox(gw: RunningGateway) -> None:
    """Past its limit a program is `oom`. In gVisor either the host kernel OOM-kills the whole
    sandbox, which ends `failed`, or the sentry fails the allocation (the program dies of its
    MemoryError) and the sandbox goes on: both happen at this limit. A VM's guest kernel kills
    only that program and the VM goes on."""
    with trio.fail_after(gw.seconds(60)):
        body = await gw.run_ok(
            code="import time\nb = []\nwhile True:\n    b.append(bytearray(8 << 20))",
            language="python",
            memory_limit=64 * MIB,
        )
        result = body["result"]
        assert result["verdict"] == "oom", result
        if gw.runtime == "gvisor" and result["exit_code"] is None:
            status = await gw.wait_state(body["id"], "failed")
            assert "memory" in status["failure"]["reason"]
        else:
            if gw.runtime == "gvisor":
                assert result["exit_code"] == 1, result
            response = await gw.client.post(
                f"/v1/sandboxes/{body['id']}/exec", json={"command": ["echo", "alive"]}
            )
            assert response.json()["result"]["stdout"] == "alive\n", response.text
        # The gateway goes on: the next request succeeds.
        again = await gw.run_ok(code="print('fine')", language="python")
        assert again["result"]["stdout"] == "fine\n"


@pytest.mark.runtimes("gvisor")  # the sentry's ENOMEM; a VM's OOM is test_oom_verdict_... above
async def test_failed_allocations_at_the_limit_are_oom_and_only_for_that_exec(
    gw: RunningGateway,
) -> None:
    """gVisor's sentry answers ENOMEM once the sandbox is at its limit: the program fails
    (here python's MemoryError) and the sandbox lives on. That exec is `oom`; a later failure
    with memory to spare is a plain `error`."""
    with trio.fail_after(gw.seconds(60)):
        body = await gw.run_ok(
            code="b = []\nwhile True:\n    b.append(bytearray(8 << 20))",
            language="python",
            memory_limit=256 * MIB,
            keep_alive=60,
        )
        assert body["result"]["verdict"] == "oom", body["result"]
        sid = body["id"]
        # Either the allocations failed and the sandbox lives on (python exits 1: its
        # MemoryError report may itself find no memory to print), or the kernel OOM-killed the
        # whole sandbox first (both happen at this limit).
        if body["result"]["exit_code"] is None:
            await gw.wait_state(sid, "failed")
        else:
            assert body["result"]["exit_code"] == 1, body["result"]
            later = await gw.client.post(
                f"/v1/sandboxes/{sid}/exec", json={"command": ["sh", "-c", "exit 3"]}
            )
            assert later.json()["result"]["verdict"] == "error", later.text
            fine = await gw.client.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["true"]})
            assert fine.json()["result"]["verdict"] == "ok", fine.text
        await gw.client.delete(f"/v1/sandboxes/{sid}")


async def test_output_limit_kills_and_truncates(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(exec_output_limit=2 * MIB, result_output_cap=64 * 1024) as gw:
        with trio.fail_after(30):
            body = await gw.run_ok(command=["yes", "0123456789"])
    result = body["result"]
    assert result["verdict"] == "output_limit"
    assert result["stdout_truncated"] is True
    assert len(result["stdout"]) == 64 * 1024
    assert result["stdout"].startswith("0123456789\n0123456789\n")


async def test_result_cap_truncates_without_killing(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(result_output_cap=1000) as gw:
        with trio.fail_after(30):
            code = "import sys; print('x' * 5000); print('e' * 10, end='', file=sys.stderr)"
            body = await gw.run_ok(code=code, language="python")
    result = body["result"]
    assert result["verdict"] == "ok"
    assert result["stdout"] == "x" * 1000 and result["stdout_truncated"] is True
    assert result["stderr"] == "e" * 10 and result["stderr_truncated"] is False


async def test_killed_verdict_when_deleted_mid_run(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["sleep", "60"], wait=False)
        sid, eid = body["id"], body["exec_id"]
        await trio.sleep(0.3)
        deleted = await gw.client.delete(f"/v1/sandboxes/{sid}")
        assert deleted.status_code == 200
        polled = (await gw.client.get(f"/v1/sandboxes/{sid}/execs/{eid}")).json()
    assert polled["state"] == "finished"
    assert polled["result"]["verdict"] == "killed"


async def test_killed_verdict_by_signal(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(code="import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
                               language="python")  # fmt: skip
    result = body["result"]
    assert result["verdict"] == "killed"
    assert result["signal"] == 15 and result["exit_code"] is None


async def test_missing_command_is_an_error_with_a_message(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["no-such-program"])
    result = body["result"]
    assert result["verdict"] == "error"
    assert result["exit_code"] == 127
    assert "no-such-program" in result["stderr"]
