"""Durable records across a restart: a second gateway on the same data directory answers
status, exec results, listings and snapshots of the first one's sandboxes from SQLite, and marks
the ones an earlier gateway left live (a crash) failed with a reason."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from sandstorm.ids import new_id
from sandstorm.store import ExecRecordRow, SandboxRecord, Store
from tests.tenancy.helpers import client_for, make_key


def _leave_a_live_record(data_dir: Path, tenant: str) -> tuple[str, str]:
    """What a SIGKILLed gateway leaves behind: a sandbox recorded live, an exec running."""
    store = Store(data_dir).open()
    try:
        sid, eid = new_id("sbx"), new_id("exe")
        store.put_sandbox(
            SandboxRecord(
                id=sid, tenant=tenant, runtime="gvisor", state="running",
                params={"memory_limit": 1 << 26, "cpu_limit": 1.0, "timeout": 1000},
                created_at=time.time(),
            )
        )  # fmt: skip
        store.put_exec(
            ExecRecordRow(id=eid, sandbox_id=sid, tenant=tenant, state="running", started_at="t")
        )
        return sid, eid
    finally:
        store.close()


async def test_records_survive_a_restart(start_gateway: Any) -> None:
    async with start_gateway() as gw:
        with trio.fail_after(90):
            _, key = await make_key(gw.data_dir, "durable")
            _, other = await make_key(gw.data_dir, "other")
            async with client_for(gw, key) as c:
                kept = await c.post(
                    "/v1/sandboxes/run", json={"command": ["echo", "hello"], "keep_alive": 300}
                )
                assert kept.status_code == 201, kept.text
                sid, eid = kept.json()["id"], kept.json()["exec_id"]
                gone = (await c.post("/v1/sandboxes/run", json={"command": ["true"]})).json()
                await c.delete(f"/v1/sandboxes/{gone['id']}")
                snap = await c.post(f"/v1/sandboxes/{sid}/snapshot", json={})
                assert snap.status_code == 201, snap.text
                snp = snap.json()["snapshot_id"]
        data_dir = gw.data_dir
    crashed, crashed_exec = await trio.to_thread.run_sync(_leave_a_live_record, data_dir, "durable")

    async with start_gateway() as gw:
        with trio.fail_after(90):
            async with client_for(gw, key) as c, client_for(gw, other) as o:
                status = (await c.get(f"/v1/sandboxes/{sid}/status")).json()
                assert status["state"] == "destroyed", status  # the first gateway's shutdown
                assert [e["exec_id"] for e in status["execs"]] == [eid]
                result = (await c.get(f"/v1/sandboxes/{sid}/execs/{eid}")).json()
                assert result["state"] == "finished"
                assert result["result"]["stdout"] == "hello\n"
                assert result["result"]["verdict"] == "ok"

                lost = (await c.get(f"/v1/sandboxes/{crashed}/status")).json()
                assert lost["state"] == "failed"
                assert "restarted" in lost["failure"]["reason"]
                killed = (await c.get(f"/v1/sandboxes/{crashed}/execs/{crashed_exec}")).json()
                assert killed["state"] == "finished" and killed["result"]["verdict"] == "killed"

                listed = (await c.get("/v1/sandboxes")).json()["sandboxes"]
                assert {s["id"] for s in listed} == {sid, gone["id"], crashed}
                failed = (await c.get("/v1/sandboxes", params={"state": "failed"})).json()
                assert [s["id"] for s in failed["sandboxes"]] == [crashed]
                # Ended sandboxes: DELETE is idempotent, exec is refused as not running.
                deleted = await c.delete(f"/v1/sandboxes/{sid}")
                assert deleted.status_code == 200 and deleted.json()["state"] == "destroyed"
                refused = await c.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["true"]})
                assert refused.status_code == 409, refused.text

                # Still the owner's only.
                assert (await o.get(f"/v1/sandboxes/{sid}/status")).status_code == 404
                assert (await o.get("/v1/sandboxes")).json()["sandboxes"] == []
                assert (await o.get(f"/v1/snapshots/{snp}")).status_code == 404

                snaps = (await c.get("/v1/snapshots")).json()["snapshots"]
                assert [s["snapshot_id"] for s in snaps] == [snp]
                resumed = await c.post("/v1/sandboxes/resume", json={"snapshot_id": snp})
                assert resumed.status_code == 201, resumed.text
                new = resumed.json()["id"]
                again = await c.post(
                    f"/v1/sandboxes/{new}/exec", json={"command": ["echo", "after"]}
                )
                assert again.json()["result"]["stdout"] == "after\n"
