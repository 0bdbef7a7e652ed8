"""GET /v1/sandboxes/{id}/stream with real WebSocket clients against a real server."""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.harness import RunningGateway


async def upgrade(gw: RunningGateway, sid: str) -> Any:
    """A WebSocket upgrade request sent as plain HTTP, to see a refusal before the upgrade.

    (trio-websocket's own ConnectionRejected path leaks its socket, which this suite's
    warnings-as-errors would report.)
    """
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    return await gw.client.get(f"/v1/sandboxes/{sid}/stream", headers=headers)


async def next_frame(ws: Any, type_: str | None = None) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if type_ is None or frame["type"] == type_:
            return frame


async def collect_until_exit(ws: Any, exec_id: str) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await next_frame(ws)
        frames.append(frame)
        if frame["type"] == "exit" and frame["exec_id"] == exec_id:
            return frames


async def test_late_connect_replays_the_whole_run_in_order(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(command=["sh", "-c", "echo out; echo err >&2; exit 4"], wait=False)
        sid, eid = body["id"], body["exec_id"]
        await trio.sleep(1)  # the run is long over when the client arrives
        async with gw.stream(sid) as ws:
            frames = await collect_until_exit(ws, eid)
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(1, len(frames) + 1))
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "status" and "exec_started" in kinds
    started = next(f for f in frames if f["type"] == "exec_started")
    assert started["argv"] == ["sh", "-c", "echo out; echo err >&2; exit 4"]
    out = "".join(f["data"] for f in frames if f["type"] == "stdout")
    err = "".join(f["data"] for f in frames if f["type"] == "stderr")
    assert (out, err) == ("out\n", "err\n")
    exit_frame = frames[-1]
    assert exit_frame["result"]["verdict"] == "error" and exit_frame["result"]["exit_code"] == 4
    assert all(f["ts"].endswith("Z") for f in frames)


async def test_output_arrives_as_it_is_written_not_at_exit(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        async with gw.stream(sid) as ws:
            command = ["sh", "-c", "echo first; sleep 2; echo second"]
            await ws.send_message(json.dumps({"type": "exec", "id": "a", "command": command}))
            exec_id = (await next_frame(ws, "exec_accepted"))["exec_id"]
            first = await next_frame(ws, "stdout")
            t_first = time.monotonic()
            second = await next_frame(ws, "stdout")
            t_second = time.monotonic()
            assert first["exec_id"] == second["exec_id"] == exec_id
            assert (first["data"], second["data"]) == ("first\n", "second\n")
            assert t_second - t_first > 1.5


async def test_interactive_program_turn_by_turn(gw: RunningGateway) -> None:
    program = (
        "import sys\nfor line in sys.stdin:\n    print('echo:', line.strip()[::-1], flush=True)\n"
    )
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        async with gw.stream(sid) as ws:
            await ws.send_message(
                json.dumps({"type": "exec", "code": program, "language": "python"})
            )
            exec_id = (await next_frame(ws, "exec_accepted"))["exec_id"]
            for word in ("hello", "sandstorm", "bye"):
                await ws.send_message(
                    json.dumps({"type": "stdin", "exec_id": exec_id, "data": word + "\n"})
                )
                reply = ""
                while not reply.endswith("\n"):  # one print may arrive as several writes
                    reply += (await next_frame(ws, "stdout"))["data"]
                assert reply == f"echo: {word[::-1]}\n"
            await ws.send_message(json.dumps({"type": "stdin_close", "exec_id": exec_id}))
            done = (await collect_until_exit(ws, exec_id))[-1]
            assert done["result"]["verdict"] == "ok"
            # stdin to a finished exec: an error frame, and the socket still works.
            await ws.send_message(json.dumps({"type": "stdin", "exec_id": exec_id, "data": "x"}))
            error = await next_frame(ws, "error")
            assert error["code"] == "exec_not_running"
            await ws.send_message(json.dumps({"type": "exec", "command": ["echo", "still here"]}))
            assert (await next_frame(ws, "stdout"))["data"] == "still here\n"


@pytest.mark.parametrize(
    ("signal", "exit_signal"), [("SIGINT", 2), ("SIGTERM", 15), ("SIGKILL", 9)]
)
async def test_signals_reach_the_process(gw: RunningGateway, signal: str, exit_signal: int) -> None:
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        async with gw.stream(sid) as ws:
            await ws.send_message(json.dumps({"type": "exec", "command": ["sleep", "60"]}))
            exec_id = (await next_frame(ws, "exec_accepted"))["exec_id"]
            await trio.sleep(0.2)
            await ws.send_message(
                json.dumps({"type": "signal", "exec_id": exec_id, "signal": signal})
            )
            done = (await collect_until_exit(ws, exec_id))[-1]
    assert done["result"]["signal"] == exit_signal
    assert done["result"]["verdict"] == "killed"


async def test_bad_frames_get_error_frames_and_the_socket_stays_usable(gw: RunningGateway) -> None:
    bad: list[tuple[Any, str]] = [
        ("not json", "invalid_frame"),
        ("[]", "invalid_frame"),
        (json.dumps({"type": "launch"}), "invalid_frame"),
        (
            json.dumps({"type": "stdin", "exec_id": "exe_X", "data": "x", "extra": 1}),
            "invalid_frame",
        ),
        (json.dumps({"type": "signal", "exec_id": "exe_0", "signal": "SIGFOO"}), "invalid_frame"),
        (json.dumps({"type": "stdin", "exec_id": "exe_0000", "data": "x"}), "not_found"),
        (json.dumps({"type": "stdin", "exec_id": "e", "data_b64": "!!"}), "invalid_request"),
        (json.dumps({"type": "exec", "command": []}), "invalid_frame"),
        (json.dumps({"type": "exec", "code": "x"}), "invalid_request"),
        (b"\x00\x01binary", "invalid_frame"),
        ("x" * (1536 * 1024), "invalid_frame"),  # over the 1 MiB cap, under 2 MiB
    ]
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        async with gw.stream(sid, max_message_size=8 * 1024 * 1024) as ws:
            for message, code in bad:
                await ws.send_message(message)
                error = await next_frame(ws, "error")
                assert error["code"] == code, (message[:80], error)
                assert error["message"]
            await ws.send_message(json.dumps({"type": "exec", "command": ["echo", "ok"]}))
            assert (await next_frame(ws, "stdout"))["data"] == "ok\n"
        # The sandbox itself is untouched.
        assert (await gw.wait_state(sid, "idle", "failed"))["state"] == "idle"


async def test_unknown_sandbox_is_404_before_the_upgrade(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(10)):
        for sid in ("sbx_00000000000000000000000000", "nonsense"):
            response = await upgrade(gw, sid)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"


async def test_reconnect_with_since_misses_nothing(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        body = await gw.run_ok(
            command=["sh", "-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.2; done"], wait=False
        )
        sid, eid = body["id"], body["exec_id"]
        seen: list[dict[str, Any]] = []
        async with gw.stream(sid) as ws:
            while sum(1 for f in seen if f["type"] == "stdout") < 2:
                seen.append(await next_frame(ws))
        last = seen[-1]["seq"]
        await trio.sleep(0.5)  # output goes on while nobody listens
        async with gw.stream(sid, since=last) as ws:
            seen += await collect_until_exit(ws, eid)
    assert [f["seq"] for f in seen] == list(range(1, len(seen) + 1))
    assert "".join(f["data"] for f in seen if f["type"] == "stdout") == "1\n2\n3\n4\n5\n6\n"


async def test_replay_beyond_the_buffer_starts_with_lagged(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(replay_buffer_bytes=4096) as gw:
        with trio.fail_after(30):
            body = await gw.run_ok(
                code="for i in range(2000): print(i, flush=True)", language="python"
            )
            async with gw.stream(body["id"]) as ws:
                first = await next_frame(ws)
                second = await next_frame(ws)
    assert first["type"] == "lagged"
    assert first["missed_from"] == 1
    assert second["seq"] == first["missed_to"] + 1


def flood_code(chunks: int, pause_every: int = 0, pause_s: float = 0.0) -> str:
    """A program writing ``chunks`` lines of 64 KiB, optionally pausing to pace itself."""
    pace = f"    if i % {pause_every} == 0: sys.stdout.flush(); time.sleep({pause_s})\n"
    return (
        "import sys, time\nb = b'x' * 65535 + b'\\n'\n"
        f"for i in range({chunks}):\n    sys.stdout.buffer.write(b)\n"
        + (pace if pause_every else "")
    )


async def test_a_client_that_never_reads_costs_nothing(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(120)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with gw.stream(sid, message_queue_size=1) as slow:
            # 200 MB of output while the client reads nothing.
            response = await gw.client.post(
                f"/v1/sandboxes/{sid}/exec",
                json={"code": flood_code(3200), "language": "python", "timeout": 100_000},
            )
            result = response.json()["result"]
            assert result["verdict"] == "ok"
            assert result["stdout_truncated"] is True
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # What it had queued, then lagged, then close 1013.
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(await slow.get_message()))
            assert closed.value.reason.code == 1013
            assert frames[-1]["type"] == "lagged"
            assert frames[-1]["missed_from"] > frames[-2]["seq"]
        # ru_maxrss is KiB: the gateway (this process) stayed flat through 200 MB of output.
        assert (after - before) * 1024 < 100 * 1024 * 1024, (before, after)
        # The sandbox and new clients go on.
        async with gw.stream(sid, since=10**9) as ws:
            await ws.send_message(json.dumps({"type": "exec", "command": ["echo", "next"]}))
            assert (await next_frame(ws, "stdout"))["data"] == "next\n"


async def test_a_slow_client_does_not_slow_a_fast_one(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(60)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        async with (
            gw.stream(sid, message_queue_size=1) as slow,
            gw.stream(sid, max_message_size=16 << 20) as fast,
        ):
            code = flood_code(320)  # 20 MB as fast as the program can write it
            await fast.send_message(
                json.dumps({"type": "exec", "code": code, "language": "python"})
            )
            exec_id = (await next_frame(fast, "exec_accepted"))["exec_id"]
            received = 0
            while True:
                frame = await next_frame(fast)
                assert frame["type"] != "lagged", "the reading client was cut off"
                if frame["type"] == "stdout":
                    received += len(frame["data"])
                if frame["type"] == "exit" and frame["exec_id"] == exec_id:
                    break
            assert received == 320 * 65536
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(await slow.get_message()))
            assert closed.value.reason.code == 1013


async def test_stream_caps_refuse_cleanly(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(max_streams_per_sandbox=2) as gw:
        with trio.fail_after(30):
            sid = (await gw.run_ok(command=["true"]))["id"]
            async with gw.stream(sid), gw.stream(sid):
                response = await upgrade(gw, sid)
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "at_capacity"
                assert response.headers["Retry-After"] == "1"
            # Once those close, a new stream is accepted again.
            async with gw.stream(sid) as ws:
                assert (await next_frame(ws))["type"] == "status"


async def test_stream_ends_with_1000_when_the_sandbox_is_destroyed(gw: RunningGateway) -> None:
    with trio.fail_after(gw.seconds(30)):
        sid = (await gw.run_ok(command=["true"]))["id"]
        async with gw.stream(sid) as ws:
            await gw.client.delete(f"/v1/sandboxes/{sid}")
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(await ws.get_message()))
    assert closed.value.reason.code == 1000
    assert frames[-1] == {**frames[-1], "type": "status", "state": "destroyed"}
