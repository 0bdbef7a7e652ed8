"""Ownership on a real gateway: tenant B asking for tenant A's sandbox, exec, snapshot or stream
gets exactly the answer an unknown id gets (status, body, headers), and listings show only the
caller's own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

from sandstorm.ids import new_id
from tests.tenancy.helpers import client_for, comparable, make_key, ws_upgrade

Route = tuple[str, Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]]

# Each route, called with the ids in ``ids`` (sid, eid, snp). Mutating ones are harmless when
# refused, and A's objects are checked intact afterwards.
ROUTES: list[Route] = [
    ("status", lambda c, i: c.get(f"/v1/sandboxes/{i['sid']}/status")),
    ("exec result", lambda c, i: c.get(f"/v1/sandboxes/{i['sid']}/execs/{i['eid']}")),
    ("exec", lambda c, i: c.post(f"/v1/sandboxes/{i['sid']}/exec", json={"command": ["true"]})),
    ("exec, bad body", lambda c, i: c.post(f"/v1/sandboxes/{i['sid']}/exec", content=b"{")),
    ("snapshot", lambda c, i: c.post(f"/v1/sandboxes/{i['sid']}/snapshot", json={})),
    ("delete", lambda c, i: c.delete(f"/v1/sandboxes/{i['sid']}")),
    ("get snapshot", lambda c, i: c.get(f"/v1/snapshots/{i['snp']}")),
    ("delete snapshot", lambda c, i: c.delete(f"/v1/snapshots/{i['snp']}")),
    ("resume", lambda c, i: c.post("/v1/sandboxes/resume", json={"snapshot_id": i["snp"]})),
]


async def _wait_usable(a: httpx.AsyncClient, sid: str) -> None:
    while (await a.get(f"/v1/sandboxes/{sid}/status")).json()["state"] not in ("idle", "running"):
        await trio.sleep(0.05)


def _masked(ids: dict[str, str], response: httpx.Response) -> Any:
    out = comparable(response, ids["sid"])
    for value in ids.values():
        out = (out[0], out[1].replace(value.encode(), b"<id>"), out[2])
    return out


async def test_another_tenants_ids_answer_like_unknown_ones(start_gateway: Any) -> None:
    async with start_gateway() as gw:
        with trio.fail_after(120):
            _, key_a = await make_key(gw.data_dir, "tenant-a")
            _, key_b = await make_key(gw.data_dir, "tenant-b")
            async with client_for(gw, key_a) as a, client_for(gw, key_b) as b:
                run = await a.post(
                    "/v1/sandboxes/run", json={"command": ["echo", "a"], "keep_alive": 120}
                )
                assert run.status_code == 201, run.text
                sid, eid = run.json()["id"], run.json()["exec_id"]
                snap = await a.post(f"/v1/sandboxes/{sid}/snapshot", json={"leave_running": True})
                assert snap.status_code == 201, snap.text
                a_ids = {"sid": sid, "eid": eid, "snp": snap.json()["snapshot_id"]}
                await _wait_usable(a, sid)
                unknown = {"sid": new_id("sbx"), "eid": new_id("exe"), "snp": new_id("snp")}
                own = await b.post(
                    "/v1/sandboxes/run", json={"command": ["true"], "keep_alive": 120}
                )
                b_sid = own.json()["id"]

                for name, call in ROUTES:
                    theirs = await call(b, a_ids)
                    nobody = await call(b, unknown)
                    assert theirs.status_code in (400, 404), (name, theirs.text)
                    assert _masked(a_ids, theirs) == _masked(unknown, nobody), name
                # A's exec id under B's own sandbox is as unknown as any exec id.
                theirs = await b.get(f"/v1/sandboxes/{b_sid}/execs/{eid}")
                nobody = await b.get(f"/v1/sandboxes/{b_sid}/execs/{unknown['eid']}")
                assert theirs.status_code == 404
                assert comparable(theirs, eid) == comparable(nobody, unknown["eid"])
                # The stream: refused before the upgrade, like an unknown sandbox.
                auth = {"Authorization": f"Bearer {key_b}"}
                theirs = await ws_upgrade(gw, f"/v1/sandboxes/{sid}/stream", auth)
                nobody = await ws_upgrade(gw, f"/v1/sandboxes/{unknown['sid']}/stream", auth)
                assert theirs.status_code == 404
                assert comparable(theirs, sid) == comparable(nobody, unknown["sid"])

                # Listings are the caller's own.
                listed = (await b.get("/v1/sandboxes")).json()["sandboxes"]
                assert [s["id"] for s in listed] == [b_sid]
                assert (await b.get("/v1/snapshots")).json()["snapshots"] == []
                listed = (await a.get("/v1/sandboxes")).json()["sandboxes"]
                assert {s["id"] for s in listed} == {sid}
                snaps = (await a.get("/v1/snapshots")).json()["snapshots"]
                assert [s["snapshot_id"] for s in snaps] == [a_ids["snp"]]

                # Nothing B tried touched A's things.
                status = (await a.get(f"/v1/sandboxes/{sid}/status")).json()
                assert status["state"] in ("idle", "running")
                assert (await a.get(f"/v1/sandboxes/{sid}/execs/{eid}")).status_code == 200
                resumed = await a.post("/v1/sandboxes/resume", json={"snapshot_id": a_ids["snp"]})
                assert resumed.status_code == 201, resumed.text
                assert resumed.json()["restored_from"] == a_ids["snp"]
