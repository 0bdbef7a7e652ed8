"""The live stream of a sandbox: a WebSocket on trio-websocket, its frames as protocol Structs."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from sandstorm.api.types import ExecAcceptedEvent, ServerFrame
from sandstorm.sdk._http import auth_headers, error_from_body, non_null

_FRAMES = msgspec.json.Decoder(ServerFrame)
# The exit frame carries the capped result (up to 1 MiB per stream, JSON-escaped).
MAX_FRAME_BYTES = 16 * 1024 * 1024
CLOSE_TIMEOUT_S = 5.0
#: One read from the stream's socket: a whole 64 KiB output event at once. With trio-websocket's
#: default of 4 KiB a client takes 16 reads per event and becomes the slower side of a busy
#: stream.
RECEIVE_BUFFER_BYTES = 64 * 1024


@asynccontextmanager
async def open_stream(
    url: str,
    api_key: str | None,
    sandbox_id: str,
    since: int,
    *,
    message_queue_size: int,
    max_message_size: int,
) -> AsyncIterator[Stream]:
    """``GET {url}/v1/sandboxes/{id}/stream?since=…`` as a :class:`Stream`."""
    parts = urlsplit(url)
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
                    (k.lower().encode(), v.encode()) for k, v in auth_headers(api_key).items()
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
            raise error_from_body(refusal.status_code or 0, refusal.body or b"{}") from None
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


class Stream:
    """One WebSocket on a sandbox: iterate for events; send stdin, signals, execs, watches."""

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
        await self._send({"type": "exec", "id": request_id, **non_null(**fields)})

    async def watch(self, watch_id: str, path: str, *, recursive: bool = True) -> None:
        """Watch ``path`` in the sandbox: ``fs`` events naming ``watch_id`` arrive on the
        stream."""
        frame = {"type": "watch", "id": watch_id, "path": path, "recursive": recursive}
        await self._send(frame)

    async def unwatch(self, watch_id: str) -> None:
        await self._send({"type": "unwatch", "id": watch_id})


def is_accepted(event: Any, request_id: str) -> bool:
    return isinstance(event, ExecAcceptedEvent) and event.id == request_id
