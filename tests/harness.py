"""Helpers the tests share (kept out of conftest.py so test modules can import them)."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from sandstorm.client import AsyncClient
from sandstorm.config import Config


@dataclass
class RunningGateway:
    url: str
    client: httpx.AsyncClient
    config: Config
    data_dir: Path

    async def run(self, **body: Any) -> httpx.Response:
        return await self.client.post("/v1/sandboxes/run", json=body)

    async def run_ok(self, **body: Any) -> dict[str, Any]:
        response = await self.run(**body)
        assert response.status_code in (201, 202), response.text
        data: dict[str, Any] = response.json()
        return data

    async def status(self, sandbox_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/sandboxes/{sandbox_id}/status")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def wait_state(self, sandbox_id: str, *states: str) -> dict[str, Any]:
        """Poll status until the sandbox is in one of ``states`` (callers bound the time)."""
        while True:
            status = await self.status(sandbox_id)
            if status["state"] in states:
                return status
            await trio.sleep(0.05)

    @asynccontextmanager
    async def stream(self, sandbox_id: str, since: int | None = None, **options: Any) -> Any:
        """A real WebSocket on the sandbox's stream (``.ws`` gives raw frames)."""
        async with (
            AsyncClient(self.url) as client,
            client.stream(sandbox_id, since or 0, **options) as stream,
        ):
            yield stream.ws


def never_500(gw: RunningGateway) -> None:
    """Make every 5xx but 503 from ``gw.client`` fail the request that got it, where it happens."""

    async def hook(response: httpx.Response) -> None:
        if response.status_code >= 500 and response.status_code != 503:
            await response.aread()
            raise AssertionError(
                f"{response.status_code} for {response.request.method} "
                f"{response.request.url.path}: {response.text}"
            )

    gw.client.event_hooks["response"].append(hook)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send_raw_request(
    url: str, path: str, body: bytes, *, chunked: bool = False, chunk_size: int = 256 * 1024
) -> RawResponse:
    """POST `body` over a plain socket while reading the answer, which may come before the body
    is sent whole (413). httpx cannot do this cleanly: it abandons its own async generator over
    the body, which the garbage collector later reports as an unraisable warning."""
    host, port = url.removeprefix("http://").split(":")
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    answer = bytearray()

    async def send_body() -> None:
        try:
            await stream.send_all(head)
            for offset in range(0, len(body), chunk_size):
                chunk = body[offset : offset + chunk_size]
                if chunked:
                    chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                await stream.send_all(chunk)
            if chunked:
                await stream.send_all(b"0\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # The server answered and closed before taking the whole body.

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_body)
        while (parsed := _parse_response(bytes(answer))) is None:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"connection closed mid-answer: {bytes(answer)[:300]!r}")
            answer += chunk
        nursery.cancel_scope.cancel()
    return parsed


def _parse_response(data: bytes) -> RawResponse | None:
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return RawResponse(int(status_line.split()[1]), headers, rest[:length])
