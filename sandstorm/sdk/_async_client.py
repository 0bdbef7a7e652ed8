"""``AsyncClient``: the gateway's REST calls and its live stream, on Trio."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx

from sandstorm.api.types import (
    DeleteResponse,
    ExecResponse,
    ExecSummary,
    LanguageInfo,
    RunResponse,
    RuntimeInfo,
    SandboxList,
    SandboxStatus,
    SnapshotInfo,
    SnapshotList,
)
from sandstorm.sdk._async_files import AsyncFiles
from sandstorm.sdk._http import (
    POOL_LIMITS,
    T,
    auth_headers,
    decode,
    default_api_key,
    default_url,
    non_null,
    raise_for,
)
from sandstorm.sdk._stream import MAX_FRAME_BYTES, Stream, open_stream


class AsyncClient:
    def __init__(
        self, url: str | None = None, *, timeout: float = 120.0, api_key: str | None = None
    ) -> None:
        """``api_key`` (default ``$SANDSTORM_API_KEY``) is sent as a Bearer token on every
        request and on the stream's upgrade."""
        self.url = (url or default_url()).rstrip("/")
        self.api_key = api_key or default_api_key()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout,
            headers=auth_headers(self.api_key),
            limits=POOL_LIMITS,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, kind: type[T], body: Any = None) -> T:
        response = await self._http.request(method, path, json=body)
        return decode(response, kind)

    # -- sandboxes
    async def run(self, **fields: Any) -> RunResponse:
        """POST /v1/sandboxes/run; fields as in the SPEC (code, language, command, …)."""
        return await self._call("POST", "/v1/sandboxes/run", RunResponse, non_null(**fields))

    async def exec(self, sandbox_id: str, **fields: Any) -> ExecResponse:
        path = f"/v1/sandboxes/{sandbox_id}/exec"
        return await self._call("POST", path, ExecResponse, non_null(**fields))

    async def exec_result(self, sandbox_id: str, exec_id: str) -> ExecSummary:
        return await self._call("GET", f"/v1/sandboxes/{sandbox_id}/execs/{exec_id}", ExecSummary)

    async def status(self, sandbox_id: str) -> SandboxStatus:
        return await self._call("GET", f"/v1/sandboxes/{sandbox_id}/status", SandboxStatus)

    async def sandboxes(self) -> list[SandboxStatus]:
        return (await self._call("GET", "/v1/sandboxes", SandboxList)).sandboxes

    async def delete(self, sandbox_id: str) -> DeleteResponse:
        return await self._call("DELETE", f"/v1/sandboxes/{sandbox_id}", DeleteResponse)

    def files(self, sandbox_id: str) -> AsyncFiles:
        """The files of the running sandbox ``sandbox_id``: read, write, list, stat, mkdir,
        move, remove, upload_dir, download_dir, watch."""
        return AsyncFiles(self._http, self.url, self.api_key, sandbox_id)

    # -- snapshots
    async def snapshot(self, sandbox_id: str, *, leave_running: bool = True) -> SnapshotInfo:
        body = {"leave_running": leave_running}
        return await self._call("POST", f"/v1/sandboxes/{sandbox_id}/snapshot", SnapshotInfo, body)

    async def resume(self, snapshot_id: str, *, keep_alive: int = 300) -> SandboxStatus:
        body = {"snapshot_id": snapshot_id, "keep_alive": keep_alive}
        return await self._call("POST", "/v1/sandboxes/resume", SandboxStatus, body)

    async def snapshots(self) -> list[SnapshotInfo]:
        return (await self._call("GET", "/v1/snapshots", SnapshotList)).snapshots

    async def delete_snapshot(self, snapshot_id: str) -> None:
        raise_for(await self._http.delete(f"/v1/snapshots/{snapshot_id}"))

    # -- catalogue
    async def runtimes(self) -> list[RuntimeInfo]:
        return await self._call("GET", "/v1/runtimes", list[RuntimeInfo])

    async def languages(self) -> list[LanguageInfo]:
        return await self._call("GET", "/v1/languages", list[LanguageInfo])

    # -- the live stream
    def stream(
        self,
        sandbox_id: str,
        since: int = 0,
        *,
        message_queue_size: int = 64,
        max_message_size: int = MAX_FRAME_BYTES,
    ) -> AbstractAsyncContextManager[Stream]:
        """Open ``GET /v1/sandboxes/{id}/stream``; iterate the stream for events.

        ``message_queue_size`` frames are read ahead at most; past that the client stops
        reading the socket (and the gateway cuts a client that lags too far). Raises
        :class:`SandstormError` when the gateway refuses the stream (404, 503) before upgrading.
        """
        return open_stream(
            self.url,
            self.api_key,
            sandbox_id,
            since,
            message_queue_size=message_queue_size,
            max_message_size=max_message_size,
        )
