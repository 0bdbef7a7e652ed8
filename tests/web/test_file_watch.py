"""Watches over the stream (SPEC §8): ``watch`` / ``unwatch`` client frames and the ``fs`` events
of changes made by the sandbox's own code, on real sandboxes (gVisor and QEMU)."""

from __future__ import annotations

import json
from typing import Any

import trio

from tests.harness import RunningGateway


async def _next(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame["type"] == kind:
            return frame


async def _exec(ws: Any, script: str) -> None:
    await ws.send_message(json.dumps({"type": "exec", "command": ["sh", "-c", script]}))


async def test_watch_reports_creates_writes_renames_and_removes(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        sid = (await gw.run_ok(language="bash", code="mkdir /workspace/w", keep_alive=300))["id"]
        async with gw.stream(sid) as ws:
            await ws.send_message(
                json.dumps(
                    {"type": "watch", "id": "w1", "path": "/workspace/w/", "recursive": True}
                )
            )
            accepted = await _next(ws, "watch_accepted")
            assert accepted == {"type": "watch_accepted", "id": "w1", "path": "/workspace/w"}
            await _exec(
                ws,
                "mkdir /workspace/w/sub && sleep 0.3 && for i in 1 2 3 4 5; do echo $i >>"
                " /workspace/w/sub/f; done && mv /workspace/w/sub/f /workspace/w/g"
                " && rm /workspace/w/g",
            )
            events: list[tuple[str, str, str | None]] = []
            while ("remove", "/workspace/w/g", None) not in events:
                frame = await _next(ws, "fs")
                assert frame["watch"] == "w1" and frame["seq"] > 0
                events.append((frame["op"], frame["path"], frame.get("to")))
            assert ("create", "/workspace/w/sub", None) in events
            assert ("create", "/workspace/w/sub/f", None) in events
            assert ("write", "/workspace/w/sub/f", None) in events
            assert ("rename", "/workspace/w/sub/f", "/workspace/w/g") in events
            # Coalesced: five appends are not five events each.
            assert sum(e == ("write", "/workspace/w/sub/f", None) for e in events) < 10

            await ws.send_message(json.dumps({"type": "unwatch", "id": "w1"}))
            await _exec(ws, "touch /workspace/w/after && echo done")
            while True:
                frame = json.loads(await ws.get_message())
                assert frame["type"] != "fs", frame
                if frame["type"] == "stdout" and frame.get("data") == "done\n":
                    break


async def test_watch_refusals_name_the_watch(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        sid = (await gw.run_ok(language="bash", code="touch /workspace/f", keep_alive=300))["id"]
        async with gw.stream(sid) as ws:
            for frame, code in (
                ({"id": "a", "path": "/workspace/missing"}, "file_not_found"),
                ({"id": "b", "path": "/workspace/f"}, "wrong_file_type"),
                ({"id": "c", "path": "relative"}, "invalid_request"),
            ):
                await ws.send_message(json.dumps({"type": "watch", **frame}))
                error = await _next(ws, "error")
                assert (error["code"], error["id"]) == (code, frame["id"]), error
            await ws.send_message(json.dumps({"type": "watch", "id": "d", "path": "/workspace"}))
            await _next(ws, "watch_accepted")
            await ws.send_message(json.dumps({"type": "watch", "id": "d", "path": "/workspace"}))
            assert (await _next(ws, "error"))["code"] == "invalid_request"
            await ws.send_message(json.dumps({"type": "unwatch", "id": "zzz"}))
            assert (await _next(ws, "error"))["code"] == "invalid_request"
        # The connection's watches ended with it: a new connection may use the same id.
        async with gw.stream(sid) as ws:
            await ws.send_message(json.dumps({"type": "watch", "id": "d", "path": "/workspace"}))
            await _next(ws, "watch_accepted")
