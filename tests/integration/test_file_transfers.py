"""Large files through a real ``sandstorm serve`` process: a 1 GiB upload and download with the
gateway's memory bounded, uploads refused before their body is read, and a sandbox that runs out
of room mid-upload going on with no partial file."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from tests.harness import RawResponse, _parse_response, send_raw_request
from tests.integration.gateway_process import gateway_process

GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
#: How much the gateway's resident memory may grow while a 1 GiB file goes in and out.
RSS_GROWTH_BOUND = 32 * MIB


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _headers_only(url: str, target: str, headers: dict[str, str]) -> RawResponse:
    """A PUT that sends its head only, asking for ``100 Continue``, and reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = f"PUT {target} HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\n{lines}\r\n"
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(head.encode())
        answer = b""
        while (parsed := _parse_response(answer)) is None or parsed.status == 100:
            if parsed is not None:  # an interim "100 Continue": the final answer follows
                answer = answer[answer.index(b"\r\n\r\n") + 4 :]
                continue
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed mid-answer: {answer[:300]!r}"
            answer += chunk
    return parsed


async def _pattern(size: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * 4096  # 1 MiB
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        digest.update(piece)
        sent += len(piece)
        yield piece


async def test_a_gib_goes_in_and_out_with_the_gateways_memory_bounded(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    with trio.fail_after(600):
        async with (
            gateway_process(data_dir, tmp_path, cgroup_parent=cgroup_parent) as gp,
            httpx.AsyncClient(base_url=gp.url, timeout=120) as client,
        ):
            created = await client.post(
                "/v1/sandboxes/run",
                json={"command": ["true"], "keep_alive": 600, "memory_limit": 2 * GIB},
            )
            sid = created.json()["id"]
            url = f"/v1/sandboxes/{sid}/files/content"
            await client.get(url, params={"path": "/etc/hostname"})  # warm the routes up
            before = _rss(gp.proc.pid)
            peak = before
            sent = hashlib.sha256()

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, _rss(gp.proc.pid))
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                put = await client.put(
                    url, params={"path": "/workspace/big"}, content=_pattern(GIB, sent)
                )
                assert put.status_code == 201, put.text
                assert put.json()["size"] == GIB
                got = hashlib.sha256()
                size = 0
                async with client.stream("GET", url, params={"path": "/workspace/big"}) as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_raw():
                        got.update(chunk)
                        size += len(chunk)
                nursery.cancel_scope.cancel()
            assert size == GIB and got.hexdigest() == sent.hexdigest()
            assert peak - before <= RSS_GROWTH_BOUND, (before, peak)


async def test_uploads_past_the_limit_or_the_room_are_refused_and_leave_nothing(
    runsc_required: None, data_dir: Path, cgroup_parent: str, tmp_path: Path
) -> None:
    with trio.fail_after(180):
        async with (
            gateway_process(
                data_dir, tmp_path, cgroup_parent=cgroup_parent, max_upload_bytes=300 * MIB
            ) as gp,
            httpx.AsyncClient(base_url=gp.url, timeout=120) as client,
        ):
            created = await client.post(
                "/v1/sandboxes/run",
                json={"command": ["true"], "keep_alive": 600, "memory_limit": 160 * MIB},
            )
            sid = created.json()["id"]
            url = f"/v1/sandboxes/{sid}/files/content"

            # A declared length over max_upload_bytes: 413 at once, the body never read (the
            # client sends none of it: it waits for "100 Continue").
            refused = await _headers_only(
                gp.url, f"{url}?path=/workspace/x", {"Content-Length": str(400 * MIB)}
            )
            assert refused.status == 413, refused.body
            assert refused.json()["error"]["details"]["field"] == "body"

            # A chunked body that turns out larger: refused once it passes the limit.
            target = f"{url}?path=/workspace/x"
            chunked = await send_raw_request(
                gp.url, target, b"x" * (310 * MIB), chunked=True, method="PUT"
            )
            assert chunked.status in (413, 507), chunked.body

            # More than the sandbox has room for (its files live in its 160 MiB): 507.
            full = await send_raw_request(gp.url, target, b"x" * (250 * MIB), method="PUT")
            assert full.status == 507, full.body
            assert full.json()["error"]["code"] == "insufficient_storage"

            # The sandbox goes on, with no file at the path and no temporary file anywhere.
            done = await client.post(
                f"/v1/sandboxes/{sid}/exec",
                json={
                    "command": ["sh", "-c", "ls /workspace/x; find / -xdev -name '.sandstorm-*'"]
                },
            )
            assert done.status_code == 201, done.text
            assert done.json()["result"]["stdout"] == "", done.json()["result"]
            assert "No such file" in done.json()["result"]["stderr"]
            small = await client.put(url, params={"path": "/workspace/ok"}, content=b"fits")
            assert small.status_code == 201, small.text
