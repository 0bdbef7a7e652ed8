"""Authentication and the audit log, as hooks around every request.

* ``authenticate``: before every request and WebSocket upgrade, find the caller's tenant
  (``g.tenant``) from its API key, or refuse with 401 before any work is done (for a stream:
  before the upgrade). Only the probes (``/health``, ``/ready``) and the console's static page
  stay open: the page holds no data and asks for the key itself.
* ``audit``: after every mutating REST call, one record: tenant, action, the ids involved,
  outcome (status, and error code when refused). Stream frames are recorded by the stream.

Nothing from a request body reaches the audit log: ids come from the path and the response.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, cast

import msgspec
import trio
from quart import Response, current_app, g, has_websocket_context, request, websocket

from sandstorm.actors import tenancy
from sandstorm.errors import Unauthorized
from sandstorm.logs import log_context
from sandstorm.store import AuditRecord, Tenant

if TYPE_CHECKING:
    from sandstorm.supervisor.gateway import Gateway

log = logging.getLogger(__name__)

OPEN_ENDPOINTS = frozenset({"rest.health", "rest.ready", "console.index", "console.static_asset"})
# Mutating REST endpoints and the action their audit records carry.
AUDITED = {
    "rest.run_sandbox": "run",
    "rest.exec_in_sandbox": "exec",
    "rest.delete_sandbox": "delete_sandbox",
    "rest.snapshot_sandbox": "snapshot",
    "rest.resume_sandbox": "resume",
    "rest.delete_snapshot": "delete_snapshot",
    "files.write_file": "files_write",
    "files.make_directory": "files_mkdir",
    "files.move_file": "files_move",
    "files.delete_file": "files_delete",
    "files.extract_archive_into": "files_extract",
}
WWW_AUTHENTICATE = 'Bearer realm="sandstorm"'
# Responses above this are not read back for ids (a result can hold megabytes of output; the
# ids come first in the body, but a partial JSON document cannot be decoded).
MAX_AUDIT_BODY = 4 * 1024 * 1024


class _Ids(msgspec.Struct):
    """The ids a response (or an error's details) names; everything else is ignored."""

    id: str | None = None
    exec_id: str | None = None
    snapshot_id: str | None = None
    sandbox_id: str | None = None
    restored_from: str | None = None


class _ErrorBody(msgspec.Struct):
    code: str = ""
    details: _Ids = msgspec.field(default_factory=_Ids)


class _Body(_Ids):
    error: _ErrorBody | None = None


_BODY = msgspec.json.Decoder(_Body)


def _gateway() -> Gateway:
    return cast("Gateway", current_app.config["SANDSTORM_GATEWAY"])


def current_tenant() -> Tenant:
    """The authenticated caller (set by ``authenticate`` on every non-open route)."""
    tenant = g.get("tenant")
    if tenant is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <API key>'")
    return cast(Tenant, tenant)


def open_allowed(gateway: Gateway) -> bool:
    """Whether this gateway may serve without keys: loopback only, or explicitly insecure."""
    return gateway.config.insecure_no_auth or tenancy.is_loopback(gateway.config.host)


async def authenticate() -> None:
    if has_websocket_context():
        ctx = websocket
        if ctx.endpoint in OPEN_ENDPOINTS:
            return
        key = tenancy.bearer_from_header(ctx.headers.get("Authorization"))
        if key is None:
            # Browsers cannot set headers on a WebSocket: the key may come as a subprotocol,
            # which the accepted upgrade must echo.
            key = tenancy.bearer_from_subprotocols(websocket.requested_subprotocols)
            if key is not None:
                g.subprotocol = tenancy.SUBPROTOCOL_PREFIX + key
    else:
        if request.endpoint in OPEN_ENDPOINTS:
            return
        key = tenancy.bearer_from_header(request.headers.get("Authorization"))
    gateway = _gateway()
    g.tenant = await tenancy.authenticate(gateway.store, key, open_allowed=open_allowed(gateway))


async def audit(response: Response) -> Response:
    action = AUDITED.get(request.endpoint or "")
    g.audited = True
    if action is None or g.get("tenant") is None:
        # Unauthenticated calls (401) are not audited: nobody is accountable for them, and
        # anyone could fill the disk with their records.
        return response
    ids = _Body()
    if response.content_length is not None and response.content_length <= MAX_AUDIT_BODY:
        with contextlib.suppress(msgspec.DecodeError):
            ids = _BODY.decode(await response.get_data(as_text=False))
    outcome = str(response.status_code)
    found: _Ids = ids
    if ids.error is not None:
        outcome += f" {ids.error.code}"
        found = ids.error.details
    path = request.view_args or {}
    tenant = g.get("tenant")
    record = AuditRecord(
        time=time.time(),
        tenant=tenant.name if tenant is not None else None,
        action=action,
        sandbox_id=path.get("sandbox_id") or found.sandbox_id or (found.id if found.id else None),
        exec_id=found.exec_id,
        snapshot_id=path.get("snapshot_id") or found.snapshot_id or found.restored_from,
        outcome=outcome,
        request_id=current_request_id(),
        target=g.get("audit_target"),
    )
    await record_audit(_gateway(), record)
    return response


async def audit_abandoned(exc: BaseException | None) -> None:
    """Teardown hook: a mutating call whose handler never answered (the client went away and
    the handler was cancelled) still leaves its record. No checkpoint in here: this runs while
    the request's task is being cancelled."""
    action = AUDITED.get(request.endpoint or "")
    tenant = g.get("tenant")
    if action is None or g.get("audited") or tenant is None:
        return
    path = request.view_args or {}
    _gateway().recorder.audit_nowait(
        AuditRecord(
            time=time.time(),
            tenant=tenant.name,
            action=action,
            sandbox_id=path.get("sandbox_id"),
            snapshot_id=path.get("snapshot_id"),
            outcome="499 client_closed" if exc is None or _cancelled(exc) else "500 internal",
            request_id=current_request_id(),
            target=g.get("audit_target"),
        )
    )


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is not None
    return isinstance(exc, trio.Cancelled)


async def record_audit(gateway: Gateway, record: AuditRecord) -> None:
    # Queued for the recorder's next batch (within milliseconds), not written before the
    # answer: nothing in a response depends on it. A failed write (full disk) is logged there
    # and never turns a call into a 500.
    await gateway.recorder.audit(record)


def current_request_id() -> str | None:
    ctx = log_context.get()
    return ctx.request_id if ctx is not None else None


def challenge(response: Response) -> None:
    response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
