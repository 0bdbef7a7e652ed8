"""``GET /v1/sandboxes/{id}/stream``: the sandbox's event log over a WebSocket (SPEC §4).

One nursery per connection: a writer that forwards the log (replay from ``since``, then live
events) and a reader that applies client frames. The writer's outbox is the connection's own
bounded subscription to the log, with flow control (see ``actors/events.py``): a client that
reads gets everything, a client that stops reading is sent ``lagged`` and closed with 1013 once
it has taken nothing for the stall timeout, and the sandbox and every other client go on.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import time
from typing import cast

import msgspec
import trio
from quart import Blueprint, current_app, g, websocket

from sandstorm.actors.events import Subscriber
from sandstorm.actors.sandbox import SandboxActor
from sandstorm.api.decoding import decode_request
from sandstorm.api.types import (
    JSON_ENCODER,
    ClientFrame,
    ErrorEvent,
    ExecAcceptedEvent,
    ExecFrame,
    ExecRequest,
    LaggedEvent,
    SignalFrame,
    StdinCloseFrame,
    StdinFrame,
    UnwatchFrame,
    WatchAcceptedEvent,
    WatchFrame,
)
from sandstorm.config import Config
from sandstorm.errors import AtCapacity, GatewayError, InvalidRequest, SandboxNotRunning
from sandstorm.files import sandbox_path
from sandstorm.store import AuditRecord, Tenant
from sandstorm.supervisor.gateway import Gateway
from sandstorm.web.auth import current_request_id, current_tenant, record_audit

log = logging.getLogger(__name__)
blueprint = Blueprint("stream", __name__)
_CLIENT_FRAMES = msgspec.json.Decoder(ClientFrame)
CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN_LATER = 1013
# How long a lagged client gets to take its "lagged" frame before the socket is dropped.
LAGGED_SEND_TIMEOUT_S = 1.0


def _gateway() -> Gateway:
    return cast(Gateway, current_app.config["SANDSTORM_GATEWAY"])


@blueprint.websocket("/v1/sandboxes/<sandbox_id>/stream")
async def stream(sandbox_id: str) -> None:
    gateway = _gateway()
    router = gateway.router
    if router is None:
        raise SandboxNotRunning("the gateway is shutting down")
    # Everything that can refuse the stream happens before the upgrade, so the client gets the
    # SPEC's HTTP error (404 for an unknown sandbox) instead of a socket that closes at once.
    tenant = current_tenant()
    actor = router.get(sandbox_id, tenant.name)
    since = _since(websocket.args.get("since"))
    config = gateway.config
    if router.open_streams >= config.max_streams:
        gateway.metrics.refused("at_capacity", "stream")
        raise AtCapacity(f"the gateway already serves {router.open_streams} streams")
    if actor.open_streams >= config.max_streams_per_sandbox:
        gateway.metrics.refused("at_capacity", "stream")
        raise AtCapacity(f"sandbox {sandbox_id} already has {actor.open_streams} streams")
    router.open_streams += 1
    actor.open_streams += 1
    subscriber, missed = actor.events.subscribe(
        since, config.stream_outbox_events, config.stream_outbox_bytes
    )
    try:
        # A key offered as the subprotocol "bearer.<key>" must be echoed (RFC 6455).
        await websocket.accept(subprotocol=g.get("subprotocol"))
        gateway.metrics.streams_opened.inc()
        watches: set[str] = set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_client, actor, config, tenant, watches)
                code = await _write_events(actor, subscriber, missed)
                nursery.cancel_scope.cancel()
        finally:
            # A connection's watches end with it (shielded and bounded in unwatch).
            for watch_id in watches:
                with contextlib.suppress(GatewayError):
                    await actor.unwatch(watch_id)
        with contextlib.suppress(Exception), trio.move_on_after(LAGGED_SEND_TIMEOUT_S):
            await websocket.close(code)
    finally:
        subscriber.close()
        router.open_streams -= 1
        actor.open_streams -= 1


def _since(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest("since must be a non-negative integer", field="since") from None
    if value < 0:
        raise InvalidRequest("since must be a non-negative integer", field="since")
    return value


async def _write_events(
    actor: SandboxActor, subscriber: Subscriber, missed: tuple[int, int] | None
) -> int:
    """Send the replay, then live events; returns the close code."""
    if missed is not None:
        await websocket.send(
            JSON_ENCODER.encode(LaggedEvent(missed_from=missed[0], missed_to=missed[1])).decode()
        )
    async for event in subscriber:
        await websocket.send(event.data.decode())
    if not subscriber.lagged:
        return CLOSE_NORMAL  # the sandbox ended: its log is closed and fully delivered
    assert subscriber.missed_from is not None
    # Everything from the first dropped event up to the newest one is gone for this client.
    lagged = LaggedEvent(
        missed_from=subscriber.missed_from,
        missed_to=max(subscriber.missed_from, actor.events.last_seq),
    )
    with trio.move_on_after(LAGGED_SEND_TIMEOUT_S):
        await websocket.send(JSON_ENCODER.encode(lagged).decode())
    return CLOSE_TRY_AGAIN_LATER


async def _send_error(code: str, message: str, frame_id: str | None = None) -> None:
    error = ErrorEvent(code=code, message=message, id=frame_id)
    await websocket.send(JSON_ENCODER.encode(error).decode())


async def _read_client(
    actor: SandboxActor, config: Config, tenant: Tenant, watches: set[str]
) -> None:
    """Apply client frames; a bad frame gets an ``error`` frame and the socket stays usable."""
    while True:
        message = await websocket.receive()
        # (quart-trio hands an empty binary frame over as None)
        if message is None or isinstance(message, bytes):
            await _send_error("invalid_frame", "binary frames are not accepted; send JSON text")
            continue
        if len(message) > config.max_client_frame_bytes:
            await _send_error(
                "invalid_frame",
                f"frame of {len(message)} bytes exceeds {config.max_client_frame_bytes}",
            )
            continue
        try:
            frame = await decode_request(_CLIENT_FRAMES, message)
        except InvalidRequest as exc:
            # Malformed JSON, wrong types, duplicate keys: the message names the field.
            await _send_error("invalid_frame", exc.message)
            continue
        try:
            if isinstance(frame, (WatchFrame, UnwatchFrame)):
                await _apply_watch(actor, frame, watches)
                continue
            exec_id = await _apply(actor, frame, tenant)
        except GatewayError as exc:
            await _audit(actor, frame, tenant, f"{exc.status} {exc.code}", None)
            await _send_error(exc.code, exc.message, getattr(frame, "id", None))
        else:
            await _audit(actor, frame, tenant, "ok", exec_id)


async def _audit(
    actor: SandboxActor, frame: ClientFrame, tenant: Tenant, outcome: str, exec_id: str | None
) -> None:
    """exec and signal frames are mutating calls: one audit record each (never their body)."""
    if isinstance(frame, (ExecFrame, SignalFrame)):
        action = "stream_exec" if isinstance(frame, ExecFrame) else "stream_signal"
        record = AuditRecord(
            time=time.time(),
            tenant=tenant.name,
            action=action,
            sandbox_id=actor.id,
            exec_id=exec_id or getattr(frame, "exec_id", None),
            outcome=outcome,
            request_id=current_request_id(),
        )
        await record_audit(_gateway(), record)


async def _apply_watch(
    actor: SandboxActor, frame: WatchFrame | UnwatchFrame, watches: set[str]
) -> None:
    """Start or stop a watch of this connection; its ``fs`` events go into the log."""
    if isinstance(frame, UnwatchFrame):
        if frame.id not in watches:
            raise InvalidRequest(f"this connection has no watch {frame.id!r}", field="id")
        watches.discard(frame.id)
        await actor.unwatch(frame.id)
        return
    path = sandbox_path(frame.path)
    await actor.watch(frame.id, path, recursive=frame.recursive)
    watches.add(frame.id)
    accepted = WatchAcceptedEvent(id=frame.id, path=path)
    await websocket.send(JSON_ENCODER.encode(accepted).decode())


async def _apply(actor: SandboxActor, frame: ClientFrame, tenant: Tenant) -> str | None:
    """Apply one client frame; returns the id of an exec it started."""
    if isinstance(frame, StdinFrame):
        if frame.data is not None and frame.data_b64 is not None:
            raise InvalidRequest("give data or data_b64, not both", field="data")
        try:
            data = (
                base64.b64decode(frame.data_b64, validate=True)
                if frame.data_b64 is not None
                else (frame.data or "").encode()
            )
        except (binascii.Error, ValueError):
            raise InvalidRequest("data_b64 is not valid base64", field="data_b64") from None
        await actor.send_stdin(frame.exec_id, data, close=False)
    elif isinstance(frame, StdinCloseFrame):
        await actor.send_stdin(frame.exec_id, b"", close=True)
    elif isinstance(frame, SignalFrame):
        await actor.send_signal(frame.exec_id, frame.signal)
    elif isinstance(frame, ExecFrame):
        fields = msgspec.structs.asdict(frame)
        request_id = fields.pop("id")
        router = _gateway().router
        if router is None:
            raise SandboxNotRunning("the gateway is shutting down")
        _, exec_id = await router.exec(
            actor.id, ExecRequest(**fields), interactive=True, tenant=tenant
        )
        accepted = ExecAcceptedEvent(id=request_id, exec_id=exec_id)
        await websocket.send(JSON_ENCODER.encode(accepted).decode())
        return exec_id
    return None
