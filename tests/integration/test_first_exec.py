"""A create is one actor operation: the sandbox boots with the request's exec and reports ready
only once that exec is started and recorded. A real gateway on real sandboxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from sandstorm.store import ExecRecordRow, Store


def _stored_exec(data_dir: Path, exec_id: str) -> ExecRecordRow | None:
    store = Store(data_dir).open()
    try:
        return store.get_exec(exec_id)
    finally:
        store.close()


async def test_a_create_is_answered_with_its_exec_already_stored(start_gateway: Any) -> None:
    with trio.fail_after(60):
        async with start_gateway() as gw:
            body = await gw.run_ok(command=["sleep", "30"], wait=False, keep_alive=60)
            row = await trio.to_thread.run_sync(_stored_exec, gw.data_dir, body["exec_id"])
            assert row is not None and row.sandbox_id == body["id"], row
            assert row.state == "running"
            status = (await gw.client.get(f"/v1/sandboxes/{body['id']}/status")).json()
            assert [e["exec_id"] for e in status["execs"]] == [body["exec_id"]]
            assert status["state"] == "running"


async def test_a_refused_first_exec_ends_its_sandbox_and_gives_its_room_back(
    start_gateway: Any,
) -> None:
    with trio.fail_after(60):
        async with start_gateway(max_sandboxes=1) as gw:
            response = await gw.run(command=["true"], files={"/etc/passwd": "x"})
            assert response.status_code == 400, response.text
            listed = (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]
            assert [(s["state"], s["execs"]) for s in listed] == [("destroyed", [])], listed
            after = await gw.run_ok(command=["echo", "after"])
            assert after["result"]["stdout"] == "after\n"
