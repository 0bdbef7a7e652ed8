"""Helpers the tests share (kept out of conftest.py so test modules can import them)."""

from __future__ import annotations

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


class BodyChunks:
    """A request body sent in chunks, for httpx's `content=`.

    A plain async iterator rather than an async generator: when the gateway answers before the
    body is sent (413), httpx abandons the iteration, and an abandoned async generator is only
    finalised by the garbage collector, sometimes after the test, as an unraisable warning.
    """

    def __init__(self, body: bytes, chunk_size: int = 256 * 1024) -> None:
        self._body = body
        self._chunk_size = chunk_size
        self._offset = 0

    def __aiter__(self) -> BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._offset >= len(self._body):
            raise StopAsyncIteration
        chunk = self._body[self._offset : self._offset + self._chunk_size]
        self._offset += len(chunk)
        return chunk
