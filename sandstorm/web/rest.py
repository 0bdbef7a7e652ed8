"""REST routes of SPEC §3: decode with msgspec, call the actors, encode with msgspec."""

from __future__ import annotations

from typing import Any, TypeVar, cast

import msgspec
from quart import Blueprint, Response, current_app, request

from sandstorm.actors.router import Router
from sandstorm.actors.sandbox import SandboxActor
from sandstorm.api.decoding import decode_request
from sandstorm.api.timestamps import rfc3339_from_epoch
from sandstorm.api.types import (
    JSON_ENCODER,
    DeleteResponse,
    ExecRequest,
    ExecResponse,
    Health,
    ResumeRequest,
    RunRequest,
    RunResponse,
    SandboxList,
    SnapshotDeleted,
    SnapshotList,
    SnapshotRequest,
)
from sandstorm.errors import NotFound, SandboxNotRunning
from sandstorm.ids import is_id
from sandstorm.logs import bind
from sandstorm.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sandstorm.store import SandboxRecord, Store
from sandstorm.supervisor.gateway import Gateway
from sandstorm.web import views
from sandstorm.web.auth import current_tenant

blueprint = Blueprint("rest", __name__)
# A listing shows at most this many sandboxes from the store (the newest), besides live ones.
MAX_LISTED_RECORDS = 1000
T = TypeVar("T")
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in (RunRequest, ExecRequest, SnapshotRequest, ResumeRequest)
}


def _gateway() -> Gateway:
    return cast(Gateway, current_app.config["SANDSTORM_GATEWAY"])


def _router() -> Router:
    router = _gateway().router
    if router is None:
        raise SandboxNotRunning("the gateway is shutting down")
    return router


def _json(obj: object, status: int = 200) -> Response:
    return Response(JSON_ENCODER.encode(obj), status=status, content_type="application/json")


async def _raw_body() -> bytes:
    raw = await request.get_data(cache=False, as_text=False)
    assert isinstance(raw, bytes)
    return raw


async def _body(kind: type[T], *, optional: bool = False, raw: bytes | None = None) -> T:
    """Read (unless ``raw`` is given) and decode a body; any fault is a 400 naming the field."""
    if raw is None:
        raw = await _raw_body()
    if optional and not raw.strip():
        return kind()
    return cast(T, await decode_request(_DECODERS[kind], raw))


async def _sandbox(sandbox_id: str) -> SandboxActor | SandboxRecord:
    """The caller's sandbox: live (or recently ended) in the router, else its stored record.
    Another tenant's id is NotFound, exactly as an unknown one."""
    tenant = current_tenant().name
    router = _router()
    try:
        return router.get(sandbox_id, tenant)
    except NotFound:
        if sandbox_id in router.live_ids():  # booting: the router has no actor yet
            raise
        record = await _gateway().store.call(Store.get_sandbox, sandbox_id)
        if record is None or record.tenant != tenant:
            raise
        return record


async def live_sandbox(sandbox_id: str) -> SandboxActor:
    """The caller's sandbox held by the router; a stored one has ended (409)."""
    found = await _sandbox(sandbox_id)
    if not isinstance(found, SandboxActor):
        raise SandboxNotRunning(f"sandbox {sandbox_id} is {found.state}", state=found.state)
    return found


def _expires(actor: SandboxActor) -> str | None:
    expires = actor.expires_at()
    return rfc3339_from_epoch(expires) if expires is not None else None


# ---------------------------------------------------------------------------- sandboxes


@blueprint.post("/v1/sandboxes/run")
async def run_sandbox() -> Response:
    req = await _body(RunRequest)
    created = await _router().create(req, current_tenant())
    actor = created.actor
    record = actor.execs[created.exec_id]
    bind(sandbox_id=actor.id, exec_id=record.exec_id)
    if req.wait:
        await record.done.wait()
    body = RunResponse(
        id=actor.id,
        state=actor.state,
        runtime=actor.params.runtime_name,
        isolation_level=actor.params.isolation_level,
        selection=actor.params.selection,
        created_at=rfc3339_from_epoch(actor.created_at),
        expires_at=_expires(actor),
        exec_id=record.exec_id,
        result=record.result if req.wait else None,
    )
    return _json(body, 201 if req.wait else 202)


@blueprint.post("/v1/sandboxes/<sandbox_id>/exec")
async def exec_in_sandbox(sandbox_id: str) -> Response:
    # The body is read before any answer: one sent with the request body unread can leave the
    # keep-alive connection stuck (Hypercorn stops reading it), so the next request hangs.
    raw = await _raw_body()
    router = _router()
    await live_sandbox(sandbox_id)  # 404 before 400: an unknown sandbox is the first thing to say
    req = await _body(ExecRequest, raw=raw)
    actor, exec_id = await router.exec(sandbox_id, req, tenant=current_tenant())
    record = actor.execs[exec_id]
    bind(exec_id=exec_id)
    if req.wait:
        await record.done.wait()
    body = ExecResponse(id=actor.id, exec_id=exec_id, result=record.result if req.wait else None)
    return _json(body, 201 if req.wait else 202)


@blueprint.get("/v1/sandboxes/<sandbox_id>/status")
async def sandbox_status(sandbox_id: str) -> Response:
    found = await _sandbox(sandbox_id)
    if isinstance(found, SandboxActor):
        return _json(found.status())
    execs = await _gateway().store.call(Store.list_execs, found.id)
    return _json(views.sandbox_status(found, execs))


@blueprint.get("/v1/sandboxes/<sandbox_id>/execs/<exec_id>")
async def exec_status(sandbox_id: str, exec_id: str) -> Response:
    found = await _sandbox(sandbox_id)
    record = found.execs.get(exec_id) if isinstance(found, SandboxActor) else None
    if record is not None:
        return _json(record.summary())
    # Ended before a restart, or beyond the live history: the stored result.
    row = await _gateway().store.call(Store.get_exec, exec_id) if is_id(exec_id, "exe") else None
    if row is None or row.sandbox_id != sandbox_id:
        raise NotFound(f"exec {exec_id!r} not found in {sandbox_id}", exec_id=exec_id)
    return _json(views.exec_summary(row))


@blueprint.delete("/v1/sandboxes/<sandbox_id>")
async def delete_sandbox(sandbox_id: str) -> Response:
    found = await _sandbox(sandbox_id)
    if not isinstance(found, SandboxActor):
        return _json(DeleteResponse(id=found.id, state="destroyed", released=[]))
    released = await found.destroy()
    return _json(DeleteResponse(id=found.id, state="destroyed", released=released))


@blueprint.get("/v1/sandboxes")
async def list_sandboxes() -> Response:
    router = _router()
    tenant = current_tenant().name
    state = request.args.get("state")
    actors = [a for a in router.sandboxes.values() if a.params.tenant == tenant]
    statuses = [a.status() for a in actors]
    # Sandboxes of earlier runs, and ended ones the router no longer holds (without their
    # execs: a listing stays one query; their status has them).
    held = {a.id for a in actors} | router.live_ids()
    stored = await _gateway().store.call(Store.list_sandboxes, tenant, MAX_LISTED_RECORDS)
    statuses = [views.sandbox_status(r, []) for r in stored if r.id not in held] + statuses
    if state is not None:
        statuses = [s for s in statuses if s.state == state]
    return _json(SandboxList(sandboxes=statuses))


# ---------------------------------------------------------------------------- snapshots


@blueprint.post("/v1/sandboxes/<sandbox_id>/snapshot")
async def snapshot_sandbox(sandbox_id: str) -> Response:
    raw = await _raw_body()  # before any answer (see exec_in_sandbox)
    actor = await live_sandbox(sandbox_id)
    req = await _body(SnapshotRequest, optional=True, raw=raw)
    meta = await actor.snapshot(req.leave_running)
    return _json(meta.info, 201)


@blueprint.post("/v1/sandboxes/resume")
async def resume_sandbox() -> Response:
    req = await _body(ResumeRequest)
    actor = await _router().resume(req.snapshot_id, req.keep_alive, current_tenant())
    return _json(actor.status(), 201)


@blueprint.get("/v1/snapshots")
async def list_snapshots() -> Response:
    snapshots = await _gateway().catalog.list(current_tenant().name)
    return _json(SnapshotList(snapshots=snapshots))


@blueprint.get("/v1/snapshots/<snapshot_id>")
async def get_snapshot(snapshot_id: str) -> Response:
    return _json((await _gateway().catalog.load(snapshot_id, current_tenant().name)).info)


@blueprint.delete("/v1/snapshots/<snapshot_id>")
async def delete_snapshot(snapshot_id: str) -> Response:
    await _gateway().catalog.delete(snapshot_id, current_tenant().name)
    return _json(SnapshotDeleted(snapshot_id=snapshot_id, deleted=True))


# ---------------------------------------------------------------------------- catalogue


@blueprint.get("/v1/runtimes")
async def list_runtimes() -> Response:
    return _json(_gateway().registry.infos())


@blueprint.get("/v1/languages")
async def list_languages() -> Response:
    return _json(_gateway().languages())


@blueprint.get("/health")
async def health() -> Response:
    return _json(Health(status="ok", version=_gateway().version))


@blueprint.get("/ready")
async def ready() -> Response:
    state = _gateway().ready()
    return _json(state, 200 if state.ready else 503)


@blueprint.get("/metrics")
async def metrics() -> Response:
    # Rendering reads /proc and walks the router's tables: small, and kept on the loop so the
    # gauges are read between two actor steps, never in the middle of one.
    body = _gateway().metrics.render()
    return Response(body, status=200, content_type=METRICS_CONTENT_TYPE)
