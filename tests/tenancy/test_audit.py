"""The audit log on a real gateway: one record per mutating call, refused ones included, read
back with ``sandstorm audit``; and nothing secret ever reaches the database files."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from sandstorm.sdk import AsyncClient
from sandstorm.store import DB_NAME, Store
from tests.harness import RunningGateway
from tests.tenancy.helpers import client_for, make_key

REPO = Path(__file__).resolve().parents[2]


async def admin(data_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] = await trio.run_process(
        [sys.executable, "-m", "sandstorm", *args, "--data-dir", str(data_dir)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO,
    )
    return result


def _records(data_dir: Path) -> list[Any]:
    store = Store(data_dir).open()
    try:
        return store.audit()
    finally:
        store.close()


async def test_every_mutating_call_is_recorded(gw: RunningGateway) -> None:
    with trio.fail_after(120):
        _, key_a = await make_key(gw.data_dir, "audited")
        _, key_b = await make_key(gw.data_dir, "intruder")
        async with client_for(gw, key_a) as a, client_for(gw, key_b) as b:
            run = (await a.post("/v1/sandboxes/run", json={"command": ["true"]})).json()
            sid = run["id"]
            exe = (await a.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["true"]})).json()
            snap = (await a.post(f"/v1/sandboxes/{sid}/snapshot", json={})).json()
            snp = snap["snapshot_id"]
            resumed = (await a.post("/v1/sandboxes/resume", json={"snapshot_id": snp})).json()
            async with AsyncClient(gw.url, api_key=key_a) as client, client.stream(sid) as s:
                await s.ws.send_message(
                    json.dumps({"type": "exec", "id": "1", "command": ["sleep", "30"]})
                )
                while (frame := json.loads(await s.ws.get_message()))["type"] != "exec_accepted":
                    pass
                stream_exec = frame["exec_id"]
                await s.ws.send_message(
                    json.dumps({"type": "signal", "exec_id": stream_exec, "signal": "SIGKILL"})
                )
                while (frame := json.loads(await s.ws.get_message()))["type"] != "exit":
                    pass
            refused = await b.delete(f"/v1/sandboxes/{sid}")  # not B's: 404
            assert refused.status_code == 404
            assert (await a.delete(f"/v1/sandboxes/{sid}")).status_code == 200
            assert (await a.delete(f"/v1/snapshots/{snp}")).status_code == 200
            unauthenticated = await gw.client.post("/v1/sandboxes/run", json={"command": ["true"]})
            assert unauthenticated.status_code == 401  # nobody to hold to account: not audited
            assert (await a.get("/v1/sandboxes")).status_code == 200  # reads are not audited

        got = [
            (r.tenant, r.action, r.sandbox_id, r.exec_id, r.snapshot_id, r.outcome)
            for r in await trio.to_thread.run_sync(_records, gw.data_dir)
        ]
        assert got == [
            ("audited", "run", sid, run["exec_id"], None, "201"),
            ("audited", "exec", sid, exe["exec_id"], None, "201"),
            ("audited", "snapshot", sid, None, snp, "201"),
            ("audited", "resume", resumed["id"], None, snp, "201"),
            ("audited", "stream_exec", sid, stream_exec, None, "ok"),
            ("audited", "stream_signal", sid, stream_exec, None, "ok"),
            ("intruder", "delete_sandbox", sid, None, None, "404 not_found"),
            ("audited", "delete_sandbox", sid, None, None, "200"),
            ("audited", "delete_snapshot", None, None, snp, "200"),
        ]

        # The command: by tenant, by time, as JSON.
        out = await admin(gw.data_dir, "audit", "--tenant", "intruder", "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [(r["action"], r["outcome"], r["sandbox_id"]) for r in rows] == [
            ("delete_sandbox", "404 not_found", sid)
        ]
        assert rows[0]["request_id"]
        recent = await admin(gw.data_dir, "audit", "--since", "10m")
        assert recent.returncode == 0 and recent.stdout.count(b"\n") == len(got)
        future = await admin(gw.data_dir, "audit", "--since", "2999-01-01T00:00:00Z", "--json")
        assert json.loads(future.stdout) == []
        bad = await admin(gw.data_dir, "audit", "--since", "last tuesday")
        assert bad.returncode == 2 and b"--since" in bad.stderr


async def test_no_secret_reaches_the_database(start_gateway: Any) -> None:
    env_secret = "envsecret" + secrets.token_hex(8)
    code_secret = "codesecret" + secrets.token_hex(8)
    stdin_secret = "stdinsecret" + secrets.token_hex(8)
    arg_secret = "argsecret" + secrets.token_hex(8)
    file_secret = "filesecret" + secrets.token_hex(8)
    async with start_gateway() as gw:
        with trio.fail_after(120):
            _, key = await make_key(gw.data_dir, "careful")
            async with client_for(gw, key) as c:
                # The program uses every secret but prints none of them.
                code = (
                    f"import os, sys; s = {code_secret!r}; "
                    "data = sys.stdin.read(); "
                    f"ok = os.environ['SECRET'] == {env_secret!r} and {stdin_secret!r} in data; "
                    "print('ok' if ok else 'bad')"
                )
                run = await c.post(
                    "/v1/sandboxes/run",
                    json={
                        "code": code,
                        "language": "python",
                        "environment": {"SECRET": env_secret},
                        "stdin": stdin_secret,
                        "files": {"/workspace/f": file_secret},
                        "keep_alive": 60,
                    },
                )
                assert run.status_code == 201, run.text
                assert run.json()["result"]["stdout"] == "ok\n"
                sid = run.json()["id"]
                exe = await c.post(
                    f"/v1/sandboxes/{sid}/exec",
                    json={
                        "command": ["sh", "-c", f"true {arg_secret}"],
                        "environment": {"SECRET": env_secret},
                    },
                )
                assert exe.status_code == 201, exe.text
                snap = await c.post(f"/v1/sandboxes/{sid}/snapshot", json={})
                assert snap.status_code == 201, snap.text
                assert (await c.delete(f"/v1/sandboxes/{sid}")).status_code == 200

            def raw_db() -> bytes:
                files = [p for p in gw.data_dir.iterdir() if p.name.startswith(DB_NAME)]
                assert {p.name for p in files} >= {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"}
                return b"".join(p.read_bytes() for p in files)

            raw = await trio.to_thread.run_sync(raw_db)
            assert sid.encode() in raw  # the records are there...
            for secret in (env_secret, code_secret, stdin_secret, arg_secret, file_secret, key):
                assert secret.encode() not in raw, secret  # ...and no secret is


async def test_a_call_whose_client_leaves_before_the_answer_is_still_recorded(
    gw: RunningGateway,
) -> None:
    """A ``wait: true`` run whose client disconnects: the handler is cancelled before any
    answer, and the record says so instead of being lost."""
    host, port = gw.url.removeprefix("http://").split(":")
    body = json.dumps({"command": ["sleep", "30"], "keep_alive": 0}).encode()
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            b"POST /v1/sandboxes/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # Wait until the sandbox runs the command, then leave without reading the answer.
        while not (await gw.client.get("/v1/sandboxes")).json()["sandboxes"]:
            await trio.sleep(0.05)
        await stream.aclose()
        while True:
            got = await trio.to_thread.run_sync(_records, gw.data_dir)
            if got:
                break
            await trio.sleep(0.1)
    assert [(r.action, r.outcome) for r in got] == [("run", "499 client_closed")], got
    assert got[0].tenant == "default"


async def test_file_writes_moves_and_deletes_are_audited_with_their_path(
    gw: RunningGateway,
) -> None:
    secret = b"never-in-the-log-" + secrets.token_hex(8).encode()
    with trio.fail_after(120):
        _, key = await make_key(gw.data_dir, "filer")
        async with client_for(gw, key) as a:
            run = await a.post("/v1/sandboxes/run", json={"command": ["true"], "keep_alive": 60})
            sid = run.json()["id"]
            files = f"/v1/sandboxes/{sid}/files"
            put = await a.put(f"{files}/content", params={"path": "/workspace/s"}, content=secret)
            assert put.status_code == 201
            made = await a.post(f"{files}/mkdir", params={"path": "/workspace/made"})
            assert made.status_code == 201
            moved = await a.post(
                f"{files}/move", json={"from": "/workspace/s", "to": "/workspace/made/s"}
            )
            assert moved.status_code == 200
            missing = await a.delete(files, params={"path": "/workspace/nope"})
            assert missing.status_code == 404
            gone = await a.delete(files, params={"path": "/workspace/made", "recursive": "true"})
            assert gone.status_code == 204
            read = await a.get(f"{files}/list", params={"path": "/workspace"})
            assert read.status_code == 200  # reads are not audited
        got = [
            (r.action, r.sandbox_id, r.target, r.outcome)
            for r in await trio.to_thread.run_sync(_records, gw.data_dir)
            if r.action.startswith("files_")
        ]
        assert got == [
            ("files_write", sid, "/workspace/s", "201"),
            ("files_mkdir", sid, "/workspace/made", "201"),
            ("files_move", sid, "/workspace/s -> /workspace/made/s", "200"),
            ("files_delete", sid, "/workspace/nope", "404 file_not_found"),
            ("files_delete", sid, "/workspace/made", "204"),
        ]
        for path in gw.data_dir.glob(f"{DB_NAME}*"):
            assert secret not in path.read_bytes()
