"""Generate ``protocol/openapi.json`` and ``protocol/stream.schema.json`` from the msgspec types.

``python -m sandstorm.api.schema`` rewrites them; with ``--check`` it (and a unit test) fails
when they are stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from sandstorm import __version__
from sandstorm.api.files import ArchiveExtracted, FileEntry, FileList, MoveRequest
from sandstorm.api.types import (
    DeleteResponse,
    ErrorDetail,
    ErrorResponse,
    ExecRequest,
    ExecResponse,
    ExecResult,
    ExecSummary,
    Health,
    LanguageInfo,
    Ready,
    ResumeRequest,
    RunRequest,
    RunResponse,
    RuntimeInfo,
    SandboxList,
    SandboxStatus,
    ServerFrame,
    SnapshotDeleted,
    SnapshotInfo,
    SnapshotList,
    SnapshotRequest,
    StdoutEvent,
)

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "protocol"
REF = "#/components/schemas/"

_ERRORS = {
    "400": "invalid_request: malformed JSON, wrong type or out-of-range value (details.field);"
    " unsafe_archive (details.member)",
    "403": "mount_not_allowed; permission_denied (a file the sandbox's user may not touch)",
    "404": "not_found; file_not_found",
    "409": "sandbox_not_running; wrong_file_type, file_exists, file_operation_failed (files)",
    "413": "payload_too_large",
    "416": "range_not_satisfiable (Content-Range: bytes */size)",
    "422": "snapshot_unsupported",
    "429": "quota_exceeded (Retry-After)",
    "503": "runtime_unavailable or at_capacity (Retry-After)",
    "507": "insufficient_storage: the sandbox ran out of room; nothing was written",
}
#: A query parameter: name, JSON Schema type, required.
Query = tuple[str, str, bool]
PATH_QUERY: Query = ("path", "string", True)


def _ref(t: type[Any]) -> dict[str, str]:
    return {"$ref": REF + t.__name__}


def _op(
    summary: str,
    responses: dict[str, tuple[str, Any]],
    *,
    body: type[Any] | None = None,
    body_required: bool = True,
    errors: tuple[str, ...] = (),
    params: tuple[str, ...] = (),
    query: tuple[Query, ...] = (),
    raw_body: str | None = None,
) -> dict[str, Any]:
    """One operation. A response's schema of None is one without a body; a media type other
    than JSON is given as the schema's ``"media"`` (a raw stream of bytes)."""
    op: dict[str, Any] = {"summary": summary, "responses": {}}
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
    ] + [
        {"name": name, "in": "query", "required": required, "schema": {"type": kind}}
        for name, kind, required in query
    ]
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if raw_body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {raw_body: {"schema": {"type": "string", "format": "binary"}}},
        }
    for status, (description, schema) in responses.items():
        op["responses"][status] = {"description": description}
        if isinstance(schema, dict) and "media" in schema:
            binary = {"type": "string", "format": "binary"}
            op["responses"][status]["content"] = {m: {"schema": binary} for m in schema["media"]}
        elif schema is not None:
            op["responses"][status]["content"] = {"application/json": {"schema": schema}}
    for status in errors:
        op["responses"][status] = {
            "description": _ERRORS[status],
            "content": {"application/json": {"schema": _ref(ErrorResponse)}},
        }
    return op


def openapi() -> dict[str, Any]:
    types: list[Any] = [
        RunRequest, ExecRequest, SnapshotRequest, ResumeRequest, RunResponse, ExecResponse,
        ExecSummary, SandboxStatus, SandboxList, DeleteResponse, SnapshotInfo, SnapshotList,
        SnapshotDeleted, RuntimeInfo, LanguageInfo, Health, Ready, ErrorResponse, FileEntry,
        FileList, MoveRequest, ArchiveExtracted,
    ]  # fmt: skip
    _, components = msgspec.json.schema_components(types, ref_template=REF + "{name}")
    sid = ("sandbox_id",)
    create_errors = ("400", "403", "413", "429", "503")
    paths = {
        "/v1/sandboxes/run": {
            "post": _op(
                "Create a sandbox and run code in it",
                {"201": ("finished (wait true)", _ref(RunResponse)),
                 "202": ("started (wait false)", _ref(RunResponse))},
                body=RunRequest, errors=create_errors,
            )
        },
        "/v1/sandboxes/{sandbox_id}/exec": {
            "post": _op(
                "Run another command in a sandbox",
                {"201": ("finished", _ref(ExecResponse)), "202": ("started", _ref(ExecResponse))},
                body=ExecRequest, errors=("400", "404", "409", "413", "429"), params=sid,
            )
        },
        "/v1/sandboxes/{sandbox_id}/status": {
            "get": _op("A sandbox's state", {"200": ("status", _ref(SandboxStatus))},
                       errors=("404",), params=sid)
        },
        "/v1/sandboxes/{sandbox_id}/execs/{exec_id}": {
            "get": _op("One exec and its result", {"200": ("exec", _ref(ExecSummary))},
                       errors=("404",), params=("sandbox_id", "exec_id"))
        },
        "/v1/sandboxes/{sandbox_id}": {
            "delete": _op("Destroy a sandbox (idempotent)",
                          {"200": ("destroyed", _ref(DeleteResponse))},
                          errors=("404",), params=sid)
        },
        "/v1/sandboxes": {
            "get": _op("The caller's sandboxes", {"200": ("list", _ref(SandboxList))})
        },
        "/v1/sandboxes/{sandbox_id}/snapshot": {
            "post": _op(
                "Snapshot a sandbox", {"201": ("written", _ref(SnapshotInfo))},
                body=SnapshotRequest, body_required=False,
                errors=("400", "404", "409", "422"), params=sid,
            )
        },
        "/v1/sandboxes/resume": {
            "post": _op("Resume a snapshot as a new sandbox",
                        {"201": ("resumed", _ref(SandboxStatus))},
                        body=ResumeRequest, errors=("400", "403", "404", "429", "503"))
        },
        "/v1/snapshots": {
            "get": _op("Snapshots", {"200": ("list", _ref(SnapshotList))})
        },
        "/v1/snapshots/{snapshot_id}": {
            "get": _op("One snapshot", {"200": ("snapshot", _ref(SnapshotInfo))},
                       errors=("404",), params=("snapshot_id",)),
            "delete": _op("Delete a snapshot", {"200": ("deleted", _ref(SnapshotDeleted))},
                          errors=("404",), params=("snapshot_id",))
        },
        "/v1/runtimes": {
            "get": _op("Runtimes and why each is (un)available",
                       {"200": ("list", {"type": "array", "items": _ref(RuntimeInfo)})})
        },
        "/v1/languages": {
            "get": _op("Languages of the image",
                       {"200": ("list", {"type": "array", "items": _ref(LanguageInfo)})})
        },
        **_file_paths(),
        "/health": {"get": _op("Liveness", {"200": ("alive", _ref(Health))})},
        "/ready": {
            "get": _op("Readiness",
                       {"200": ("ready", _ref(Ready)), "503": ("not ready", _ref(Ready))})
        },
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sandstorm Gateway", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def _file_paths() -> dict[str, Any]:
    """SPEC §8: the files of a running sandbox."""
    sid = ("sandbox_id",)
    base = "/v1/sandboxes/{sandbox_id}/files"
    entry = _ref(FileEntry)
    octets = {"media": ["application/octet-stream"]}
    tars = {"media": ["application/x-tar", "application/gzip"]}
    read_errors = ("400", "403", "404", "409")
    write_errors = ("400", "403", "404", "409", "413", "507")
    return {
        f"{base}/content": {
            "get": _op("Download a file (Range: bytes=a-b gives 206)",
                       {"200": ("the file", octets), "206": ("the range asked for", octets)},
                       errors=(*read_errors, "416"), params=sid, query=(PATH_QUERY,)),
            "put": _op("Upload the body to a file, atomically, parents made",
                       {"201": ("written", entry)}, errors=write_errors, params=sid,
                       query=(PATH_QUERY, ("mode", "string", False)),
                       raw_body="application/octet-stream"),
        },
        f"{base}/list": {
            "get": _op("List a directory (depth 1..16, at most 10,000 entries)",
                       {"200": ("the listing", _ref(FileList))}, errors=read_errors,
                       params=sid, query=(PATH_QUERY, ("depth", "integer", False))),
        },
        f"{base}/stat": {
            "get": _op("One entry", {"200": ("the entry", entry)}, errors=read_errors,
                       params=sid, query=(PATH_QUERY,)),
        },
        f"{base}/mkdir": {
            "post": _op("Make a directory", {"201": ("made", entry)}, errors=write_errors,
                        params=sid, query=(PATH_QUERY, ("parents", "boolean", False),
                                           ("mode", "string", False))),
        },
        f"{base}/move": {
            "post": _op("Rename or move a file or directory", {"200": ("moved", entry)},
                        body=MoveRequest, errors=read_errors, params=sid),
        },
        base: {
            "delete": _op("Remove a file, a link or a directory (recursive on request)",
                          {"204": ("removed", None)}, errors=read_errors, params=sid,
                          query=(PATH_QUERY, ("recursive", "boolean", False))),
        },
        f"{base}/archive": {
            "get": _op("A file or directory as a tar stream", {"200": ("the archive", tars)},
                       errors=read_errors, params=sid,
                       query=(PATH_QUERY, ("format", "string", False))),
            "put": _op("Extract a tar (or gzip of a tar) into a directory, all or nothing",
                       {"201": ("extracted", _ref(ArchiveExtracted))}, errors=write_errors,
                       params=sid, query=(PATH_QUERY,), raw_body="application/x-tar"),
        },
    }  # fmt: skip


def stream_schema() -> dict[str, Any]:
    schema = msgspec.json.schema(ServerFrame)
    schema["title"] = "Sandstorm stream frame (server to client)"
    return schema


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def examples() -> dict[str, Any]:
    """Canonical bodies, built from the Structs so that a renamed field breaks them here."""
    result = ExecResult(
        exec_id="exe_01HZY3C4V9Q8W7E6R5T4Y3U2I1", exit_code=0, signal=None, verdict="ok",
        stdout="Hello, World!\n", stderr="", stdout_truncated=False, stderr_truncated=False,
        duration_ms=36.7, cpu_time_ms=20.0, max_rss_bytes=15667200,
    )  # fmt: skip
    sid = "sbx_0V9M9BNCSGHEGBTKRSB644D5RK"
    return {
        "run-request": RunRequest(
            code="print('Hello, World!')", language="python", cpu_limit=1.0,
            memory_limit=536870912, timeout=30000, environment={"PYTHONPATH": "/workspace"},
            files={"/workspace/input.txt": "text content"}, keep_alive=300,
        ),
        "run-response": RunResponse(
            id=sid, state="idle", runtime="gvisor", isolation_level="standard",
            selection="default", created_at="2026-11-26T07:11:22.907Z",
            expires_at="2026-11-26T07:16:23.192Z", exec_id=result.exec_id, result=result,
        ),
        "exec-request": ExecRequest(command=["ls", "-la"], cwd="/workspace", timeout=5000),
        "error-invalid-request": ErrorResponse(
            error=ErrorDetail(code="invalid_request", message="Expected `int` >= 1",
                              details={"field": "timeout"})
        ),
        "stream-stdout": StdoutEvent(seq=3, ts="2026-11-26T07:11:23.001Z",
                                     exec_id=result.exec_id, data="Hello, World!\n"),
    }  # fmt: skip


def generated() -> dict[str, str]:
    files = {"openapi.json": render(openapi()), "stream.schema.json": render(stream_schema())}
    for name, value in examples().items():
        files[f"examples/{name}.json"] = render(msgspec.to_builtins(value))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generated().items():
        path = PROTOCOL_DIR / name
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m sandstorm.api.schema", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
