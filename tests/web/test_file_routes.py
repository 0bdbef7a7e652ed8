"""The file routes (SPEC §8) on real sandboxes, gVisor and QEMU: every endpoint, its errors, and
permissions as the sandbox's user (uid 1000), through a real HTTP client."""

from __future__ import annotations

import os
from typing import Any

import httpx
import trio

from tests.harness import RunningGateway

KEPT = {"keep_alive": 300}


async def _sandbox(g: RunningGateway) -> str:
    body = await g.run_ok(language="bash", code="true", **KEPT)
    sandbox_id: str = body["id"]
    return sandbox_id


async def _sh(g: RunningGateway, sandbox_id: str, script: str) -> dict[str, Any]:
    response = await g.client.post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"command": ["sh", "-c", script]}
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["result"]
    return result


def _files(sandbox_id: str, what: str = "") -> str:
    return f"/v1/sandboxes/{sandbox_id}/files{what}"


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


async def test_upload_then_download_and_stat(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = await _sandbox(g)
        data = os.urandom(3 * 1024 * 1024 + 17)
        put = await g.client.put(
            _files(sid, "/content"),
            params={"path": "/workspace/in/data.bin", "mode": "0640"},
            content=data,
        )
        assert put.status_code == 201, put.text
        entry = put.json()
        assert entry == {
            "name": "data.bin",
            "path": "/workspace/in/data.bin",
            "type": "file",
            "size": len(data),
            "mode": "0640",
            "mtime": entry["mtime"],
        }
        assert entry["mtime"].endswith("Z")
        # The sandbox's own code sees it, owned by its user, with the mode asked for.
        seen = await _sh(g, sid, "stat -c '%u %g %a %s' /workspace/in/data.bin; id -u")
        assert seen["stdout"] == f"1000 1000 640 {len(data)}\n1000\n"
        got = await g.client.get(_files(sid, "/content"), params={"path": "/workspace/in/data.bin"})
        assert got.status_code == 200
        assert got.headers["content-type"] == "application/octet-stream"
        assert int(got.headers["content-length"]) == len(data)
        assert got.content == data
        part = await g.client.get(
            _files(sid, "/content"),
            params={"path": "/workspace/in/data.bin"},
            headers={"Range": "bytes=10-29"},
        )
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 10-29/{len(data)}"
        assert part.content == data[10:30]
        tail = await g.client.get(
            _files(sid, "/content"),
            params={"path": "/workspace/in/data.bin"},
            headers={"Range": "bytes=-5"},
        )
        assert (tail.status_code, tail.content) == (206, data[-5:])
        beyond = await g.client.get(
            _files(sid, "/content"),
            params={"path": "/workspace/in/data.bin"},
            headers={"Range": f"bytes={len(data)}-"},
        )
        _error(beyond, 416, "range_not_satisfiable")
        assert beyond.headers["content-range"] == f"bytes */{len(data)}"
        stat = await g.client.get(_files(sid, "/stat"), params={"path": "/workspace/in"})
        assert (stat.status_code, stat.json()["type"]) == (200, "dir")
        # Code's output comes out the same way, the path normalised.
        await _sh(g, sid, "printf 'chart' > /workspace/out.png")
        out = await g.client.get(
            _files(sid, "/content"), params={"path": "/workspace//x/../out.png"}
        )
        assert out.content == b"chart"


async def test_upload_replaces_atomically_and_follows_symlinks(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = await _sandbox(g)
        await _sh(
            g, sid, "mkdir /workspace/s && cd /workspace/s && echo old > real && ln -s real link"
        )
        put = await g.client.put(
            _files(sid, "/content"), params={"path": "/workspace/s/link"}, content=b"new\n"
        )
        assert put.status_code == 201, put.text
        seen = await _sh(g, sid, "cd /workspace/s && cat real; readlink link; ls -A")
        assert seen["stdout"] == "new\nreal\nlink\nreal\n"
        empty = await g.client.put(
            _files(sid, "/content"), params={"path": "/workspace/empty"}, content=b""
        )
        assert (empty.status_code, empty.json()["size"]) == (201, 0)


async def test_list_mkdir_move_delete(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = await _sandbox(g)
        await _sh(
            g,
            sid,
            "mkdir -p /workspace/t/a/b && touch /workspace/t/a/b/c /workspace/t/f"
            " && ln -s a /workspace/t/l",
        )
        listing = await g.client.get(_files(sid, "/list"), params={"path": "/workspace/t"})
        assert listing.status_code == 200, listing.text
        body = listing.json()
        assert body["path"] == "/workspace/t" and body["truncated"] is False
        by_name = {e["name"]: e for e in body["entries"]}
        assert set(by_name) == {"a", "f", "l"}
        assert (by_name["a"]["type"], by_name["f"]["type"]) == ("dir", "file")
        assert (by_name["l"]["type"], by_name["l"]["target"]) == ("symlink", "a")
        deep = await g.client.get(
            _files(sid, "/list"), params={"path": "/workspace/t", "depth": "3"}
        )
        assert {e["path"] for e in deep.json()["entries"]} == {
            "/workspace/t/a",
            "/workspace/t/a/b",
            "/workspace/t/a/b/c",
            "/workspace/t/f",
            "/workspace/t/l",
        }
        made = await g.client.post(
            _files(sid, "/mkdir"), params={"path": "/workspace/t/x/y", "parents": "true"}
        )
        assert (made.status_code, made.json()["type"]) == (201, "dir")
        _error(
            await g.client.post(_files(sid, "/mkdir"), params={"path": "/workspace/t/x"}),
            409,
            "file_exists",
        )
        moved = await g.client.post(
            _files(sid, "/move"), json={"from": "/workspace/t/f", "to": "/workspace/t/x/g"}
        )
        assert (moved.status_code, moved.json()["path"]) == (200, "/workspace/t/x/g")
        await _sh(g, sid, "touch /workspace/t/h")
        _error(
            await g.client.post(
                _files(sid, "/move"), json={"from": "/workspace/t/h", "to": "/workspace/t/x/g"}
            ),
            409,
            "file_exists",
        )
        over = await g.client.post(
            _files(sid, "/move"),
            json={"from": "/workspace/t/h", "to": "/workspace/t/x/g", "overwrite": True},
        )
        assert over.status_code == 200
        _error(
            await g.client.delete(_files(sid), params={"path": "/workspace/t/x"}),
            409,
            "wrong_file_type",
        )
        gone = await g.client.delete(
            _files(sid), params={"path": "/workspace/t", "recursive": "true"}
        )
        assert gone.status_code == 204
        assert (await _sh(g, sid, "ls /workspace/t || echo gone"))["stdout"] == "gone\n"


async def test_bad_paths_and_wrong_types(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = await _sandbox(g)
        for bad in ("", "relative/x", "/a\x00b", "/" + "a" * 4096):
            response = await g.client.get(_files(sid, "/stat"), params={"path": bad})
            assert _error(response, 400, "invalid_request")["details"]["field"] == "path"
        missing = await g.client.get(_files(sid, "/stat"))
        assert _error(missing, 400, "invalid_request")["details"]["field"] == "path"
        for what in ("/content", "/stat", "/list"):
            response = await g.client.get(_files(sid, what), params={"path": "/workspace/nope"})
            _error(response, 404, "file_not_found")
        _error(
            await g.client.get(_files(sid, "/content"), params={"path": "/workspace"}),
            409,
            "wrong_file_type",
        )
        await _sh(g, sid, "touch /workspace/file")
        _error(
            await g.client.get(_files(sid, "/list"), params={"path": "/workspace/file"}),
            409,
            "wrong_file_type",
        )
        _error(
            await g.client.put(
                _files(sid, "/content"), params={"path": "/workspace"}, content=b"x"
            ),
            409,
            "wrong_file_type",
        )
        _error(
            await g.client.put(
                _files(sid, "/content"), params={"path": "/workspace/file/under"}, content=b"x"
            ),
            409,
            "wrong_file_type",
        )
        bad_mode = await g.client.put(
            _files(sid, "/content"), params={"path": "/workspace/m", "mode": "4755"}, content=b""
        )
        assert _error(bad_mode, 400, "invalid_request")["details"]["field"] == "mode"
        bad_depth = await g.client.get(
            _files(sid, "/list"), params={"path": "/workspace", "depth": "17"}
        )
        assert _error(bad_depth, 400, "invalid_request")["details"]["field"] == "depth"
        bad_move = await g.client.post(_files(sid, "/move"), json={"from": "/workspace/file"})
        assert _error(bad_move, 400, "invalid_request")["details"]["field"] == "to"
        # Nothing was left behind by any of it: no temporary file anywhere it wrote.
        leftovers = await _sh(g, sid, "find / -xdev -name '.sandstorm-*' 2>/dev/null")
        assert leftovers["stdout"] == ""


async def test_permissions_are_the_sandbox_users(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = await _sandbox(g)
        for path in ("/etc/passwd", "/usr/bin/newfile", "/root/x"):
            response = await g.client.put(
                _files(sid, "/content"), params={"path": path}, content=b"owned"
            )
            _error(response, 403, "permission_denied")
        _error(
            await g.client.delete(_files(sid), params={"path": "/etc/hostname"}),
            403,
            "permission_denied",
        )
        await _sh(
            g,
            sid,
            "mkdir /workspace/locked && touch /workspace/locked/f && chmod 000 /workspace/locked",
        )
        _error(
            await g.client.get(_files(sid, "/content"), params={"path": "/workspace/locked/f"}),
            403,
            "permission_denied",
        )
        # Readable system files are readable, as for the sandbox's own code.
        passwd = await g.client.get(_files(sid, "/content"), params={"path": "/etc/passwd"})
        assert passwd.status_code == 200 and b"root:" in passwd.content


async def test_another_tenants_sandbox_is_an_unknown_id(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(30)):
        unknown = "sbx_" + "0" * 26
        for method, what in (("GET", "/content"), ("PUT", "/content"), ("GET", "/list")):
            response = await g.client.request(
                method, _files(unknown, what), params={"path": "/workspace/x"}, content=b"x"
            )
            _error(response, 404, "not_found")


async def test_uploaded_files_are_in_a_snapshot_and_its_resume(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(120)):
        sid = await _sandbox(g)
        data = os.urandom(200_000)
        put = await g.client.put(
            _files(sid, "/content"), params={"path": "/workspace/kept.bin"}, content=data
        )
        assert put.status_code == 201, put.text
        snap = await g.client.post(f"/v1/sandboxes/{sid}/snapshot", json={})
        assert snap.status_code == 201, snap.text
        resumed = await g.client.post(
            "/v1/sandboxes/resume", json={"snapshot_id": snap.json()["snapshot_id"]}
        )
        assert resumed.status_code == 201, resumed.text
        rid = resumed.json()["id"]
        got = await g.client.get(_files(rid, "/content"), params={"path": "/workspace/kept.bin"})
        assert (got.status_code, got.content) == (200, data)
        # And the resumed sandbox takes new files as any other.
        more = await g.client.put(
            _files(rid, "/content"), params={"path": "/workspace/more"}, content=b"more"
        )
        assert more.status_code == 201, more.text


async def test_abandoned_transfers_leave_nothing_and_the_sandbox_serves_on(
    g: RunningGateway,
) -> None:
    with trio.fail_after(g.seconds(90)):
        sid = await _sandbox(g)
        await _sh(g, sid, "head -c 30000000 /dev/zero > /workspace/big")
        host, port = g.url.removeprefix("http://").split(":")
        target = _files(sid, "/content")
        for _ in range(5):
            # A client that takes the start of a download and goes; one that sends part of an
            # upload and goes.
            for head, body in (
                (f"GET {target}?path=/workspace/big HTTP/1.1\r\nHost: x\r\n\r\n", b""),
                (
                    f"PUT {target}?path=/workspace/half HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: 1000000\r\n\r\n",
                    b"x" * 100_000,
                ),
            ):
                async with await trio.open_tcp_stream(host, int(port)) as stream:
                    await stream.send_all(head.encode() + body)
                    if not body:
                        assert b" 200 " in await stream.receive_some(65536)
                    else:
                        await trio.sleep(0.1)
        # Nothing half-written anywhere, and the sandbox serves files and execs as before.
        with trio.fail_after(10):
            while (await _sh(g, sid, "find /workspace -name '.sandstorm-*' -o -name half"))[
                "stdout"
            ]:
                await trio.sleep(0.2)
        got = await g.client.get(_files(sid, "/stat"), params={"path": "/workspace/big"})
        assert got.json()["size"] == 30_000_000
