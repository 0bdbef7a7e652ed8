"""Snapshot and resume on real sandboxes (gVisor and QEMU): files and in-memory process state
both continue."""

from __future__ import annotations

import pytest
import trio

from tests.harness import RunningGateway

# A process that counts in memory and publishes its count (atomically) ten times a second.
COUNTER = """
import os, time
c = 0
while True:
    c += 1
    with open('/tmp/count.tmp', 'w') as f:
        f.write(str(c))
    os.rename('/tmp/count.tmp', '/tmp/count')
    time.sleep(0.1)
"""


async def _exec(gw: RunningGateway, sid: str, script: str) -> str:
    response = await gw.client.post(
        f"/v1/sandboxes/{sid}/exec", json={"command": ["sh", "-c", script]}
    )
    assert response.status_code == 201, response.text
    result = response.json()["result"]
    assert result["verdict"] == "ok", result
    out: str = result["stdout"]
    return out


async def _start_counter(gw: RunningGateway) -> str:
    body = await gw.run_ok(
        command=["sh", "-c", 'python3 -c "$PROG" >/dev/null 2>&1 & echo started'],
        environment={"PROG": COUNTER},
        background=True,
    )
    sid: str = body["id"]
    await _exec(gw, sid, "echo kept > /workspace/note")
    # Wait inside the sandbox for the counter's first write.
    await _exec(gw, sid, "while [ ! -s /tmp/count ]; do sleep 0.05; done")
    return sid


async def test_snapshot_then_resume_continues_files_and_memory(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        sid = await _start_counter(gw)
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/snapshot", json={"leave_running": False}
        )
        assert response.status_code == 201, response.text
        snap = response.json()
        assert snap["snapshot_id"].startswith("snp_") and snap["sandbox_id"] == sid
        assert snap["runtime"] == gw.runtime and snap["size_bytes"] > 0
        assert len(snap["sha256"]) == 64
        # leave_running false: the source sandbox is gone.
        status = await gw.wait_state(sid, "destroyed")
        assert status["state"] == "destroyed"
        at_snapshot = int((await _pid_and_count_from_snapshot(gw, snap["snapshot_id"]))[1])
        assert at_snapshot >= 1

        listed = (await gw.client.get("/v1/snapshots")).json()["snapshots"]
        assert [s["snapshot_id"] for s in listed] == [snap["snapshot_id"]]


async def _pid_and_count_from_snapshot(gw: RunningGateway, snapshot_id: str) -> tuple[str, str]:
    """Resume a snapshot twice; each resumed sandbox has the file and a counter that continues."""
    counts = []
    for _ in range(2):
        response = await gw.client.post("/v1/sandboxes/resume", json={"snapshot_id": snapshot_id})
        assert response.status_code == 201, response.text
        resumed = response.json()
        assert resumed["restored_from"] == snapshot_id
        assert resumed["state"] == "idle"
        rid = resumed["id"]
        assert (await _exec(gw, rid, "cat /workspace/note")) == "kept\n"
        first = int(await _exec(gw, rid, "cat /tmp/count"))
        await trio.sleep(0.5)
        second = int(await _exec(gw, rid, "cat /tmp/count"))
        # The same process goes on counting from where it was: no restart from 1.
        assert second > first >= 1
        assert (
            await _exec(gw, rid, "grep -l 'count[.]tmp' /proc/[0-9]*/cmdline | wc -l")
        ).strip() == "1"
        counts.append(first)
        await gw.client.delete(f"/v1/sandboxes/{rid}")
    # Both resumes start from the same snapshot, so both see about the same count at first.
    assert abs(counts[0] - counts[1]) <= 10
    return "", str(counts[0])


async def test_snapshot_leave_running_keeps_the_sandbox(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        sid = await _start_counter(gw)
        before = int(await _exec(gw, sid, "cat /tmp/count"))
        response = await gw.client.post(f"/v1/sandboxes/{sid}/snapshot")
        assert response.status_code == 201, response.text
        status = await gw.status(sid)
        assert status["state"] in ("idle", "running")
        await trio.sleep(0.4)
        after = int(await _exec(gw, sid, "cat /tmp/count"))
        assert after > before
        assert (await _exec(gw, sid, "cat /workspace/note")) == "kept\n"


async def test_snapshot_delete_and_list(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        ids = []
        for _ in range(2):
            response = await gw.client.post(f"/v1/sandboxes/{sid}/snapshot", json={})
            assert response.status_code == 201, response.text
            ids.append(response.json()["snapshot_id"])
        listed = [
            s["snapshot_id"] for s in (await gw.client.get("/v1/snapshots")).json()["snapshots"]
        ]
        assert sorted(listed) == sorted(ids)
        deleted = await gw.client.delete(f"/v1/snapshots/{ids[0]}")
        assert deleted.status_code == 200
        assert deleted.json() == {"snapshot_id": ids[0], "deleted": True}
        again = await gw.client.delete(f"/v1/snapshots/{ids[0]}")
        assert again.status_code == 404
        assert again.json()["error"]["code"] == "not_found"
        resumed = await gw.client.post("/v1/sandboxes/resume", json={"snapshot_id": ids[0]})
        assert resumed.status_code == 404
        listed = [
            s["snapshot_id"] for s in (await gw.client.get("/v1/snapshots")).json()["snapshots"]
        ]
        assert listed == [ids[1]]


async def test_a_corrupted_snapshot_is_refused(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        snap = (await gw.client.post(f"/v1/sandboxes/{sid}/snapshot")).json()
        # The runtime's memory image (runsc's checkpoint.img, QEMU's migration stream): the
        # snapshot's largest file.
        files = (gw.data_dir / "snapshots" / snap["snapshot_id"]).iterdir()
        image = max(files, key=lambda path: path.stat().st_size)
        data = bytearray(await trio.Path(image).read_bytes())
        data[100:103] = b"\xff\xfe\xfd"
        await trio.Path(image).write_bytes(bytes(data))
        response = await gw.client.post(
            "/v1/sandboxes/resume", json={"snapshot_id": snap["snapshot_id"]}
        )
        assert response.status_code == 400
        assert response.json()["error"]["details"]["field"] == "snapshot_id"
        assert "sha256" in response.json()["error"]["message"]


async def test_output_written_before_a_final_snapshot_reaches_its_exec(gw: RunningGateway) -> None:
    """A `leave_running: false` snapshot reads the stopped sandbox's stream to its end before
    the teardown, so what a running exec wrote before the checkpoint is in its result, and the
    exec ends `killed`. The agent's quiesce before the checkpoint stops only its own zygote:
    the exec's process is in the snapshot, and a resume continues it."""
    with trio.fail_after(gw.seconds(60)):
        sid = (await gw.run_ok(command=["true"], keep_alive=120))["id"]
        started = await gw.client.post(
            f"/v1/sandboxes/{sid}/exec",
            json={
                "command": ["sh", "-c", "echo one; echo two; touch /tmp/ready; exec sleep 1000"],
                "wait": False,
            },
        )
        assert started.status_code == 202, started.text
        exec_id = started.json()["exec_id"]
        await _exec(gw, sid, "while [ ! -e /tmp/ready ]; do sleep 0.01; done")
        response = await gw.client.post(
            f"/v1/sandboxes/{sid}/snapshot", json={"leave_running": False}
        )
        assert response.status_code == 201, response.text
        status = await gw.wait_state(sid, "destroyed")
        (record,) = [e for e in status["execs"] if e["exec_id"] == exec_id]
        assert record["state"] == "finished", record
        assert record["result"]["verdict"] == "killed", record
        assert record["result"]["stdout"] == "one\ntwo\n", record
        # The snapshot holds the sleeping exec, which a resume continues.
        resumed = await gw.client.post(
            "/v1/sandboxes/resume", json={"snapshot_id": response.json()["snapshot_id"]}
        )
        assert resumed.status_code == 201, resumed.text
        rid = resumed.json()["id"]
        count = "grep -l 's[l]eep' /proc/[0-9]*/cmdline | wc -l"  # (not grep's own line)
        assert (await _exec(gw, rid, count)).strip() == "1"
        await gw.client.delete(f"/v1/sandboxes/{rid}")


@pytest.mark.runtimes("gvisor")  # a VM's migration stream is its whole RAM, zygote or not
async def test_a_snapshot_leaves_out_the_agents_own_python_zygote(gw: RunningGateway) -> None:
    """Once a sandbox has been idle a moment its agent runs a python zygote and a standby (two
    interpreters, for fast python execs). The agent stops both before a checkpoint, so the
    snapshot of an idle sandbox is no larger than one taken before they existed (two running
    interpreters would make it several times larger)."""
    sizes = []
    with trio.fail_after(gw.seconds(60)):
        for idle in (0.0, 1.0):  # the zygote starts after 0.2 s idle
            sid = (await gw.run_ok(command=["true"], keep_alive=120))["id"]
            await trio.sleep(idle)
            response = await gw.client.post(
                f"/v1/sandboxes/{sid}/snapshot", json={"leave_running": False}
            )
            assert response.status_code == 201, response.text
            sizes.append(response.json()["size_bytes"])
            await gw.client.delete(f"/v1/snapshots/{response.json()['snapshot_id']}")
    assert sizes[1] < 1.3 * sizes[0], sizes
