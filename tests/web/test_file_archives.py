"""Tar archives of a sandbox's files, both ways (SPEC §8), on real sandboxes (gVisor and QEMU):
a tree down as tar and tar.gz, a tree up and extracted as the sandbox's user, and hostile or
broken archives refused with nothing extracted."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import trio

from tests.harness import RunningGateway


async def _sh(g: RunningGateway, sandbox_id: str, script: str) -> dict[str, Any]:
    response = await g.client.post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"command": ["sh", "-c", script]}
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["result"]
    return result


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], *, gzip: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o644)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


async def test_a_tree_comes_down_as_tar_and_tar_gz(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = (await g.run_ok(language="bash", code="true", keep_alive=300))["id"]
        await _sh(
            g,
            sid,
            "cd /workspace && mkdir -p p/sub/empty && printf one > p/a.txt"
            " && head -c 300000 /dev/urandom > p/sub/blob && chmod 600 p/a.txt"
            " && ln -s a.txt p/link",
        )
        blob = await g.client.get(
            f"/v1/sandboxes/{sid}/files/content", params={"path": "/workspace/p/sub/blob"}
        )
        for form, mode in (("tar", "r:"), ("tar.gz", "r:gz")):
            response = await g.client.get(
                f"/v1/sandboxes/{sid}/files/archive",
                params={"path": "/workspace/p", "format": form},
            )
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] in ("application/x-tar", "application/gzip")
            with tarfile.open(fileobj=io.BytesIO(response.content), mode=mode) as tar:
                members = {m.name: m for m in tar.getmembers()}
                assert set(members) == {
                    "p",
                    "p/a.txt",
                    "p/link",
                    "p/sub",
                    "p/sub/blob",
                    "p/sub/empty",
                }
                assert members["p/a.txt"].mode & 0o777 == 0o600
                assert members["p/link"].issym() and members["p/link"].linkname == "a.txt"
                assert members["p/sub/empty"].isdir()
                extracted = tar.extractfile("p/sub/blob")
                assert extracted is not None and extracted.read() == blob.content
        one = await g.client.get(
            f"/v1/sandboxes/{sid}/files/archive", params={"path": "/workspace/p/a.txt"}
        )
        with tarfile.open(fileobj=io.BytesIO(one.content)) as tar:
            assert tar.getnames() == ["a.txt"]
        missing = await g.client.get(
            f"/v1/sandboxes/{sid}/files/archive", params={"path": "/workspace/none"}
        )
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


async def test_a_tree_goes_up_and_is_extracted_as_the_sandbox_user(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = (await g.run_ok(language="bash", code="true", keep_alive=300))["id"]
        body = _tar(
            [
                (_member("proj", tarfile.DIRTYPE, mode=0o755), None),
                (_member("proj/run.sh", mode=0o4755), b"#!/bin/sh\necho ran\n"),
                (_member("proj/data/deep/x.bin"), bytes(range(256)) * 100),
                (_member("proj/latest", tarfile.SYMTYPE, linkname="run.sh"), None),
            ],
            gzip=True,
        )
        put = await g.client.put(
            f"/v1/sandboxes/{sid}/files/archive", params={"path": "/workspace/up"}, content=body
        )
        assert put.status_code == 201, put.text
        assert put.json() == {"path": "/workspace/up", "files": 3, "bytes": 25600 + 19}
        seen = await _sh(
            g,
            sid,
            "cd /workspace/up/proj && ./latest && stat -c '%a %u' run.sh"
            " && wc -c < data/deep/x.bin && ls -A /workspace/up",
        )
        # setuid stripped, owned by the sandbox's user.
        assert seen["stdout"] == "ran\n755 1000\n25600\nproj\n", seen


async def test_hostile_and_broken_archives_extract_nothing(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(90)):
        sid = (await g.run_ok(language="bash", code="mkdir /workspace/t", keep_alive=300))["id"]
        good = (_member("fine.txt"), b"fine")
        hostile = {
            "/etc/evil": [good, (_member("/etc/evil"), b"x")],
            "../escape": [good, (_member("../escape"), b"x")],
            "dev": [good, (_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), None)],
            "out": [good, (_member("out", tarfile.SYMTYPE, linkname="../../etc"), None)],
        }
        for name, members in hostile.items():
            response = await g.client.put(
                f"/v1/sandboxes/{sid}/files/archive",
                params={"path": "/workspace/t"},
                content=_tar(members),
            )
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "unsafe_archive", error
            assert name in error["message"] or error["details"].get("member") == name, error
        broken = await g.client.put(
            f"/v1/sandboxes/{sid}/files/archive",
            params={"path": "/workspace/t"},
            content=_tar([good])[:700],
        )
        assert broken.status_code == 400, broken.text
        assert broken.json()["error"]["details"]["field"] == "body"
        left = await _sh(g, sid, "ls -A /workspace/t; ls /etc/evil /escape 2>&1 | wc -l")
        assert left["stdout"] == "2\n", left


async def test_an_archive_of_a_unicode_name_is_named_for_every_client(g: RunningGateway) -> None:
    with trio.fail_after(g.seconds(60)):
        sid = (await g.run_ok(language="bash", code="mkdir /workspace/données", keep_alive=300))[
            "id"
        ]
        response = await g.client.get(
            f"/v1/sandboxes/{sid}/files/archive", params={"path": "/workspace/données"}
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-disposition"] == (
            "attachment; filename=\"donn_es.tar\"; filename*=UTF-8''donn%C3%A9es.tar"
        )
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            assert tar.getnames() == ["données"]
