"""Python client for the Sandstorm gateway: REST on httpx, the live stream on trio-websocket.

Async (Trio)::

    async with AsyncClient("http://localhost:3000") as client:
        result = await client.run(code="print('hi')", language="python")
        print(result.result.stdout)

        created = await client.run(command=["python3", "-i"], wait=False, stdin_open=True)
        async with client.stream(created.id) as stream:
            await stream.send_stdin(created.exec_id, "print(6 * 7)\\n")
            async for event in stream:
                ...

Sync::

    with Client() as client:
        print(client.run(code="print('hi')", language="python").result.stdout)
        for event in client.iter_events(sandbox_id):
            ...

The gateway URL defaults to ``$SANDSTORM_URL`` or http://localhost:3000. Every error answer
raises :class:`SandstormError` with the SPEC's code, message and details.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from sandstorm.api.types import (
    DeleteResponse,
    ExecAcceptedEvent,
    ExecResponse,
    ExecSummary,
    LanguageInfo,
    RunResponse,
    RuntimeInfo,
    SandboxList,
    SandboxStatus,
    ServerFrame,
    SnapshotInfo,
    SnapshotList,
)

DEFAULT_URL = "http://localhost:3000"
T = TypeVar("T")
_FRAMES = msgspec.json.Decoder(ServerFrame)
# The exit frame carries the capped result (up to 1 MiB per stream, JSON-escaped).
MAX_FRAME_BYTES = 16 * 1024 * 1024
CLOSE_TIMEOUT_S = 5.0
#: One read from the stream's socket: a whole 64 KiB output event at once. With trio-websocket's
#: default of 4 KiB a client takes 16 reads per event and becomes the slower side of a busy
#: stream.
RECEIVE_BUFFER_BYTES = 64 * 1024
#: Connections to the gateway. httpx keeps only 20 idle by default: with more requests in flight
#: than that, answers would close their connections and the next requests open new ones.
POOL_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)


def default_url() -> str:
    return os.environ.get("SANDSTORM_URL") or DEFAULT_URL


def default_api_key() -> str | None:
    return os.environ.get("SANDSTORM_API_KEY") or None


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class SandstormError(Exception):
    """An error answer from the gateway (or a stream ``error`` frame)."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        raise SandstormError(
            response.status_code, error["code"], error["message"], error.get("details", {})
        )
    except (ValueError, KeyError, TypeError):
        raise SandstormError(response.status_code, "http_error", response.text, {}) from None


def _decode(response: httpx.Response, kind: type[T]) -> T:
    _raise_for(response)
    return msgspec.json.decode(response.content, type=kind)


def _body(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


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
            headers=_auth_headers(self.api_key),
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
        return _decode(response, kind)

    # -- sandboxes
    async def run(self, **fields: Any) -> RunResponse:
        """POST /v1/sandboxes/run; fields as in the SPEC (code, language, command, …)."""
        return await self._call("POST", "/v1/sandboxes/run", RunResponse, _body(**fields))

    async def exec(self, sandbox_id: str, **fields: Any) -> ExecResponse:
        path = f"/v1/sandboxes/{sandbox_id}/exec"
        return await self._call("POST", path, ExecResponse, _body(**fields))

    async def exec_result(self, sandbox_id: str, exec_id: str) -> ExecSummary:
        return await self._call("GET", f"/v1/sandboxes/{sandbox_id}/execs/{exec_id}", ExecSummary)

    async def status(self, sandbox_id: str) -> SandboxStatus:
        return await self._call("GET", f"/v1/sandboxes/{sandbox_id}/status", SandboxStatus)

    async def sandboxes(self) -> list[SandboxStatus]:
        return (await self._call("GET", "/v1/sandboxes", SandboxList)).sandboxes

    async def delete(self, sandbox_id: str) -> DeleteResponse:
        return await self._call("DELETE", f"/v1/sandboxes/{sandbox_id}", DeleteResponse)

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
        _raise_for(await self._http.delete(f"/v1/snapshots/{snapshot_id}"))

    # -- catalogue
    async def runtimes(self) -> list[RuntimeInfo]:
        return await self._call("GET", "/v1/runtimes", list[RuntimeInfo])

    async def languages(self) -> list[LanguageInfo]:
        return await self._call("GET", "/v1/languages", list[LanguageInfo])

    # -- the live stream
    @asynccontextmanager
    async def stream(
        self,
        sandbox_id: str,
        since: int = 0,
        *,
        message_queue_size: int = 64,
        max_message_size: int = MAX_FRAME_BYTES,
    ) -> AsyncIterator[Stream]:
        """Open ``GET /v1/sandboxes/{id}/stream``; iterate the stream for events.

        ``message_queue_size`` frames are read ahead at most; past that the client stops
        reading the socket (and the gateway cuts a client that lags too far). Raises
        :class:`SandstormError` when the gateway refuses the stream (404, 503) before upgrading.
        """
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        resource = f"{parts.path}/v1/sandboxes/{sandbox_id}/stream?since={since}"
        tcp: trio.abc.Stream
        if parts.scheme == "https":
            import ssl

            raw = await trio.open_tcp_stream(host, port)
            tcp = trio.SSLStream(raw, ssl.create_default_context(), server_hostname=host)
        else:
            tcp = await trio.open_tcp_stream(host, port)
        # We own the TCP stream and close it ourselves: trio-websocket 0.12 leaves a client's
        # socket open when the server closes first.
        opened = False
        try:
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(
                    nursery, tcp, host, resource,
                    max_message_size=max_message_size, message_queue_size=message_queue_size,
                    receive_buffer_size=RECEIVE_BUFFER_BYTES,
                    extra_headers=[
                        (k.lower().encode(), v.encode())
                        for k, v in _auth_headers(self.api_key).items()
                    ],
                )  # fmt: skip
                opened = True
                try:
                    yield Stream(ws)
                finally:
                    # The close handshake has no deadline of its own in trio-websocket.
                    with trio.move_on_after(CLOSE_TIMEOUT_S):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The connection's reader task runs in a nursery, so errors arrive grouped: a refused
            # upgrade becomes SandstormError, and a single error is raised as itself.
            rejected = group.subgroup(ConnectionRejected)
            if rejected is not None and not opened:
                refusal = _leaves(rejected)[0]
                assert isinstance(refusal, ConnectionRejected)
                raise _rejected(refusal.status_code or 0, refusal.body or b"{}") from None
            leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                await tcp.aclose()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _rejected(status: int, body: bytes) -> SandstormError:
    try:
        error = json.loads(body)["error"]
        return SandstormError(status, error["code"], error["message"], error.get("details", {}))
    except (ValueError, KeyError, TypeError):
        return SandstormError(status, "http_error", body.decode(errors="replace"), {})


class Stream:
    """One WebSocket on a sandbox: iterate for events; send stdin, signals and execs."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.close_code: int | None = None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        """The next server frame as a protocol Struct; ends when the gateway closes the socket."""
        try:
            message = await self.ws.get_message()
        except ConnectionClosed as closed:
            self.close_code = closed.reason.code if closed.reason else None
            raise StopAsyncIteration from None
        try:
            return _FRAMES.decode(message)
        except msgspec.ValidationError:
            # A frame type this client does not know yet (a newer gateway): hand it over as
            # plain JSON rather than failing the stream.
            return json.loads(message)

    async def _send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def send_stdin(self, exec_id: str, data: str | bytes) -> None:
        if isinstance(data, bytes):
            try:
                await self._send({"type": "stdin", "exec_id": exec_id, "data": data.decode()})
            except UnicodeDecodeError:
                encoded = base64.b64encode(data).decode()
                await self._send({"type": "stdin", "exec_id": exec_id, "data_b64": encoded})
        else:
            await self._send({"type": "stdin", "exec_id": exec_id, "data": data})

    async def close_stdin(self, exec_id: str) -> None:
        await self._send({"type": "stdin_close", "exec_id": exec_id})

    async def signal(self, exec_id: str, name: str = "SIGINT") -> None:
        await self._send({"type": "signal", "exec_id": exec_id, "signal": name})

    async def exec(self, request_id: str | None = None, **fields: Any) -> None:
        """Start an interactive exec; its ``exec_accepted`` reply (with ``request_id``) and its
        events arrive on the stream."""
        await self._send({"type": "exec", "id": request_id, **_body(**fields)})


def is_accepted(event: Any, request_id: str) -> bool:
    return isinstance(event, ExecAcceptedEvent) and event.id == request_id


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
            headers=_auth_headers(self.api_key),
            limits=POOL_LIMITS,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, kind: type[T], body: Any = None) -> T:
        return _decode(self._http.request(method, path, json=body), kind)

    def run(self, **fields: Any) -> RunResponse:
        return self._call("POST", "/v1/sandboxes/run", RunResponse, _body(**fields))

    def exec(self, sandbox_id: str, **fields: Any) -> ExecResponse:
        path = f"/v1/sandboxes/{sandbox_id}/exec"
        return self._call("POST", path, ExecResponse, _body(**fields))

    def exec_result(self, sandbox_id: str, exec_id: str) -> ExecSummary:
        return self._call("GET", f"/v1/sandboxes/{sandbox_id}/execs/{exec_id}", ExecSummary)

    def status(self, sandbox_id: str) -> SandboxStatus:
        return self._call("GET", f"/v1/sandboxes/{sandbox_id}/status", SandboxStatus)

    def sandboxes(self) -> list[SandboxStatus]:
        return self._call("GET", "/v1/sandboxes", SandboxList).sandboxes

    def delete(self, sandbox_id: str) -> DeleteResponse:
        return self._call("DELETE", f"/v1/sandboxes/{sandbox_id}", DeleteResponse)

    def snapshot(self, sandbox_id: str, *, leave_running: bool = True) -> SnapshotInfo:
        body = {"leave_running": leave_running}
        return self._call("POST", f"/v1/sandboxes/{sandbox_id}/snapshot", SnapshotInfo, body)

    def resume(self, snapshot_id: str, *, keep_alive: int = 300) -> SandboxStatus:
        body = {"snapshot_id": snapshot_id, "keep_alive": keep_alive}
        return self._call("POST", "/v1/sandboxes/resume", SandboxStatus, body)

    def snapshots(self) -> list[SnapshotInfo]:
        return self._call("GET", "/v1/snapshots", SnapshotList).snapshots

    def delete_snapshot(self, snapshot_id: str) -> None:
        _raise_for(self._http.delete(f"/v1/snapshots/{snapshot_id}"))

    def runtimes(self) -> list[RuntimeInfo]:
        return self._call("GET", "/v1/runtimes", list[RuntimeInfo])

    def languages(self) -> list[LanguageInfo]:
        return self._call("GET", "/v1/languages", list[LanguageInfo])

    def iter_events(self, sandbox_id: str, since: int = 0) -> Iterator[Any]:
        """Yield the sandbox's stream events until the gateway closes the stream.

        A worker thread runs the async stream; a bounded queue hands events over, so a caller
        that stops iterating stops the reading too. Leaving the loop early closes the stream.
        """
        events: queue.Queue[Any] = queue.Queue(maxsize=256)
        done = object()
        started = threading.Event()
        handle: dict[str, Any] = {}

        async def pump() -> None:
            with trio.CancelScope() as scope:
                handle["scope"], handle["token"] = scope, trio.lowlevel.current_trio_token()
                started.set()
                async with (
                    AsyncClient(self.url, api_key=self.api_key) as client,
                    client.stream(sandbox_id, since) as s,
                ):
                    async for event in s:
                        # Wait for room without blocking Trio, so a cancel can get in.
                        while True:
                            try:
                                events.put_nowait(event)
                                break
                            except queue.Full:
                                await trio.sleep(0.01)

        def worker() -> None:
            outcome: object = done
            try:
                trio.run(pump)
            except BaseException as exc:  # handed to the caller's thread
                outcome = exc
            finally:
                started.set()
                # The caller may be gone (it left the loop): never block on a full queue.
                with contextlib.suppress(queue.Full):
                    events.put(outcome, timeout=1)

        thread = threading.Thread(target=worker, name="sandstorm-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = events.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            started.wait(timeout=5)
            if "scope" in handle and thread.is_alive():
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(handle["scope"].cancel, trio_token=handle["token"])
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    events.get(timeout=0.1)  # make room in case the worker waits to put
                thread.join(timeout=0.1)
