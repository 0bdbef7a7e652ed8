"""``Client``: the same REST calls as ``AsyncClient``, blocking; streams through a worker
thread."""

from __future__ import annotations

from collections.abc import Iterator
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
from sandstorm.sdk._files import Files
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
from sandstorm.sdk._stream import MAX_FRAME_BYTES, open_stream
from sandstorm.sdk._threads import iterate_in_thread


class Client:
    """The synchronous client: the same REST calls, blocking; streams through a worker thread."""

    def __init__(
        self, url: str | None = None, *, timeout: float = 120.0, api_key: str | None = None
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.api_key = api_key or default_api_key()
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            headers=auth_headers(self.api_key),
            limits=POOL_LIMITS,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, kind: type[T], body: Any = None) -> T:
        return decode(self._http.request(method, path, json=body), kind)

    def run(self, **fields: Any) -> RunResponse:
        return self._call("POST", "/v1/sandboxes/run", RunResponse, non_null(**fields))

    def exec(self, sandbox_id: str, **fields: Any) -> ExecResponse:
        path = f"/v1/sandboxes/{sandbox_id}/exec"
        return self._call("POST", path, ExecResponse, non_null(**fields))

    def exec_result(self, sandbox_id: str, exec_id: str) -> ExecSummary:
        return self._call("GET", f"/v1/sandboxes/{sandbox_id}/execs/{exec_id}", ExecSummary)

    def status(self, sandbox_id: str) -> SandboxStatus:
        return self._call("GET", f"/v1/sandboxes/{sandbox_id}/status", SandboxStatus)

    def sandboxes(self) -> list[SandboxStatus]:
        return self._call("GET", "/v1/sandboxes", SandboxList).sandboxes

    def delete(self, sandbox_id: str) -> DeleteResponse:
        return self._call("DELETE", f"/v1/sandboxes/{sandbox_id}", DeleteResponse)

    def files(self, sandbox_id: str) -> Files:
        """The files of the running sandbox ``sandbox_id``: read, write, list, stat, mkdir,
        move, remove, upload_dir, download_dir, watch."""
        return Files(self._http, self.url, self.api_key, sandbox_id)

    def snapshot(self, sandbox_id: str, *, leave_running: bool = True) -> SnapshotInfo:
        body = {"leave_running": leave_running}
        return self._call("POST", f"/v1/sandboxes/{sandbox_id}/snapshot", SnapshotInfo, body)

    def resume(self, snapshot_id: str, *, keep_alive: int = 300) -> SandboxStatus:
        body = {"snapshot_id": snapshot_id, "keep_alive": keep_alive}
        return self._call("POST", "/v1/sandboxes/resume", SandboxStatus, body)

    def snapshots(self) -> list[SnapshotInfo]:
        return self._call("GET", "/v1/snapshots", SnapshotList).snapshots

    def delete_snapshot(self, snapshot_id: str) -> None:
        raise_for(self._http.delete(f"/v1/snapshots/{snapshot_id}"))

    def runtimes(self) -> list[RuntimeInfo]:
        return self._call("GET", "/v1/runtimes", list[RuntimeInfo])

    def languages(self) -> list[LanguageInfo]:
        return self._call("GET", "/v1/languages", list[LanguageInfo])

    def iter_events(self, sandbox_id: str, since: int = 0) -> Iterator[Any]:
        """Yield the sandbox's stream events until the gateway closes the stream.

        A worker thread runs the async stream; a bounded queue hands events over, so a caller
        that stops iterating stops the reading too. Leaving the loop early closes the stream.
        """
        return iterate_in_thread(
            lambda: open_stream(
                self.url,
                self.api_key,
                sandbox_id,
                since,
                message_queue_size=64,
                max_message_size=MAX_FRAME_BYTES,
            ),
            name="sandstorm-stream",
        )
